"""Command line: python -m fmnist_jax.train --config configs/base.py [--config.x=y] [--workdir DIR]

Only flag parsing lives here; the work is fmnist_jax.trainer.train_and_evaluate.
"""

import os

from absl import flags
from ml_collections import config_flags

from fmnist_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. configs/base.py; override fields with '
    '--config.num_epochs=10 etc.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output folder (checkpoints, metrics, summary, figures). Default: '
    'workdirs/<config file name>.')


def default_workdir() -> str:
  path = config_flags.get_config_filename(flags.FLAGS['config'])
  return os.path.join('workdirs', os.path.splitext(os.path.basename(path))[0])


def main(argv):
  del argv
  from fmnist_jax import trainer  # pylint: disable=g-import-not-at-top  (imports JAX)
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value or default_workdir())


if __name__ == '__main__':
  cli.run(main, config_flags_to_load=('config',))
