"""The tutorial's data exploration: shapes, labels, pixel range, per-class counts and figures.

    python -m fmnist_jax.explore --workdir workdirs/base [--config configs/base.py]

Prints the summary and writes figures under <workdir>/figures/ (or --figures_dir): three training
images with a colorbar, the 5x5 grid with class names, and training_curves.png when the workdir has
a run. Nothing else in the workdir is read or written.
"""

if __name__ == '__main__':  # The command's first instruction: Ctrl-C and SIGTERM are caught.
  from fmnist_jax.run import signals
  signals.install()
# pylint: disable=g-import-not-at-top,wrong-import-position

import os

import numpy as np
from absl import flags
from ml_collections import config_flags

from fmnist_jax import CLASS_NAMES
from fmnist_jax import cli
from fmnist_jax import config as config_lib
from fmnist_jax import data
from fmnist_jax.run import outputs
from fmnist_jax.run import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config whose data fields to use; default: the workdir\'s config.json, '
    'else configs/base.py defaults.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/base',
                                'A workdir: its config.json gives the data fields, figures go to '
                                'its figures/ folder.')
_FIGURES_DIR = flags.DEFINE_string('figures_dir', None,
                                   'Where figures go; default: <workdir>/figures.')


def print_summary(arrays) -> None:
  """Prints the numbers the tutorial prints, and the images per class."""
  train, test = arrays['train'], arrays['test']
  print(f'train_images.shape: {train["image"].shape}  ({train["image"].dtype})')
  print(f'len(train_labels): {len(train["label"])}')
  print(f'train_labels: {train["label"][:10].tolist()} ...')
  print(f'test_images.shape: {test["image"].shape}')
  print(f'len(test_labels): {len(test["label"])}')
  print(f'pixel values: {train["image"].min()} to {train["image"].max()} '
        '(divide by 255 for [0, 1])')
  train_counts = np.bincount(train['label'], minlength=10)
  test_counts = np.bincount(test['label'], minlength=10)
  print(f'{"class":12s} {"train":>6s} {"test":>6s}')
  for name, in_train, in_test in zip(CLASS_NAMES, train_counts, test_counts):
    print(f'{name:12s} {in_train:6d} {in_test:6d}')


def write_figures(arrays, workdir: str, out: str) -> list[str]:
  """Writes the tutorial's data figures (and the training curves, if any) into `out`."""
  from fmnist_jax import plots  # pylint: disable=g-import-not-at-top  (matplotlib)
  images, labels = arrays['train']['image'], arrays['train']['label']
  paths = []
  for name, i in (('first', 0), ('middle', len(labels) // 2), ('last', len(labels) - 1)):
    fig = plots.image_with_colorbar(images[i], f'train #{i}: {CLASS_NAMES[labels[i]]}')
    paths.append(plots.save(fig, out, f'train_image_{name}'))
  paths.append(plots.save(plots.image_grid(images, labels), out, 'train_grid_5x5'))
  curves = plots.training_curves_figure(workdir, out)
  if curves:
    paths.append(curves)
  return paths


def data_config(workdir: str, config=None):
  """The data fields: `config`'s, else the workdir's config.json's, else configs/base.py's."""
  if config is not None:
    return config.data
  if not os.path.lexists(workdir_lib.path(workdir, workdir_lib.CONFIG)):
    return config_lib.base().data
  return outputs.read_config(workdir).data


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value)
  arrays = data.load(data_config(workdir, _CONFIG.value), verbose=True)
  print_summary(arrays)
  out = workdir_lib.figures_folder(workdir, _FIGURES_DIR.value or '')
  for path in write_figures(arrays, workdir, out) if out else []:
    print(f'wrote {path}')


if __name__ == '__main__':
  cli.run(main)
