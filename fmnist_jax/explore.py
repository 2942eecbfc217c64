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


def summarize(arrays) -> dict:
  """The numbers the tutorial prints, plus per-class counts."""
  train, test = arrays['train'], arrays['test']
  return {
      'train_images_shape': list(train['image'].shape), 'train_labels_count': len(train['label']),
      'train_labels_head': train['label'][:10].tolist(),
      'test_images_shape': list(test['image'].shape), 'test_labels_count': len(test['label']),
      'pixel_min': int(train['image'].min()), 'pixel_max': int(train['image'].max()),
      'dtype': str(train['image'].dtype),
      'train_per_class': dict(zip(CLASS_NAMES, np.bincount(train['label'], minlength=10).tolist())),
      'test_per_class': dict(zip(CLASS_NAMES, np.bincount(test['label'], minlength=10).tolist())),
  }


def write_figures(arrays, workdir: str, out: str) -> list[str]:
  """Writes the tutorial's data figures (and the training curves, if any) into `out`."""
  from fmnist_jax import plots  # pylint: disable=g-import-not-at-top  (matplotlib)
  plots.use_headless_backend()
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
  s = summarize(arrays)
  print(f'train_images.shape: {tuple(s["train_images_shape"])}  ({s["dtype"]})')
  print(f'len(train_labels): {s["train_labels_count"]}')
  print(f'train_labels: {s["train_labels_head"]} ...')
  print(f'test_images.shape: {tuple(s["test_images_shape"])}')
  print(f'len(test_labels): {s["test_labels_count"]}')
  print(f'pixel values: {s["pixel_min"]} to {s["pixel_max"]} (divide by 255 for [0, 1])')
  print(f'{"class":12s} {"train":>6s} {"test":>6s}')
  for name in CLASS_NAMES:
    print(f'{name:12s} {s["train_per_class"][name]:6d} {s["test_per_class"][name]:6d}')
  out = workdir_lib.figures_folder(workdir, _FIGURES_DIR.value or '')
  for path in write_figures(arrays, workdir, out) if out else []:
    print(f'wrote {path}')


if __name__ == '__main__':
  cli.run(main)
