"""The config: config files loaded by path, each field's role, and validation.

Config files (configs/*.py) are loaded by path, as `--config configs/base.py` loads them: a package
named `configs` would collide with other projects'. Each field has one role in ROLES, read by resume
checks and workdir names. `validate_config` checks every field on its own and `check_sizes` what
the run keeps on a device, before anything is compiled or written.
"""

import functools
import hashlib
import importlib.util
import math
import os
import re
from typing import Any

import ml_collections

from fmnist_jax import IMAGE_PIXELS, NUM_CLASSES, NUM_TRAIN
from fmnist_jax.errors import UserError


# Loading -----------------------------------------------------------------------------------------

# The repository's configs/ folder (present in a source checkout and an editable install).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def load(path: str, relative_to: str | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config()` of the config file at `path` (relative to `relative_to`'s folder)."""
  if relative_to is not None:
    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise UserError(f'config file {path} not found; pass an existing file, e.g. '
                    '--config configs/base.py.')
  # A module name unique per path, so two config files never share an entry in sys.modules.
  name = 'fmnist_jax_config_' + hashlib.sha1(path.encode()).hexdigest()[:12]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def base() -> ml_collections.ConfigDict:
  """The defaults: configs/base.py of this checkout."""
  return load(os.path.join(CONFIGS_DIR, 'base.py'))


# Roles -------------------------------------------------------------------------------------------

# NUMBERS shape the trained numbers (a resume must match the checkpoint's; they name the workdir);
# LENGTH names the workdir and may grow on resume; HOST (how often to check, save, transfer;
# compilation), PLACE (where data and processes are) and DISPLAY change no number and name nothing.
# Every field has a role here: `with_role` refuses unknown ones.
NUMBERS, LENGTH, HOST, PLACE, DISPLAY = 'numbers', 'length', 'host', 'place', 'display'

ROLES = {
    'seed': NUMBERS, 'model': NUMBERS, 'hidden_sizes': NUMBERS, 'num_classes': NUMBERS,
    'optimizer': NUMBERS, 'learning_rate': NUMBERS, 'b1': NUMBERS, 'b2': NUMBERS,
    'eps': NUMBERS, 'batch_size': NUMBERS, 'input_mode': NUMBERS, 'compute_dtype': NUMBERS,
    'num_models': NUMBERS, 'learning_rates': NUMBERS,
    'data.shuffle_buffer': NUMBERS,  # The tfds mode's data order (the other modes ignore it).
    'num_epochs': LENGTH,
    'eval_batch_size': HOST, 'check_every_steps': HOST, 'stream_chunk_steps': HOST,
    'checkpoint_every_steps': HOST, 'max_checkpoints_to_keep': HOST,
    'compile_cache_dir': HOST, 'profile_steps': HOST,
    'data.data_dir': PLACE, 'data.manual_dir': PLACE, 'data.download': PLACE,
    'distributed.coordinator_address': PLACE, 'distributed.num_processes': PLACE,
    'distributed.process_id': PLACE,
    'tensorboard': DISPLAY, 'progress': DISPLAY,
}


