"""What a training run tells the world: progress lines, metrics.jsonl, summary.json, TensorBoard,
profiler traces; and reading them back (read_summary, read_metrics).

Only process 0 writes and prints (`Outputs(main=False)` does nothing), so a multi-process run
produces one set of outputs. `progress` turns off the per-epoch lines, never the result line.
"""

import os
import sys
import time

import ml_collections
import numpy as np

from fmnist_jax import cli
from fmnist_jax import config as config_lib
from fmnist_jax.errors import UserError
from fmnist_jax.hardware import targets
from fmnist_jax.plan import OptimizerSpec
from fmnist_jax.run import workdir as workdir_lib

PREDICTIONS_SHOWN = 15  # The tutorial's grid of test images with their predictions.
# summary.json keys a finished run must have to be reported again instead of re-evaluated.
SUMMARY_KEYS = ('test_accuracy', 'test_loss', 'steps', 'devices', 'backend', 'train_seconds',
                'compile_seconds')


def read_summary(workdir: str, fix: str = 'run the training again') -> dict:
  """A finished run's summary.json (WorkdirError naming the file and `fix` if unusable)."""
  return workdir_lib.read_json(workdir_lib.path(workdir, workdir_lib.SUMMARY), fix, SUMMARY_KEYS)


def how_to_train(workdir: str) -> str:
  return (f'train one with: python -m fmnist_jax.train --config configs/base.py '
          f'--workdir {workdir}')


def read_config(workdir: str):
  """The run's config.json, validated like a config given on the command line (WorkdirError
  naming the file and the fix if unusable)."""
  path = workdir_lib.path(workdir, workdir_lib.CONFIG)
  fix = f'delete it and {how_to_train(workdir)} (the checkpoints are kept and resumed)'
  saved = workdir_lib.read_json(path, fix)
  for name in config_lib.RETIRED:
    saved.pop(name, None)
  unknown = [name for name in config_lib.flat(saved) if name not in config_lib.ROLES]
  if unknown:
    raise workdir_lib.WorkdirError(f'{path} holds fields this version does not know '
                                   f'({", ".join(unknown)}); {fix}.')
  try:
    config = ml_collections.ConfigDict(saved)
    config_lib.validate_config(config)
    return config
  except UserError as e:
    raise workdir_lib.WorkdirError(f'{path} holds a bad value ({e}); {fix}.') from None
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise workdir_lib.WorkdirError(f'{path} is not a config this version can use ({e}); '
                                   f'{fix}.') from None


def read_metrics(workdir: str, fix: str = 'run the training again') -> list[dict]:
  """The run's epochs from metrics.jsonl ([] before the first epoch ends)."""
  return workdir_lib.read_metrics(workdir_lib.path(workdir, workdir_lib.METRICS), fix)


