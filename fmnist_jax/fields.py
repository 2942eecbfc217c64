"""What each config field is for: one table, read by resume checks and workdir names.

Roles:
  NUMBERS  shapes the trained numbers: a resume must use the same value (checked against the
           checkpoint's record), and a value other than the config file's names the workdir.
  LENGTH   how long to train: names the workdir; a resume may extend it (num_epochs).
  HOST     steers only the host (how often to check, save, transfer; compilation): the same
           numbers whatever the value, so neither checked nor named.
  PLACE    says where data, caches and other processes are.
  DISPLAY  what is printed or drawn.
A new config field must be added here: `role()` refuses unknown ones, and a test checks that
every field of configs/base.py has a role.
"""

import re
from typing import Any

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


def flat(config) -> dict[str, Any]:
  """{'data.shuffle_buffer': 60000, ...}: every leaf field of a ConfigDict (or dict), tuples
  as lists (as JSON stores them)."""
  out = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f'{prefix}{key}'
      if hasattr(value, 'items'):
        walk(f'{name}.', value)
      else:
        out[name] = list(value) if isinstance(value, (tuple, list)) else value
  walk('', config)
  return out


def role(name: str) -> str:
  if name not in ROLES:
    raise KeyError(f'config field {name!r} has no role in fmnist_jax/fields.py')
  return ROLES[name]


def with_role(config, *roles: str) -> dict[str, Any]:
  """The fields of `config` that have one of `roles`."""
  return {name: value for name, value in flat(config).items() if role(name) in roles}


def resume_fingerprint(config) -> dict[str, Any]:
  """The NUMBERS fields a checkpoint records and a resume must match. shuffle_buffer only orders
  the tfds mode's data, so the other modes leave it out (any value resumes them)."""
  fields = with_role(config, NUMBERS)
  if config.input_mode != 'tfds':
    del fields['data.shuffle_buffer']
  return fields


def _text(value) -> str:
  """A value as a workdir name shows it: '(256, 128)' -> '256_128'; 1e-3 and 0.001 alike."""
  if isinstance(value, list):
    return '_'.join(_text(v) for v in value) or 'none'
  return re.sub(r'[^\w.+-]', '', str(value))


def name_parts(config, file_config) -> list[str]:
  """'field=value' for each NUMBERS or LENGTH field where `config` differs from `file_config`
  (the config file's own values), in alphabetical order. Equal values add nothing, whatever the
  spelling of the override."""
  now, before = with_role(config, NUMBERS, LENGTH), with_role(file_config, NUMBERS, LENGTH)
  return [f'{name}={_text(value)}' for name, value in now.items() if value != before.get(name)]
