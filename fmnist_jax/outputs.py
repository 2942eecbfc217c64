"""What a training run tells the world: progress lines, metrics.jsonl, summary.json, TensorBoard.

Only process 0 writes and prints (`Outputs(main=False)` does nothing), so a multi-process run
produces one set of outputs.
"""

import sys

import numpy as np

from fmnist_jax import workdir as workdir_lib


class Outputs:
  """The run's outputs in `workdir`: one object, created once per run."""

  def __init__(self, workdir: str, config, main: bool):
    self.workdir = workdir
    self.config = config
    self.main = main
    self.tty = sys.stdout.isatty()
    self._tensorboard = None

  def log(self, message: str, end: str = '\n') -> None:
    if self.main and self.config.progress:
      print(message, end=end, flush=True)

  def _path(self, name: str) -> str:
    return workdir_lib.path(self.workdir, name)

  def start(self, history: list[dict]) -> None:
    """Writes config.json and makes metrics.jsonl agree with the checkpoint the run continues."""
    if not self.main:
      return
    workdir_lib.write_json(self._path(workdir_lib.CONFIG), self.config.to_dict())
    workdir_lib.write_json_lines(self._path(workdir_lib.METRICS), history)

  def progress(self, epoch: int, done: int, total: int, seconds: float) -> None:
    if self.tty:
      self.log('\r' + progress_bar(epoch, self.config.num_epochs, done, total, seconds), end='')

  def epoch(self, entry: dict, steps_per_epoch: int) -> None:
    """Appends the epoch to metrics.jsonl and TensorBoard and prints its line."""
    if not self.main:
      return
    workdir_lib.append_json_line(self._path(workdir_lib.METRICS), entry)
    writer = self._writer()
    if writer:
      step = entry['epoch']
      for split in ('train', 'test'):
        for name in ('loss', 'accuracy'):
          writer.add_scalar(f'{name}/{split}', entry[f'{split}_{name}'], step)
      if entry['steps_per_second']:
        writer.add_scalar('steps_per_second', entry['steps_per_second'], step)
      writer.flush()
    self.log(('\r' if self.tty else '') + epoch_line(entry, self.config.num_epochs,
                                                     steps_per_epoch))

  def prediction_images(self, images, probs, labels, step: int) -> None:
    """The tutorial's 15 predictions as a TensorBoard image, drawn without matplotlib."""
    writer = self._writer()
    if writer:
      writer.add_image('predictions', prediction_strip(images, probs, labels), step,
                       dataformats='HWC')
      writer.flush()

  def finish(self, summary: dict) -> None:
    if self.main:
      workdir_lib.write_json(self._path(workdir_lib.SUMMARY), summary)
    self.log(result_line(summary))

  def close(self) -> None:
    if self._tensorboard:
      self._tensorboard.close()
      self._tensorboard = None

  def _writer(self):
    if not (self.config.tensorboard and self.main):
      return None
    if self._tensorboard is None:
      self._tensorboard = tensorboard_writer(self._path(workdir_lib.TENSORBOARD))
    return self._tensorboard


def tensorboard_writer(logdir: str):
  """A tensorboardX SummaryWriter, imported without PyTorch.

  tensorboardX imports torch (about a second) only to recognise torch tensors; we pass numpy.
  """
  blocked = 'torch' not in sys.modules
  if blocked:
    sys.modules['torch'] = None  # Makes `import torch` raise ImportError, which it handles.
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    if blocked:
      del sys.modules['torch']
  return tensorboardX.SummaryWriter(logdir)


def prediction_strip(images, probs, labels, scale: int = 3):
  """uint8 [H, W, 3]: each image framed blue (right) or red (wrong), bars of its 10 probabilities.

  A cheap stand-in for the matplotlib grid (which costs most of a second to draw) for TensorBoard.
  """
  tiles = []
  for image, p, label in zip(images, probs, labels):
    right = int(np.argmax(p)) == int(label)
    color = np.array([31, 119, 180] if right else [214, 39, 40], np.uint8)
    tile = np.full((34, 30, 3), 255, np.uint8)
    tile[:30] = color
    tile[1:29, 1:29] = (255 - image)[..., None]
    bars = np.full((4, 30, 3), 255, np.uint8)
    for k in range(10):
      height = int(round(4 * float(p[k])))
      if height:
        bars[4 - height:, 3 * k:3 * k + 2] = color if k == int(np.argmax(p)) else 120
    tile[30:] = bars
    tiles.append(tile)
  strip = np.concatenate(tiles, axis=1)
  return strip.repeat(scale, axis=0).repeat(scale, axis=1)


def progress_bar(epoch: int, num_epochs: int, done: int, total: int, seconds: float,
                 width: int = 30) -> str:
  filled = width * done // total
  bar = ('=' * filled + ('>' if filled < width else '')).ljust(width, '.')
  return f'Epoch {epoch + 1}/{num_epochs} {done}/{total} [{bar}] {seconds:.1f}s'


def epoch_line(entry: dict, num_epochs: int, steps_per_epoch: int) -> str:
  """A Keras-like line: bar, seconds, steps/s, train and test loss and accuracy."""
  rate = f'{entry["steps_per_second"]:.0f} steps/s' if entry['steps_per_second'] else ''
  bar = progress_bar(entry['epoch'] - 1, num_epochs, steps_per_epoch, steps_per_epoch,
                     entry['seconds'])
  models = ' (mean of models)' if 'per_model' in entry else ''
  return (f'{bar} {rate} - loss: {entry["train_loss"]:.4f} - accuracy: '
          f'{entry["train_accuracy"]:.4f} - test_loss: {entry["test_loss"]:.4f} - test_accuracy: '
          f'{entry["test_accuracy"]:.4f}{models}')


def devices_text(summary: dict) -> str:
  processes = summary.get('processes', 1)
  hosts = f' in {processes} processes' if processes > 1 else ''
  return f'{summary["devices"]} {summary["backend"]} device(s){hosts}'


def result_line(summary: dict) -> str:
  """The result: accuracy (mean and ensemble with several models), time and devices."""
  timing = (f'{summary["steps"]} steps, training {summary["train_seconds"]:.2f} s, compile '
            f'{summary["compile_seconds"]:.2f} s')
  if summary.get('total_seconds') is not None:
    timing += f', total {summary["total_seconds"]:.2f} s'
  if 'models' in summary:
    m = summary['models']
    return (f'Test accuracy of {summary["num_models"]} models: mean {m["test_accuracy_mean"]:.4f}'
            f' (std {m["test_accuracy_std"]:.4f}, min {m["test_accuracy_min"]:.4f}, max '
            f'{m["test_accuracy_max"]:.4f}), ensemble {m["ensemble_test_accuracy"]:.4f}  mean test '
            f'loss: {summary["test_loss"]:.4f}  ({timing}, {devices_text(summary)})')
  return (f'Test accuracy: {summary["test_accuracy"]:.4f}  test loss: {summary["test_loss"]:.4f}'
          f'  ({timing}, {devices_text(summary)})')


def finished_line(workdir: str, summary: dict) -> str:
  return (f'{workdir} holds a finished run of {summary["steps"]} steps on '
          f'{devices_text(summary)}; not retraining (use --config.fresh=True or another '
          '--workdir to train again).')
