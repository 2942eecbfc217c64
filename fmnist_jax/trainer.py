"""The training loop: train_and_evaluate(config, workdir) -> summary dict.

Two input modes share the same step functions (fmnist_jax.steps):
- 'device': the uint8 train set lives on the accelerator(s); each epoch is shuffled there and
  `chunk_steps` steps (default: the whole epoch) run inside one compiled `lax.scan`.
- 'tfds': the classic tf.data stream, one jitted train step per batch.

Outputs in the workdir: checkpoints/ (orbax, resumable), metrics.jsonl (one line per epoch),
summary.json, and TensorBoard event files in tensorboard/.
"""

import contextlib
import json
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax import checkpoint as checkpoint_lib
from fmnist_jax import data as data_lib
from fmnist_jax import distributed
from fmnist_jax import steps as steps_lib
from fmnist_jax.errors import DivergenceError, Interrupted, UserError
from fmnist_jax.validate import validate_config

SUMMARY = 'summary.json'
METRICS = 'metrics.jsonl'
CONFIG = 'config.json'  # The run's config, for predict/explore and for people.


def check_workdir(workdir: str) -> str:
  """Creates the workdir if needed; a file or an unwritable folder is a UserError."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir} is a file, not a folder; choose another --workdir.')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f'workdir {workdir} cannot be created ({e.strerror}); choose another '
                    '--workdir.') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f'workdir {workdir} is not writable; choose another --workdir.')
  return workdir


def write_json_atomic(path: str, obj: Any, lines: bool = False) -> None:
  """Writes JSON (or JSON lines for a list) via a temporary file and a rename."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    if lines:
      f.writelines(json.dumps(o) + '\n' for o in obj)
    else:
      json.dump(obj, f, indent=2)
      f.write('\n')
  os.replace(tmp, path)