class Outputs:
  """The run's outputs in `workdir`: one object, created once per run."""

  def __init__(self, workdir: str, config, main: bool):
    self.workdir = workdir
    self.config = config
    self.main = main
    self.tty = cli.stdout_is_terminal()
    self._tensorboard = None
    self._tracing = False

  def note(self, message: str, end: str = '\n') -> None:
    """Progress: printed unless config.progress is off."""
    if self.config.progress:
      self.say(message, end)

  def say(self, message: str, end: str = '\n') -> None:
    """Results: always printed (by process 0)."""
    if self.main:
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
      self.note('\r' + progress_bar(epoch, self.config.num_epochs, done, total, seconds), end='')

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
    self.note(('\r' if self.tty else '') + epoch_line(entry, self.config.num_epochs,
                                                     steps_per_epoch))

  def finished_summary(self, step: int, total_steps: int) -> dict | None:
    """The saved summary of a finished run (told again), or None when it must be (re)written."""
    if step > total_steps:
      raise workdir_lib.WorkdirError(
          f'{self.workdir} holds a run of {step} steps, more than the {total_steps} of '
          f'num_epochs={self.config.num_epochs}; use --fresh or another --workdir for a shorter '
          'run.')
    if not os.path.exists(self._path(workdir_lib.SUMMARY)):
      return None
    try:
      summary = read_summary(self.workdir, 'rewriting it')
    except workdir_lib.WorkdirError as e:
      self.note(f'warning: {e}')
      return None
    if summary['steps'] != step:  # A shorter run's, left by a run extended since: rewritten.
      return None
    self.say(f'{self.workdir} holds a finished run of {summary["steps"]} steps on '
             f'{devices_text(summary)}; not retraining (use --fresh or another --workdir to '
             'train again).')
    self.say(result_line(summary))
    return summary

  def profile(self, step: int, plan) -> None:
    """Traces the plan's profile window with jax.profiler, for TensorBoard's profile plugin."""
    import jax  # pylint: disable=g-import-not-at-top
    window = plan.profile_window
    if window and step == window[0] and not self._tracing:
      jax.profiler.start_trace(self._path(workdir_lib.TENSORBOARD))
      self._tracing = True
    elif self._tracing and (not window or step >= window[1]):
      self.stop_profile()

  def stop_profile(self) -> None:
    if self._tracing:
      import jax  # pylint: disable=g-import-not-at-top
      jax.effects_barrier()
      jax.profiler.stop_trace()
      self._tracing = False

  def prediction_images(self, images, probs, labels) -> None:
    """The tutorial's first predictions as a TensorBoard image, drawn without matplotlib."""
    writer = self._writer()
    if writer:
      writer.add_image('predictions', prediction_strip(images, probs, labels),
                       self.config.num_epochs, dataformats='HWC')
      writer.flush()

  def finish(self, summary: dict) -> None:
    if self.main:
      workdir_lib.write_json(self._path(workdir_lib.SUMMARY), summary)
    self.say(result_line(summary))

  def close(self) -> None:
    self.stop_profile()
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
  """A tensorboardX SummaryWriter, imported without torch (a second spent to recognise torch
  tensors; we pass numpy)."""
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
  """uint8 [H, W, 3]: each image framed blue (right) or red (wrong), bars of its 10 probabilities;
  for TensorBoard, a cheap stand-in for the matplotlib grid (most of a second to draw)."""
  tiles = []
  for image, p, label in zip(images, probs, labels):
    guess = int(np.argmax(p))
    color = np.array([31, 119, 180] if guess == int(label) else [214, 39, 40], np.uint8)
    tile = np.full((34, 30, 3), 255, np.uint8)
    tile[:30] = color
    tile[1:29, 1:29] = (255 - image)[..., None]
    for k in range(10):  # The bars, below the image: 4 pixels for a probability of 1.
      height = int(round(4 * float(p[k])))
      if height:
        tile[34 - height:, 3 * k:3 * k + 2] = color if k == guess else 120
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
  """The result: accuracy (mean and ensemble with several models), time, FLOP/s and devices."""
  timing = (f'{summary["steps"]} steps, training {summary["train_seconds"]:.2f} s, compile '
            f'{summary["compile_seconds"]:.2f} s')
  if summary.get('total_seconds') is not None:
    timing += f', total {summary["total_seconds"]:.2f} s'
  rate, mfu = summary.get('flops_per_second'), summary.get('mfu')
  if rate:
    timing += f', {rate / 1e9:.1f} GFLOP/s' + (f', MFU {100 * mfu:.1f}%' if mfu else '')
  timing += f', {devices_text(summary)}'
  if 'models' in summary:
    m = summary['models']
    return (f'Test accuracy of {summary["num_models"]} models: mean {m["test_accuracy_mean"]:.4f}'
            f' (std {m["test_accuracy_std"]:.4f}, min {m["test_accuracy_min"]:.4f}, max '
            f'{m["test_accuracy_max"]:.4f}), ensemble {m["ensemble_test_accuracy"]:.4f}  mean test '
            f'loss: {summary["test_loss"]:.4f}  ({timing})')
  return (f'Test accuracy: {summary["test_accuracy"]:.4f}  test loss: {summary["test_loss"]:.4f}'
          f'  ({timing})')


_IMPORTED_AT = time.time()


def process_start_time() -> float:
  """When this process started, on the time.time() clock: from /proc on Linux, else when this
  module was imported."""
  try:
    with open('/proc/self/stat') as f:
      ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime') as f:
      uptime = float(f.read().split()[0])
    return time.time() - uptime + ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError):
    return _IMPORTED_AT


def make_summary(config, plan, history: list[dict], steps_run: int, timing: dict,
                 facts: dict) -> dict:
  """summary.json's content: the final metrics, `timing` (seconds), rates, FLOP/s and MFU, and the
  run's `facts` (devices, flops per step, parameters, the ensemble's accuracy) as measured."""
  final, train_seconds = history[-1], timing['train_seconds']
  rate = (lambda n: n / train_seconds if train_seconds else None)
  facts = dict(facts)
  ensemble = facts.pop('ensemble_test_accuracy', None)
  flops = facts['flops_per_step']
  peak = targets.peak_flops(facts['device_kind'], config.compute_dtype)
  achieved = rate(flops * steps_run) if flops else None  # Per device: XLA costs its share.
  summary = {
      'test_accuracy': final['test_accuracy'], 'test_loss': final['test_loss'],
      'train_accuracy': final['train_accuracy'], 'train_loss': final['train_loss'],
      'epochs': config.num_epochs, 'steps': plan.total_steps, 'batch_size': config.batch_size,
      'steps_per_epoch': plan.steps_per_epoch, **timing, 'steps_run': steps_run,
      'steps_per_second': rate(steps_run),
      'examples_per_second': rate(steps_run * config.batch_size),
      'flops_per_second': achieved, 'peak_flops_per_second': peak,
      'mfu': achieved / peak if achieved and peak else None, **facts,
      'seed': config.seed, 'input_mode': config.input_mode,
      'compute_dtype': config.compute_dtype, 'num_models': config.num_models,
  }
  if config.num_models > 1:
    accs = np.asarray(final['per_model']['test_accuracy'])
    summary['models'] = {
        'test_accuracy_mean': float(accs.mean()), 'test_accuracy_std': float(accs.std()),
        'test_accuracy_min': float(accs.min()), 'test_accuracy_max': float(accs.max()),
        'ensemble_test_accuracy': ensemble,
        'learning_rates': list(OptimizerSpec.from_config(config).learning_rates),
        'seeds': [config.seed + k for k in range(config.num_models)]}
  return summary
