"""The tutorial's figures and a few more. Each function takes arrays and returns a Figure.

Usable inline in a notebook; the CLIs save them with `save()` under a headless backend.
"""

import os
import sys

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from fmnist_jax import CLASS_NAMES
from fmnist_jax import workdir as workdir_lib
from fmnist_jax.errors import UserError

RIGHT, WRONG, NEUTRAL = 'tab:blue', 'tab:red', '#777777'


def save(fig: Figure, directory: str, name: str) -> str:
  """Saves `fig` as <directory>/<name>.png and returns the path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f'{name}.png')
  fig.savefig(path, dpi=100, bbox_inches='tight')
  return path


def use_headless_backend() -> None:
  matplotlib.use('Agg')


def training_curves_figure(workdir: str, out: str) -> str | None:
  """Saves training_curves.png in `out` from the workdir's metrics.jsonl; None (with a note when
  the file is damaged) when there is no usable history."""
  try:
    history = workdir_lib.read_metrics(workdir_lib.path(workdir, workdir_lib.METRICS),
                                       'the next training run rewrites it from its checkpoint')
  except UserError as e:
    print(f'note: no training curves: {e}', file=sys.stderr, flush=True)
    return None
  if not history:
    return None
  use_headless_backend()
  return save(training_curves(history), out, 'training_curves')


def image_with_colorbar(image: np.ndarray, title: str = '') -> Figure:
  """One image with a colorbar showing the 0-255 pixel range (the tutorial's first figure)."""
  fig = Figure(figsize=(4, 3.5))
  ax = fig.add_subplot()
  shown = ax.imshow(image, cmap='viridis', vmin=0, vmax=255)
  fig.colorbar(shown, ax=ax)
  ax.grid(False)
  ax.set_title(title)
  return fig


def image_grid(images: np.ndarray, labels: np.ndarray, rows: int = 5, cols: int = 5) -> Figure:
  """The first rows*cols images with their class names (the tutorial's 5x5 grid)."""
  fig = Figure(figsize=(2 * cols, 2 * rows))
  for i in range(min(rows * cols, len(images))):
    ax = fig.add_subplot(rows, cols, i + 1)
    ax.imshow(images[i], cmap='binary')
    ax.set(xticks=[], yticks=[])
    ax.set_xlabel(CLASS_NAMES[int(labels[i])])
  fig.tight_layout()
  return fig


def _plot_image(ax, image, probs, true_label):
  predicted = int(np.argmax(probs))
  ax.imshow(image, cmap='binary')
  ax.set(xticks=[], yticks=[])
  color = RIGHT if predicted == true_label else WRONG
  ax.set_xlabel(f'{CLASS_NAMES[predicted]} {100 * np.max(probs):2.0f}% '
                f'({CLASS_NAMES[true_label]})', color=color)


def _plot_bars(ax, probs, true_label, names=False):
  predicted = int(np.argmax(probs))
  bars = ax.bar(range(10), probs, color=NEUTRAL)
  ax.set_ylim(0, 1)
  bars[predicted].set_color(WRONG)
  bars[true_label].set_color(RIGHT)  # Blue wins when the prediction is right.
  if names:
    ax.set_xticks(range(10), CLASS_NAMES, rotation=45, ha='right')
  else:
    ax.set_xticks(range(10))
    ax.set_yticks([])


def prediction(image, probs, true_label: int) -> Figure:
  """Image i with 'predicted confidence% (true)' and its 10-class confidence bars."""
  fig = Figure(figsize=(6, 3))
  _plot_image(fig.add_subplot(1, 2, 1), image, probs, int(true_label))
  _plot_bars(fig.add_subplot(1, 2, 2), probs, int(true_label))
  fig.tight_layout()
  return fig


def prediction_grid(images, probs, labels, rows: int = 5, cols: int = 3) -> Figure:
  """The first rows*cols test images, each beside its confidence bars (the tutorial's grid)."""
  fig = Figure(figsize=(2 * 2 * cols, 2 * rows))
  for i in range(min(rows * cols, len(images))):
    _plot_image(fig.add_subplot(rows, 2 * cols, 2 * i + 1), images[i], probs[i], int(labels[i]))
    _plot_bars(fig.add_subplot(rows, 2 * cols, 2 * i + 2), probs[i], int(labels[i]))
  fig.tight_layout()
  return fig


def single_prediction_bars(probs, true_label: int) -> Figure:
  """One image's confidences with class names on the x axis, rotated 45 degrees."""
  fig = Figure(figsize=(6, 3.5))
  _plot_bars(fig.add_subplot(), probs, int(true_label), names=True)
  fig.tight_layout()
  return fig


def confusion_matrix(matrix: np.ndarray) -> Figure:
  """Counts and row-normalised (recall per true class) confusion matrices side by side."""
  fig = Figure(figsize=(15, 6.5))
  normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  for k, (values, title, fmt) in enumerate((
      (matrix, 'Confusion matrix (counts)', '{:d}'),
      (normalised, 'Row-normalised (fraction of each true class)', '{:.2f}'))):
    ax = fig.add_subplot(1, 2, k + 1)
    ax.imshow(values, cmap='Blues')
    ax.set_xticks(range(10), CLASS_NAMES, rotation=45, ha='right')
    ax.set_yticks(range(10), CLASS_NAMES)
    ax.set(xlabel='predicted', ylabel='true', title=title)
    top = values.max()
    for i in range(10):
      for j in range(10):
        v = values[i, j]
        ax.text(j, i, fmt.format(int(v) if fmt == '{:d}' else v), ha='center', va='center',
                fontsize=7, color='white' if v > top / 2 else 'black')
  fig.tight_layout()
  return fig


def confident_mistakes(images, probs, labels, rows: int = 3, cols: int = 5) -> Figure:
  """The wrong predictions made with the highest confidence."""
  predicted = probs.argmax(axis=1)
  wrong = np.flatnonzero(predicted != labels)
  order = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:rows * cols]
  fig = Figure(figsize=(2.2 * cols, 2.4 * rows))
  for k, i in enumerate(order):
    ax = fig.add_subplot(rows, cols, k + 1)
    _plot_image(ax, images[i], probs[i], int(labels[i]))
    ax.set_title(f'test #{i}', fontsize=8)
  fig.suptitle('Most confident mistakes: predicted confidence% (true class)')
  fig.tight_layout()
  return fig


def training_curves(history: list[dict]) -> Figure:
  """Loss and accuracy per epoch, train vs test, from metrics.jsonl entries."""
  epochs = [h['epoch'] for h in history]
  fig = Figure(figsize=(10, 4))
  for k, name in enumerate(('loss', 'accuracy')):
    ax = fig.add_subplot(1, 2, k + 1)
    ax.plot(epochs, [h[f'train_{name}'] for h in history], 'o-', label='train')
    ax.plot(epochs, [h[f'test_{name}'] for h in history], 's-', label='test')
    ax.set(xlabel='epoch', ylabel=name, title=name.capitalize())
    ax.set_xticks(epochs)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  return fig
