"""Config validation: every bad value is caught before anything is compiled or written.

`validate_config` checks each field on its own; `check_sizes` checks that the model, its Adam
state and the resident dataset fit the device's memory, by arithmetic on the config alone (no
array is allocated, nothing is compiled), so an impossible size is one line, not a hang.
"""

import functools
import math
import os

from fmnist_jax import idx
from fmnist_jax.errors import UserError

INPUT_MODES = ('device', 'stream', 'tfds')
MODELS = ('mlp',)
OPTIMIZERS = ('adam',)
DTYPES = ('float32', 'bfloat16')
TRAIN_EXAMPLES = idx.FILES['train'][2]
PIXELS = idx.IMAGE_SIZE * idx.IMAGE_SIZE

# JAX takes seeds as signed 64-bit integers; steps.init_state seeds model k with seed + k and the
# data order with seed + 1_000_003, so the largest usable seed leaves room for both.
SEED_LIMIT = 2**63 - 1
DATA_SEED_OFFSET = 1_000_003

# Bytes per parameter held for the whole run: the float32 parameters and Adam's two moments (mu,
# nu), whatever compute_dtype is (bfloat16 computes in bf16 but keeps f32 state).
STATE_BYTES_PER_PARAM = 3 * 4
# The resident train set of the 'device' mode: uint8 pixels and int32 labels.
RESIDENT_DATA_BYTES = TRAIN_EXAMPLES * (PIXELS + 4)


@functools.lru_cache(maxsize=1)
def _base():
  """configs/base.py, the only home of the defaults the messages suggest (None if absent, e.g.
  in an installed wheel without the configs/ folder)."""
  from fmnist_jax import config_files  # pylint: disable=g-import-not-at-top
  try:
    return config_files.base()
  except UserError:
    return None


def example(name: str) -> str:
  """' e.g. --config.<name>=<default from configs/base.py>', or '' without the base config."""
  base = _base()
  if base is None:
    return ''
  value = base
  for part in name.split('.'):
    value = value[part]
  if isinstance(value, (tuple, list)):
    value = f"'{tuple(value)!r}'"
  return f'; e.g. --config.{name}={value}'


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(config, name: str, kind=(int,)):
  value = config[name]
  if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
    raise UserError(f'{name}={value!r} must be a positive number{example(name)}.')


def _positive_finite(name: str, value, example_of: str) -> None:
  """A learning rate or eps: a finite number above 0 (nan, inf and 0 make Adam's update nan)."""
  if not _is_number(value) or not math.isfinite(value) or value <= 0:
    raise UserError(f'{name}={value!r} must be a finite number above 0{example(example_of)}.')


def _check_seed(config) -> None:
  seed = config.seed
  highest = SEED_LIMIT - max(DATA_SEED_OFFSET, config.num_models - 1)
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= highest:
    raise UserError(f'seed={seed!r} must be an integer from 0 to {highest} (JAX takes 64-bit '
                    f'seeds){example("seed")}.')


def _check_optimizer_numbers(config) -> None:
  _positive_finite('learning_rate', config.learning_rate, 'learning_rate')
  for i, lr in enumerate(tuple(config.learning_rates)):
    _positive_finite(f'learning_rates[{i}]', lr, 'learning_rate')
  for name in ('b1', 'b2'):  # Adam's decay rates: 1 or more never forgets, and divides by 0.
    value = config[name]
    if not _is_number(value) or not math.isfinite(value) or not 0 <= value < 1:
      raise UserError(f'{name}={value!r} must be a number from 0 up to (not including) 1'
                      f'{example(name)}.')
  _positive_finite('eps', config.eps, 'eps')


def validate_config(config) -> None:
  """Raises UserError naming the first bad field and a value that works."""
  for name in ('num_epochs', 'batch_size', 'eval_batch_size', 'num_models',
               'max_checkpoints_to_keep', 'stream_chunk_steps'):
    _positive(config, name)
  if config.batch_size > TRAIN_EXAMPLES:
    raise UserError(f'batch_size={config.batch_size} is larger than the training set '
                    f'({TRAIN_EXAMPLES} examples); use at most --config.batch_size='
                    f'{TRAIN_EXAMPLES}.')
  for name, allowed in (('model', MODELS), ('input_mode', INPUT_MODES),
                        ('optimizer', OPTIMIZERS), ('compute_dtype', DTYPES)):
    if config[name] not in allowed:
      raise UserError(f'unknown {name} {config[name]!r}; choose one of '
                      f'{", ".join(allowed)} (--config.{name}={allowed[0]}).')
  if config.num_classes != idx.NUM_CLASSES:
    raise UserError(f'num_classes={config.num_classes}, but Fashion-MNIST has '
                    f'{idx.NUM_CLASSES} classes; use --config.num_classes=10.')
  sizes = tuple(config.hidden_sizes)
  if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
    raise UserError(f'hidden_sizes={sizes} must be positive integers{example("hidden_sizes")}.')
  for name in ('check_every_steps', 'checkpoint_every_steps', 'profile_steps'):
    if not isinstance(config[name], int) or config[name] < 0:
      raise UserError(f'{name}={config[name]!r} must be 0 (once per epoch) or a positive '
                      'number of steps.')
  if not isinstance(config.compile_cache_dir, str):
    raise UserError(f'compile_cache_dir={config.compile_cache_dir!r} must be a folder, \'auto\' '
                    "or '' (off).")
  lrs = tuple(config.learning_rates)
  if lrs and len(lrs) != config.num_models:
    raise UserError(f'learning_rates has {len(lrs)} values for num_models={config.num_models}; '
                    'give one per model or none.')
  _check_optimizer_numbers(config)
  _check_seed(config)


# Sizes -------------------------------------------------------------------------------------------


def param_count(config) -> int:
  """Parameters of one model: dense layers 784 -> hidden_sizes -> num_classes, with biases."""
  widths = (PIXELS, *config.hidden_sizes, config.num_classes)
  return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def _size(size: int) -> str:
  if size < 2**30:
    return f'{size / 2**20:,.1f} MiB'
  return f'{size / 2**30:,.1f} GiB'


def check_sizes(config, memory_bytes: int | None) -> None:
  """Refuses, in one line naming the field to change, a run whose state cannot fit in memory.

  Counts what the run keeps on one device for its whole life: every model's float32 parameters
  and Adam moments (3 x 4 bytes per parameter) and, in the 'device' input mode, the resident
  train set. It is a lower bound (activations and gradients come on top), so it refuses only
  what cannot possibly run, before anything is allocated, compiled or written.

  Args:
    config: a config that passed validate_config.
    memory_bytes: one device's memory (device_memory_bytes()); None checks nothing.
  """
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
  """The memory of one local device: its allocator's limit on an accelerator; on a CPU the
  host's physical memory (or the container's cgroup limit, if lower); None when unknown.

  Initialises JAX's backend: call it after distributed.initialize.
  """
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
