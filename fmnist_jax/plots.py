"""The tutorial's figures and a few more. Each function takes arrays and returns a Figure, shown
inline in a notebook; the commands save them with `save()`. No pyplot: nothing needs a display."""

import io
import os
import sys

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from fmnist_jax import CLASS_NAMES
from fmnist_jax.run import workdir as workdir_lib
from fmnist_jax.errors import UserError

RIGHT, WRONG, NEUTRAL, LIGHT = 'tab:blue', 'tab:red', '#777777', '#bbbbbb'


def save(fig: Figure, directory: str, name: str) -> str:
  """Saves `fig` as <directory>/<name>.png (through a new temporary file: a link planted at that
  name is replaced, never followed) and returns the path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f'{name}.png')
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100, bbox_inches='tight')
  with workdir_lib.storage_errors(directory):  # A full disk is one line, as for the training.
    workdir_lib.write_atomic(path, buffer.getvalue())
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
  return save(training_curves(history), out, 'training_curves')


def _show(ax, image, title: str = '', **imshow) -> None:
  """An image without ticks."""
  ax.imshow(image, **imshow)
  ax.set(xticks=[], yticks=[], title=title)


def _show_picture(ax, picture, title: str = '') -> None:
  """A user's picture as it is: colour as colour, gray as gray (not the tutorial's binary map)."""
  gray = {'cmap': 'gray', 'vmin': 0, 'vmax': 255} if picture.ndim == 2 else {}
  _show(ax, picture, title, **gray)


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
    _show(ax, images[i], cmap='binary')
    ax.set_xlabel(CLASS_NAMES[int(labels[i])])
  fig.tight_layout()
  return fig


def _plot_image(ax, image, probs, true_label: int | None) -> None:
  """The 28x28 input, labelled 'predicted confidence% (true)': blue when right, red when wrong;
  without a true label, black."""
  predicted = int(np.argmax(probs))
  _show(ax, image, cmap='binary')
  label = f'{CLASS_NAMES[predicted]} {100 * np.max(probs):2.0f}%'
  if true_label is None:
    ax.set_xlabel(label, color='black')
  else:
    ax.set_xlabel(f'{label} ({CLASS_NAMES[true_label]})',
                  color=RIGHT if predicted == true_label else WRONG)


def _plot_bars(ax, probs, true_label: int | None, names: bool = False) -> None:
  """The 10 confidences: the true class blue, a wrong prediction red; without a true label, the
  prediction gray among lighter bars (nothing says whether it is right)."""
  predicted = int(np.argmax(probs))
  bars = ax.bar(range(10), probs, color=LIGHT if true_label is None else NEUTRAL)
  ax.set_ylim(0, 1)
  if true_label is None:
    bars[predicted].set_color(NEUTRAL)
  else:
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
      (matrix, 'Confusion matrix (counts)', '.0f'),
      (normalised, 'Row-normalised (fraction of each true class)', '.2f'))):
    ax = fig.add_subplot(1, 2, k + 1)
    ax.imshow(values, cmap='Blues')
    ax.set_xticks(range(10), CLASS_NAMES, rotation=45, ha='right')
    ax.set_yticks(range(10), CLASS_NAMES)
    ax.set(xlabel='predicted', ylabel='true', title=title)
    top = values.max()
    for (i, j), v in np.ndenumerate(values):
      ax.text(j, i, format(v, fmt), ha='center', va='center', fontsize=7,
              color='white' if v > top / 2 else 'black')
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


def file_prediction(original, converted, probs, true_label: int | None = None,
                    title: str = '') -> Figure:
  """A file's picture, the 28x28 input it became, and the model's 10-class bars, drawn as the
  tutorial's plot_image/plot_value_array."""
  fig = Figure(figsize=(10, 3.2))
  true_label = None if true_label is None else int(true_label)
  _show_picture(fig.add_subplot(1, 3, 1), np.asarray(original), title or 'your picture')
  _plot_image(fig.add_subplot(1, 3, 2), converted, probs, true_label)
  _plot_bars(fig.add_subplot(1, 3, 3), probs, true_label, names=True)
  fig.axes[1].set_title('what the model saw (28x28)')
  fig.tight_layout()
  return fig


def conversion_steps(steps) -> Figure:
  """One panel per step of `images.conversion_steps`: picture -> ... -> 28x28 input."""
  fig = Figure(figsize=(2.6 * len(steps), 2.9))
  for k, (name, array) in enumerate(steps):
    ax = fig.add_subplot(1, len(steps), k + 1)
    array = np.asarray(array)
    if k == 0:
      _show_picture(ax, np.clip(array, 0, 255).astype(np.uint8), name)
    else:
      _show(ax, array, name, cmap='gray', vmin=0, vmax=1 if array.dtype == bool else 255)
    ax.set_xlabel(f'{array.shape[1]}x{array.shape[0]}', fontsize=8)
  fig.tight_layout()
  return fig


def robustness(results: dict) -> Figure:
  """Accuracy per photo family as bars, the untouched test images' accuracy as a line."""
  names = [f for f in results if f != 'untouched']
  acc = [results[f]['accuracy'] for f in names]
  fig = Figure(figsize=(10, 4))
  ax = fig.add_subplot()
  ax.bar(range(len(names)), acc, color=RIGHT)
  if 'untouched' in results:
    untouched = results['untouched']['accuracy']
    ax.axhline(untouched, color='black', lw=1, label=f'untouched test images ({untouched:.3f})')
    ax.axhline(untouched - 0.05, color='black', lw=1, ls=':', label='5 points below')
  for i, a in enumerate(acc):
    ax.text(i, a + 0.01, f'{a:.2f}', ha='center', fontsize=8)
  count = next(iter(results.values()))['count']
  ax.set_xticks(range(len(names)), names, rotation=30, ha='right')
  ax.set(ylim=(0, 1.12), ylabel='accuracy',
         title=f'Test images as photos: accuracy per family ({count} images each)')
  ax.legend(loc='upper left', ncol=3, fontsize=8)
  fig.tight_layout()
  return fig


def robustness_examples(examples: dict) -> Figure:
  """For each family a few photos made from test images, each beside the 28x28 input it became."""
  per = max(len(v) for v in examples.values())
  fig = Figure(figsize=(2.2 * per * 2, 1.5 * len(examples)))
  for row, (family, pairs) in enumerate(examples.items()):
    for k, (picture, converted) in enumerate(pairs):
      ax = fig.add_subplot(len(examples), 2 * per, row * 2 * per + 2 * k + 1)
      _show_picture(ax, picture)
      if k == 0:
        ax.set_ylabel(family, rotation=0, ha='right', va='center', fontsize=8)
      _show(fig.add_subplot(len(examples), 2 * per, row * 2 * per + 2 * k + 2), converted,
            cmap='binary')
  fig.tight_layout()
  return fig