class _StopSignals:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next chunk boundary."""

  def __init__(self):
    self.received = None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = signal.Signals(signum).name
    # A second signal acts at once, as usual.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

  @contextlib.contextmanager
  def installed(self):
    try:
      old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # Not the main thread (e.g. a notebook worker): no handlers.
      yield self
      return
    try:
      yield self
    finally:
      for s, handler in old.items():
        signal.signal(s, handler)


class _Compiler:
  """Ahead-of-time compilation with the seconds it takes, kept apart from training time."""

  def __init__(self):
    self.seconds = 0.0
    self._cache = {}

  def get(self, key, jitted, *args, **kwargs):
    if key not in self._cache:
      start = time.perf_counter()
      self._cache[key] = jitted.lower(*args, **kwargs).compile()
      self.seconds += time.perf_counter() - start
    return self._cache[key]


def _spec(array) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=array.sharding)


class Trainer:
  """One run: data, state, compiled functions and the epoch loop. Use train_and_evaluate()."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir
    self.main = distributed.is_main_process()
    self.mesh = distributed.make_mesh()
    distributed.check_divisible(config.batch_size)
    self.repl = distributed.replicated(self.mesh)
    self.compiler = _Compiler()
    self.signals = _StopSignals()
    self.tty = sys.stdout.isatty()

  def log(self, message: str, end: str = '\n') -> None:
    if self.main and self.config.progress:
      print(message, end=end, flush=True)

  def _path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  # The run ---------------------------------------------------------------------------------------

  def run(self) -> dict:
    """Trains (or resumes, or reports a finished run) and returns the summary."""
    config = self.config
    start = time.perf_counter()
    if not self.main:  # Process 0 prepares the data first; the others then read its copy.
      distributed.barrier('data')
    arrays = data_lib.load(config.data, verbose=self.main)
    if self.main:
      distributed.barrier('data')
    self.data_seconds = time.perf_counter() - start
    self.spe = math.ceil(len(arrays['train']['label']) / config.batch_size)
    self.total_steps = self.spe * config.num_epochs

    graphdef, state = steps_lib.init_state(config)
    self.graphdef = graphdef
    self.steps = steps_lib.make_steps(config, graphdef)
    state = jax.device_put(state, self.repl)

    self.ckpt = checkpoint_lib.Checkpointer(self.workdir, config.max_checkpoints_to_keep,
                                            fresh=config.fresh)
    try:
      state, self.history = self._resume(state)
      if state is None:
        return self._saved_summary()
      if self.main:  # metrics.jsonl always agrees with the checkpoint it continues.
        write_json_atomic(self._path(METRICS), self.history, lines=True)
        write_json_atomic(self._path(CONFIG), config.to_dict())
      return self._train(state, arrays)
    finally:
      self.ckpt.close()

  def _resume(self, state):
    """(state, history) from the latest compatible checkpoint; (None, history) if finished."""
    record = self.ckpt.latest_record()
    if record is None:
      return state, []
    self.ckpt.check_compatible(record, self.config)
    restored = self.ckpt.restore(state)
    if restored is None:
      return state, []
    state, record = restored
    step = int(state.step)
    if step >= self.total_steps and os.path.exists(self._path(SUMMARY)):
      return None, record['history']
    self.log(f'Resuming from the checkpoint at step {step} '
             f'(epoch {step // self.spe + 1}, step {step % self.spe} of {self.spe}).')
    return state, record['history']

  def _saved_summary(self) -> dict:
    with open(self._path(SUMMARY)) as f:
      summary = json.load(f)
    self.log(f'{self.workdir} holds a finished run of {self.total_steps} steps; not retraining '
             '(use --config.fresh=True or another --workdir to train again).')
    self.log(result_line(summary))
    return summary

  def _train(self, state, arrays) -> dict:
    config = self.config
    test = self._test_batches(arrays['test'])
    evaluate = self.compiler.get('eval', jax.jit(self.steps.evaluate), state.params, test)
    self._params_finite = self.compiler.get('finite', jax.jit(self.steps.params_finite),
                                            state.params)
    if config.input_mode == 'device':
      run_epoch = self._device_epoch_fn(state, arrays['train'])
    else:
      run_epoch = self._tfds_epoch_fn(state)
    writer = self._tensorboard()
    self.train_seconds = self.eval_seconds = 0.0
    steps_run = self.total_steps - int(state.step)
    try:
      with self.signals.installed():
        while int(state.step) < self.total_steps:
          epoch = int(state.step) // self.spe
          state, seconds = run_epoch(state, epoch)
          self.train_seconds += seconds
          start = time.perf_counter()
          test_sums = jax.device_get(evaluate(state.params, test))
          self.eval_seconds += time.perf_counter() - start
          state, entry = self._end_epoch(state, epoch, seconds, test_sums)
          self.history.append(entry)
          self._save(state)
          if self.main:
            with open(self._path(METRICS), 'a') as f:
              f.write(json.dumps(entry) + '\n')
            if writer:
              _write_tensorboard(writer, entry)
          self.log(('\r' if self.tty else '') + epoch_line(entry, config.num_epochs, self.spe))
          if self.signals.received and int(state.step) < self.total_steps:
            raise self._interrupted(state)  # The epoch-end checkpoint is already saved.
      if writer:
        self._write_prediction_figure(writer, state, arrays['test'])
    finally:
      if writer:
        writer.close()
    summary = self._summary(state, arrays['test'], steps_run)
    if self.main:
      write_json_atomic(self._path(SUMMARY), summary)
    self.log(result_line(summary))
    return summary

  # Epochs ----------------------------------------------------------------------------------------

  def _next_stop(self, step: int) -> int:
    """The next step at which a chunk ends: epoch end, chunk size or checkpoint interval."""
    epoch_start = step // self.spe * self.spe
    stops = [epoch_start + self.spe]
    if self.config.chunk_steps:
      stops.append(epoch_start + ((step - epoch_start) // self.config.chunk_steps + 1)
                   * self.config.chunk_steps)
    if self.config.checkpoint_every_steps:
      every = self.config.checkpoint_every_steps
      stops.append((step // every + 1) * every)
    return min(stops)

  def _after_chunk(self, state, epoch: int, epoch_start_time: float) -> None:
    """Divergence check, mid-epoch checkpoint, signal handling and progress after a chunk."""
    step = int(state.step)  # Waits for the chunk to finish.
    self._check_finite(state)
    every = self.config.checkpoint_every_steps
    at_epoch_end = step % self.spe == 0
    if not at_epoch_end and (self.signals.received or (every and step % every == 0)):
      self._save(state)
    if self.signals.received:
      if at_epoch_end:
        return  # The epoch-end checkpoint comes first; the loop stops after it.
      raise self._interrupted(state)
    if self.tty and not at_epoch_end:
      pos = step - epoch * self.spe
      self.log('\r' + progress_bar(epoch, self.config.num_epochs, pos, self.spe,
                                   time.perf_counter() - epoch_start_time), end='')

  def _interrupted(self, state) -> Interrupted:
    step = int(state.step)
    return Interrupted(f'{self.signals.received} received: stopped at step {step} (epoch '
                       f'{(step - 1) // self.spe + 1}) and saved a checkpoint in '
                       f'{self.ckpt.directory}; run the same command again to resume.')

  def _check_finite(self, state) -> None:
    bad = int(state.first_nonfinite)
    if bad < 0 and not bool(self._params_finite(state.params)):
      bad = int(state.step) - 1  # A non-finite gradient in the chunk's last step.
    if bad >= 0:
      last = self.ckpt.latest_step()
      kept = f'the last good checkpoint (step {last}) is kept' if last is not None else (
          'no checkpoint was written')
      raise DivergenceError(
          f'non-finite loss or parameters at epoch {bad // self.spe + 1}, step '
          f'{bad % self.spe + 1} (global step {bad + 1}); training stopped and {kept}. Lower '
          f'--config.learning_rate (now {self.config.learning_rate}).')

  def _device_epoch_fn(self, state, train):
    """Epoch runner for the 'device' mode: resident data, on-device shuffle, fused chunks."""
    config = self.config
    sharding = distributed.dataset_sharding(self.mesh, len(train['label']))
    images = distributed.put(train['image'].reshape(len(train['image']), -1), sharding)
    labels = distributed.put(train['label'], sharding)
    shuffle = jax.jit(self.steps.shuffle, static_argnames='batch_size',
                      out_shardings=distributed.batch_sharded(self.mesh, 1))
    epoch0 = jnp.zeros((), jnp.int32)
    shuffle = self.compiler.get('shuffle', shuffle, state.rng, epoch0, images, labels,
                                batch_size=config.batch_size)
    chunk = jax.jit(self.steps.train_chunk, static_argnames='num_steps', donate_argnums=0)
    data_spec = None

    def run_epoch(state, epoch):
      nonlocal data_spec
      start = time.perf_counter()
      compile_before = self.compiler.seconds
      epoch_data = shuffle(state.rng, jnp.int32(epoch), images, labels)
      data_spec = data_spec or jax.tree.map(_spec, epoch_data)
      while True:
        step = int(state.step)
        if step >= (epoch + 1) * self.spe:
          break
        n = self._next_stop(step) - step
        compiled = self.compiler.get(('chunk', n), chunk, jax.tree.map(_spec, state), data_spec,
                                     jax.ShapeDtypeStruct((), jnp.int32), num_steps=n)
        state = compiled(state, epoch_data, jnp.int32(step - epoch * self.spe))
        self._after_chunk(state, epoch, start)
      seconds = time.perf_counter() - start - (self.compiler.seconds - compile_before)
      return state, seconds

    return run_epoch

  def _tfds_epoch_fn(self, state):
    """Epoch runner for the 'tfds' mode: tf.data stream, one jitted step per batch."""
    config = self.config
    stream = data_lib.TfdsStream(config.data, 'train')
    sharding = distributed.batch_sharded(self.mesh)
    batch_spec = {
        'image': jax.ShapeDtypeStruct((config.batch_size, 28, 28), jnp.uint8, sharding=sharding),
        'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=sharding),
        'mask': jax.ShapeDtypeStruct((config.batch_size,), jnp.float32, sharding=sharding)}
    step_fn = self.compiler.get('step', jax.jit(self.steps.train_step, donate_argnums=0),
                                jax.tree.map(_spec, state), batch_spec)

    # Several CPU "devices" share one thread pool: with many steps in flight their all-reduces can
    # wait on each other forever (seen with 8 forced host devices), so run one step at a time.
    one_in_flight = jax.default_backend() == 'cpu' and jax.local_device_count() > 1

    def run_epoch(state, epoch):
      start = time.perf_counter()
      step = int(state.step)
      stop = self._next_stop(step)
      batches = stream.batches(config.batch_size, shuffle_seed=epoch_seed(config.seed, epoch),
                               skip_batches=step - epoch * self.spe,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
      for batch in batches:
        state = step_fn(state, distributed.put_local_batch(batch, sharding))
        if one_in_flight:
          state.step.block_until_ready()
        step += 1
        if step == stop or self.signals.received:
          self._after_chunk(state, epoch, start)
          stop = self._next_stop(step)
      return state, time.perf_counter() - start

    return run_epoch

  def _end_epoch(self, state, epoch, seconds, test_sums):
    """Turns the epoch's running sums into an entry for metrics.jsonl and resets them."""
    loss_sum, correct, count = jax.device_get((state.loss_sum, state.correct, state.count))
    test_loss, test_correct = test_sums
    num_test = self.num_test
    per_model = {
        'train_loss': np.atleast_1d(loss_sum / count), 'train_accuracy': np.atleast_1d(
            correct / count), 'test_loss': np.atleast_1d(test_loss / num_test),
        'test_accuracy': np.atleast_1d(test_correct / num_test)}
    steps_done = int(state.step) - epoch * self.spe  # The whole epoch, even after a resume.
    entry = {'epoch': epoch + 1, 'step': int(state.step),
             **{k: float(np.mean(v)) for k, v in per_model.items()},
             'seconds': seconds, 'steps_per_second': steps_done / seconds if seconds else None}
    if self.config.num_models > 1:
      entry['per_model'] = {k: [float(x) for x in v] for k, v in per_model.items()}
    # Fresh buffers for each field: the state is donated, and one buffer may not be donated twice.
    zeros = lambda a: jax.device_put(np.zeros(a.shape, a.dtype), self.repl)
    state = state.replace(loss_sum=zeros(state.loss_sum), correct=zeros(state.correct),
                          count=zeros(state.count))
    return state, entry

  def _save(self, state) -> None:
    self._check_finite(state)  # Never write a checkpoint of a diverged state.
    self.ckpt.save(state, {
        'step': int(state.step), 'config': checkpoint_lib.fingerprint(self.config),
        'history': self.history})

  # Evaluation and summary -------------------------------------------------------------------------

  def _test_batches(self, test) -> dict:
    """The test set as padded batches [S, B, ...] on the devices, split over the data axis."""
    eval_batch = -(-self.config.eval_batch_size // jax.device_count()) * jax.device_count()
    self.num_test = len(test['label'])
    padded = data_lib.pad_batch(test, -(-self.num_test // eval_batch) * eval_batch)
    sharding = distributed.batch_sharded(self.mesh, 1)
    return {k: distributed.put(v.reshape((-1, eval_batch) + v.shape[1:]), sharding)
            for k, v in padded.items()}

  def _summary(self, state, test, steps_run: int) -> dict:
    config = self.config
    final = self.history[-1]
    summary = {
        'test_accuracy': final['test_accuracy'], 'test_loss': final['test_loss'],
        'train_accuracy': final['train_accuracy'], 'train_loss': final['train_loss'],
        'epochs': config.num_epochs, 'steps': self.total_steps, 'batch_size': config.batch_size,
        'steps_per_epoch': self.spe, 'train_seconds': self.train_seconds,
        'compile_seconds': self.compiler.seconds, 'data_seconds': self.data_seconds,
        'eval_seconds': self.eval_seconds, 'steps_run': steps_run,
        'steps_per_second': steps_run / self.train_seconds if self.train_seconds else None,
        'examples_per_second': (steps_run * config.batch_size / self.train_seconds
                                if self.train_seconds else None),
        'backend': jax.default_backend(), 'devices': jax.device_count(),
        'device_kind': jax.devices()[0].device_kind, 'processes': jax.process_count(),
        'seed': config.seed, 'input_mode': config.input_mode,
        'compute_dtype': config.compute_dtype, 'num_models': config.num_models,
        'param_count': model_param_count(state.params, config.num_models),
        'jax_version': jax.__version__,
    }
    if config.num_models > 1:
      summary['models'] = self._model_stats(state, test)
    return summary

  def _model_stats(self, state, test) -> dict:
    """Spread of the K models' test accuracies, and the accuracy of their averaged probabilities."""
    from fmnist_jax import predict  # pylint: disable=g-import-not-at-top
    accs = np.asarray(self.history[-1]['per_model']['test_accuracy'])
    probs = predict.predict_probs(self.config, self.graphdef, _host_params(state), test['image'])
    ensemble = float((probs.argmax(axis=1) == test['label']).mean())
    return {'test_accuracy_mean': float(accs.mean()), 'test_accuracy_std': float(accs.std()),
            'test_accuracy_min': float(accs.min()), 'test_accuracy_max': float(accs.max()),
            'ensemble_test_accuracy': ensemble,
            'learning_rates': list(steps_lib.model_learning_rates(self.config)),
            'seeds': [self.config.seed + k for k in range(self.config.num_models)]}

  def _write_prediction_figure(self, writer, state, test) -> None:
    """The tutorial's prediction grid (first 15 test images) as a TensorBoard image."""
    from fmnist_jax import plots, predict  # pylint: disable=g-import-not-at-top
    images, labels = test['image'][:15], test['label'][:15]
    probs = predict.predict_probs(self.config, self.graphdef, _host_params(state), images,
                                  batch_size=16)
    writer.add_figure('predictions', plots.prediction_grid(images, probs, labels),
                      self.config.num_epochs)
    writer.flush()

  def _tensorboard(self):
    if not (self.config.tensorboard and self.main):
      return None
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX.SummaryWriter(self._path('tensorboard'))


def _host_params(state):
  """A host copy of the (replicated) parameters, so that code running on one process alone never
  launches work over other processes' devices."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), state.params)


def model_param_count(params, num_models: int) -> int:
  """Parameters of one model (the leading model axis is not counted)."""
  return sum(int(p.size) for p in jax.tree.leaves(params)) // num_models


def epoch_seed(seed: int, epoch: int) -> int:
  """The tf.data shuffle seed of one epoch (tfds mode): fixed, so a resumed epoch replays it."""
  return (seed * 1_000_003 + epoch) % (2**31 - 1)


def _write_tensorboard(writer, entry: dict) -> None:
  step = entry['epoch']
  for split in ('train', 'test'):
    for name in ('loss', 'accuracy'):
      writer.add_scalar(f'{name}/{split}', entry[f'{split}_{name}'], step)
  if entry['steps_per_second']:
    writer.add_scalar('steps_per_second', entry['steps_per_second'], step)
  writer.flush()


def progress_bar(epoch, num_epochs, done, total, seconds, width=30) -> str:
  filled = width * done // total
  bar = ('=' * filled + ('>' if filled < width else '')).ljust(width, '.')
  return f'Epoch {epoch + 1}/{num_epochs} {done}/{total} [{bar}] {seconds:.1f}s'


def epoch_line(entry: dict, num_epochs: int, steps_per_epoch: int) -> str:
  """A Keras-like line: bar, seconds, steps/s, train and test loss and accuracy."""
  rate = f'{entry["steps_per_second"]:.0f} steps/s' if entry['steps_per_second'] else ''
  bar = progress_bar(entry['epoch'] - 1, num_epochs, steps_per_epoch, steps_per_epoch,
                     entry['seconds'])
  return (f'{bar} {rate} - loss: {entry["train_loss"]:.4f} - accuracy: {entry["train_accuracy"]:.4f} - '
          f'test_loss: {entry["test_loss"]:.4f} - test_accuracy: {entry["test_accuracy"]:.4f}')


def result_line(summary: dict) -> str:
  line = (f'Test accuracy: {summary["test_accuracy"]:.4f}  test loss: {summary["test_loss"]:.4f}'
          f'  ({summary["steps"]} steps, training {summary["train_seconds"]:.2f} s, compile '
          f'{summary["compile_seconds"]:.2f} s, {summary["devices"]} {summary["backend"]} '
          'device(s))')
  if 'models' in summary:
    m = summary['models']
    line += (f'\n{summary["num_models"]} models: test accuracy mean {m["test_accuracy_mean"]:.4f}'
             f' std {m["test_accuracy_std"]:.4f} min {m["test_accuracy_min"]:.4f} max '
             f'{m["test_accuracy_max"]:.4f}; ensemble {m["ensemble_test_accuracy"]:.4f}')
  return line


def train_and_evaluate(config, workdir: str) -> dict:
  """Validates the config, trains (or resumes) in `workdir`, and returns the summary dict.

  Raises:
    UserError: for bad config, data or workdir (the CLI prints it as one line).
    DivergenceError: for a non-finite loss or gradient.
    Interrupted: after SIGTERM / SIGINT, once a checkpoint is saved.
  """
  validate_config(config)
  workdir = check_workdir(workdir)
  distributed.initialize(config.distributed)
  return Trainer(config, workdir).run()