def flat(config, prefix: str = '') -> dict[str, Any]:
  """{'data.shuffle_buffer': 60000, ...}: every leaf field of a ConfigDict (or dict), tuples
  as lists (as JSON stores them)."""
  out = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      out.update(flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = list(value) if isinstance(value, (tuple, list)) else value
  return out


# Fields of earlier versions, none of which shaped the numbers: a saved run may hold them.
RETIRED = ('loop_unroll',)


def with_role(config, *roles: str) -> dict[str, Any]:
  """The fields of `config` that have one of `roles` (KeyError for a field without a role)."""
  return {name: value for name, value in flat(config).items() if ROLES[name] in roles}


def resume_fingerprint(config, devices: int = 1, processes: int = 1) -> dict[str, Any]:
  """What a checkpoint records and a resume must match: the NUMBERS fields, and the device and
  process counts (they change the order of the sums, hence the numbers). shuffle_buffer only
  orders the tfds mode's data, so the other modes leave it out (any value resumes them)."""
  fields = with_role(config, NUMBERS)
  if config.input_mode != 'tfds':
    del fields['data.shuffle_buffer']
  return {**fields, 'devices': devices, 'processes': processes}


def _text(value) -> str:
  """A value as a workdir name shows it: '(256, 128)' -> '256_128'; 1e-3 and 0.001 alike."""
  if isinstance(value, list):
    return '_'.join(_text(v) for v in value) or 'none'
  return re.sub(r'[^\w.+-]', '', str(value))


def default_workdir(config_path: str, config, devices: int, processes: int) -> str:
  """workdirs/<config file name>[,<field=value>...][,<N>devices][,<P>processes]: 'field=value'
  for each NUMBERS or LENGTH field where `config` differs from the config file's own values, in
  alphabetical order. Equal values add nothing, however spelt: equal configs share a folder."""
  now = with_role(config, NUMBERS, LENGTH)
  before = with_role(load(config_path), NUMBERS, LENGTH)
  parts = [os.path.splitext(os.path.basename(config_path))[0]]
  parts += [f'{name}={_text(value)}' for name, value in now.items() if value != before.get(name)]
  if devices != 1:
    parts.append(f'{devices}devices')
  if processes != 1:
    parts.append(f'{processes}processes')
  return os.path.join('workdirs', ','.join(parts))


# Validation --------------------------------------------------------------------------------------

# JAX takes seeds as signed 64-bit integers; steps.init_state seeds model k with seed + k and the
# data order with seed + 1_000_003, so the largest usable seed leaves room for both.
SEED_LIMIT = 2**63 - 1
DATA_SEED_OFFSET = 1_000_003


@functools.lru_cache(maxsize=1)
def _base():
  """configs/base.py, the only home of the defaults the messages suggest (None without it, as in
  an installed wheel)."""
  try:
    return base()
  except UserError:
    return None


def example(name: str) -> str:
  """'; e.g. --config.<name>=<its value in configs/base.py>', or '' without the base config."""
  base = _base()
  if base is None:
    return ''
  value = base[name]
  if isinstance(value, (tuple, list)):
    value = f"'{tuple(value)!r}'"
  return f'; e.g. --config.{name}={value}'


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# field -> (whether a value is acceptable, what it must be), checked in this order by `_require`.
RULES = {
    **{name: (lambda v: _is_int(v) and v > 0, 'a positive number') for name in (
        'num_epochs', 'batch_size', 'eval_batch_size', 'num_models', 'max_checkpoints_to_keep',
        'stream_chunk_steps')},
    'hidden_sizes': (lambda v: all(_is_int(s) and s > 0 for s in v), 'positive integers'),
    'num_classes': (lambda v: v == NUM_CLASSES,
                    f'{NUM_CLASSES} (Fashion-MNIST has {NUM_CLASSES} classes)'),
    **{name: (lambda v: _is_int(v) and v >= 0, f'0 ({zero}) or a positive number of steps')
       for name, zero in (('check_every_steps', 'once per epoch'),
                          ('checkpoint_every_steps', 'at epoch ends only'),
                          ('profile_steps', 'off'))},
    'compile_cache_dir': (lambda v: isinstance(v, str), "a folder, 'auto' or '' (off)"),
    # nan, inf and 0 make Adam's update nan; a decay rate of 1 or more never forgets (and / 0).
    **{name: (lambda v: _is_finite(v) and v > 0, 'a finite number above 0')
       for name in ('learning_rate', 'eps')},
    **{name: (lambda v: _is_finite(v) and 0 <= v < 1, 'a number from 0 up to (not including) 1')
       for name in ('b1', 'b2')},
}
# field -> its allowed values; a message suggests the first.
CHOICES = {'model': ('mlp',), 'input_mode': ('device', 'stream', 'tfds'), 'optimizer': ('adam',),
           'compute_dtype': ('float32', 'bfloat16')}


def _require(ok: bool, name: str, value, what: str, example_of: str = '') -> None:
  """The one checker: unless `ok`, UserError '<name>=<value> must be <what>; e.g. <default>.'"""
  if not ok:
    shown = tuple(value) if isinstance(value, list) else value  # As the config file spells it.
    raise UserError(f'{name}={shown!r} must be {what}{example(example_of or name)}.')


def validate_config(config) -> None:
  """Raises UserError naming the first bad field and a value that works."""
  for name, (accepts, what) in RULES.items():
    _require(accepts(config[name]), name, config[name], what)
  if config.batch_size > NUM_TRAIN:
    raise UserError(f'batch_size={config.batch_size} is larger than the training set '
                    f'({NUM_TRAIN} examples); use at most --config.batch_size={NUM_TRAIN}.')
  for name, allowed in CHOICES.items():
    if config[name] not in allowed:
      raise UserError(f'unknown {name} {config[name]!r}; choose one of '
                      f'{", ".join(allowed)} (--config.{name}={allowed[0]}).')
  lrs = tuple(config.learning_rates)
  if lrs and len(lrs) != config.num_models:
    raise UserError(f'learning_rates has {len(lrs)} values for num_models={config.num_models}; '
                    'give one per model or none.')
  accepts, what = RULES['learning_rate']  # Each of learning_rates, as learning_rate.
  for i, lr in enumerate(lrs):
    _require(accepts(lr), f'learning_rates[{i}]', lr, what, 'learning_rate')
  highest = SEED_LIMIT - max(DATA_SEED_OFFSET, config.num_models - 1)
  _require(_is_int(config.seed) and 0 <= config.seed <= highest, 'seed', config.seed,
           f'an integer from 0 to {highest} (JAX takes 64-bit seeds)')


def check_divisible(batch_size: int, devices: int, where: str = '') -> None:
  """The global batch splits evenly over the devices (`where` names them: a TPU topology, ...), or
  one line saying which sizes do."""
  if batch_size % devices:
    lower = max(devices, batch_size // devices * devices)
    over = f'the {devices} devices of {where}' if where else f'{devices} devices'
    raise UserError(f'batch_size={batch_size} does not divide over {over}; use a multiple of '
                    f'{devices}, e.g. --config.batch_size={lower} or {lower + devices}'
                    f'{", or fewer devices" if where else ""}.')


# Sizes -------------------------------------------------------------------------------------------

# Bytes per parameter held for the whole run: the float32 parameters and Adam's two moments (mu,
# nu), whatever compute_dtype is (bfloat16 computes in bf16 but keeps f32 state).
STATE_BYTES_PER_PARAM = 3 * 4
# The resident train set of the 'device' mode: uint8 pixels and int32 labels.
RESIDENT_DATA_BYTES = NUM_TRAIN * (IMAGE_PIXELS + 4)


def param_count(config) -> int:
  """Parameters of one model: dense layers 784 -> hidden_sizes -> num_classes, with biases."""
  widths = (IMAGE_PIXELS, *config.hidden_sizes, config.num_classes)
  return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def _size(size: int) -> str:
  if size < 2**30:
    return f'{size / 2**20:,.1f} MiB'
  return f'{size / 2**30:,.1f} GiB'


def check_sizes(config, memory_bytes: int | None) -> None:
  """Refuses, in one line naming the field to change, a run whose state cannot fit in one device's
  `memory_bytes` (None checks nothing). That state (every model's float32 parameters and Adam
  moments, the 'device' mode's resident train set) is a lower bound: only what cannot run is
  refused."""
  if memory_bytes is None:
    return
  one_model = param_count(config) * STATE_BYTES_PER_PARAM
  data = RESIDENT_DATA_BYTES if config.input_mode == 'device' else 0
  needed = one_model * config.num_models + data
  if needed <= memory_bytes:
    return
  what = (f'needs {_size(needed)} ({param_count(config):,} parameters per model, held with '
          f'their Adam state in float32'
          + (f', x{config.num_models} models' if config.num_models > 1 else '')
          + (', plus the resident train set' if data else '')
          + f'), more than the {_size(memory_bytes)} of memory of one device')
  if data > memory_bytes:
    raise UserError(f'input_mode=device {what}; use --config.input_mode=stream, which keeps the '
                    'data in host memory.')
  if one_model + data <= memory_bytes:
    fit = max(1, (memory_bytes - data) // one_model)
    raise UserError(f'num_models={config.num_models} {what}; use at most '
                    f'--config.num_models={fit}.')
  raise UserError(f'hidden_sizes={tuple(config.hidden_sizes)} {what}; use smaller hidden '
                  f'layers{example("hidden_sizes")}.')


def device_memory_bytes() -> int | None:
  """One local device's memory (its allocator's limit; on a CPU, host_memory_bytes), or None when
  unknown. Initialises JAX's backend: call it after distributed.initialize."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}  # Some backends do not implement it.
  if stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  if device.platform != 'cpu':
    return None
  return host_memory_bytes()


def host_memory_bytes() -> int | None:
  """Physical memory, or the cgroup (v2) memory limit when it is lower; None when unknown."""
  try:
    memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    memory = None
  try:
    with open('/sys/fs/cgroup/memory.max', encoding='ascii') as f:
      limit = f.read().strip()
    if limit.isdigit():
      memory = min(int(limit), memory) if memory else int(limit)
  except OSError:
    pass
  return memory
