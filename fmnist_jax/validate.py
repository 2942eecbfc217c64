"""Config validation: every bad value is caught before anything is compiled or written."""

from fmnist_jax import idx
from fmnist_jax.errors import UserError

INPUT_MODES = ('device', 'stream', 'tfds')
MODELS = ('mlp',)
OPTIMIZERS = ('adam',)
DTYPES = ('float32', 'bfloat16')
TRAIN_EXAMPLES = idx.FILES['train'][2]


def _positive(config, name: str, kind=(int,)):
  value = config[name]
  if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
    raise UserError(f'{name}={value!r} must be a positive number; e.g. --config.{name}='
                    f'{_EXAMPLES[name]}.')


_EXAMPLES = {'num_epochs': 5, 'batch_size': 32, 'eval_batch_size': 1000, 'learning_rate': 0.001,
             'num_models': 1, 'max_checkpoints_to_keep': 2, 'loop_unroll': 4, 'num_classes': 10,
             'stream_chunk_steps': 256}


def validate_config(config) -> None:
  """Raises UserError naming the first bad field and a value that works."""
  for name in ('num_epochs', 'batch_size', 'eval_batch_size', 'num_models',
               'max_checkpoints_to_keep', 'loop_unroll', 'stream_chunk_steps'):
    _positive(config, name)
  _positive(config, 'learning_rate', (int, float))
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
    raise UserError(f'hidden_sizes={sizes} must be positive integers, e.g. '
                    "--config.hidden_sizes='(128,)'.")
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
  if any(not isinstance(lr, (int, float)) or lr <= 0 for lr in lrs):
    raise UserError(f'learning_rates={lrs} must all be positive.')
