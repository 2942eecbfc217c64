"""Command line: python -m fmnist_jax.train --config configs/base.py [--config.x=y] [--workdir DIR]
[--fresh]

Only flag parsing lives here; the work is fmnist_jax.loop.train_and_evaluate. Without --workdir
the workdir is named after the config (config.default_workdir): the same config resumes its run,
another never reuses it.
"""

if __name__ == '__main__':  # The command's first instruction: Ctrl-C and SIGTERM are caught.
  from fmnist_jax.run import signals
  signals.install()
# pylint: disable=g-import-not-at-top,wrong-import-position

from absl import flags
from ml_collections import config_flags

from fmnist_jax import cli
from fmnist_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. configs/base.py; override fields with '
    '--config.num_epochs=10 etc.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output folder (checkpoints, metrics, summary, figures). Default: derived '
    'from the config, e.g. workdirs/base or workdirs/base,num_epochs=10.')
_FRESH = flags.DEFINE_bool(
    'fresh', False, "Delete the workdir's checkpoints (and damaged ones) first and start over.")


def main(argv):
  del argv
  # JAX is imported here, not above, so that --help and flag errors stay instant.
  from fmnist_jax import distributed, loop  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value
  if not workdir:
    distributed.initialize(_CONFIG.value.distributed)  # Before the device count is read.
    import jax  # pylint: disable=g-import-not-at-top
    workdir = config_lib.default_workdir(
        config_flags.get_config_filename(flags.FLAGS['config']), _CONFIG.value,
        jax.device_count(), jax.process_count())
  loop.train_and_evaluate(_CONFIG.value, workdir, fresh=_FRESH.value)


if __name__ == '__main__':
  cli.run(main, config_flags_to_load=('config',))
