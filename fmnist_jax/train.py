"""Command line: python -m fmnist_jax.train --config configs/base.py [--config.x=y] [--workdir DIR]

Only flag parsing lives here; the work is fmnist_jax.trainer.train_and_evaluate.

Without --workdir, the workdir is derived from the command: workdirs/<config file name>, plus each
--config override that changes the result, plus the device count when it is not 1, e.g.
workdirs/base, workdirs/base,input_mode=tfds, workdirs/base,8devices. The same command lands in
the same workdir (and resumes); another command never reuses its finished run.
"""

import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from fmnist_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. configs/base.py; override fields with '
    '--config.num_epochs=10 etc.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output folder (checkpoints, metrics, summary, figures). Default: derived '
    'from the command, e.g. workdirs/base or workdirs/base,num_epochs=10.')

# Overrides that change where data comes from or what is shown, not the result: not in the name.
NEUTRAL_FIELDS = ('progress', 'tensorboard', 'fresh', 'compile_cache_dir', 'data.data_dir',
                  'data.manual_dir', 'data.download', 'distributed.coordinator_address',
                  'distributed.num_processes', 'distributed.process_id')


def overrides(argv: list[str]) -> list[str]:
  """The `field=value` of each --config.field override in `argv`, in order, last one winning."""
  found = {}
  for i, arg in enumerate(argv):
    match = re.fullmatch(r'--config\.([\w.]+)(?:=(.*))?', arg)
    if not match:
      continue
    value = match.group(2)
    if value is None:  # `--config.x value` (or a bare boolean flag).
      value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith('--') else 'True'
    found.pop(match.group(1), None)
    found[match.group(1)] = value
  return [f'{k}={v}' for k, v in found.items() if k not in NEUTRAL_FIELDS]


def default_workdir(config_path: str, argv: list[str], devices: int, processes: int) -> str:
  """workdirs/<config name>[,<override>...][,<N>devices][,<P>processes]."""
  parts = [os.path.splitext(os.path.basename(config_path))[0]]
  # '(256,128)' -> '256_128': commas separate the parts, brackets and quotes add nothing.
  parts += [re.sub(r'[^\w.=+-]', '', re.sub(r'[/,\s]+', '_', o)) for o in overrides(argv)]
  if devices != 1:
    parts.append(f'{devices}devices')
  if processes != 1:
    parts.append(f'{processes}processes')
  return os.path.join('workdirs', ','.join(parts))


def main(argv):
  del argv
  # JAX is imported here, not above, so that --help and flag errors stay instant.
  from fmnist_jax import distributed, trainer  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value
  if not workdir:
    distributed.initialize(_CONFIG.value.distributed)  # Before the device count is read.
    import jax  # pylint: disable=g-import-not-at-top
    workdir = default_workdir(config_flags.get_config_filename(flags.FLAGS['config']), sys.argv,
                              jax.device_count(), jax.process_count())
  trainer.train_and_evaluate(_CONFIG.value, workdir)


if __name__ == '__main__':
  cli.run(main, config_flags_to_load=('config',))
