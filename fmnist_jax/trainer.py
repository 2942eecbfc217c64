"""The training loop: train_and_evaluate(config, workdir) -> summary dict.

Two input modes feed the same compiled program, `steps.train_chunk` (many fused steps):
- 'device': the uint8 train set lives on the accelerator(s); each epoch is shuffled there and
  a chunk runs over a slice of the epoch's batches.
- 'stream' and 'tfds': for data that does not fit on a device, batches come from the host (the
  decoded copy shuffled with numpy, or the classic tf.data pipeline) in chunks of many batches
  ([K, B, ...]), put on the device in the background while the previous chunk trains.

Outputs (fmnist_jax/outputs.py, file names in fmnist_jax/workdir.py): checkpoints/ (orbax,
resumable), metrics.jsonl, summary.json, config.json and TensorBoard event files.
"""

import contextlib
import dataclasses
import os
import queue
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax import checkpoint as checkpoint_lib
from fmnist_jax import compilation
from fmnist_jax import data as data_lib
from fmnist_jax import distributed
from fmnist_jax import inference
from fmnist_jax import model as model_lib
from fmnist_jax import outputs as outputs_lib
from fmnist_jax import steps as steps_lib
from fmnist_jax import workdir as workdir_lib
from fmnist_jax.compilation import CompileCache, Compiler
from fmnist_jax.errors import DivergenceError, Interrupted, UserError
from fmnist_jax.plan import RunPlan
from fmnist_jax.validate import validate_config


def train_and_evaluate(config, workdir: str) -> dict:
  """Validates the config, trains (or resumes) in `workdir`, and returns the summary dict.

  Raises:
    UserError: for bad config, data or workdir, a full disk, another training in the same
      workdir, or checkpoints that exist but cannot be restored (the CLI prints one line).
    DivergenceError: for a non-finite loss or gradient.
    Interrupted: after SIGTERM / SIGINT on any process, once a checkpoint is saved.
  """
  validate_config(config)
  workdir = workdir_lib.prepare(workdir)
  distributed.initialize(config.distributed)
  cache = CompileCache(config.compile_cache_dir)
  with _one_writer(workdir), workdir_lib.storage_errors(workdir), cache:
    return _run(config, workdir, cache)


@contextlib.contextmanager
def _one_writer(workdir: str):
  """Holds the workdir's lock (process 0 for the whole job); every process learns the outcome."""
  lock = workdir_lib.Lock(workdir)
  error = None
  if distributed.is_main_process():
    try:
      lock.acquire()
    except UserError as e:
      error = e
  if distributed.any_process(error is not None):
    raise error or UserError(f'another training is writing to {workdir}; wait for it to '
                             'finish, stop it, or use another --workdir.')
  try:
    yield
  finally:
    lock.release()


# Timing ------------------------------------------------------------------------------------------


def process_start_time() -> float:
  """When this process started, on the time.time() clock (from /proc on Linux)."""
  try:
    with open('/proc/self/stat') as f:
      ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime') as f:
      uptime = float(f.read().split()[0])
    return time.time() - uptime + ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError):
    return _IMPORTED_AT


_IMPORTED_AT = time.time()


# Stops -------------------------------------------------------------------------------------------


class StopSignals:
  """SIGTERM / SIGINT set a flag; the processes agree at the next chunk boundary to stop."""

  def __init__(self):
    self.received = None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = signal.Signals(signum).name
    # A second signal acts at once, as usual.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

  def agreed(self) -> bool:
    """Whether any process received a signal: the same answer on all of them (a collective)."""
    return distributed.any_process(self.received is not None)

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


# The run -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  """What every part of one run shares; built once by _run."""
  config: Any
  workdir: str
  plan: RunPlan
  mesh: Any
  graphdef: Any
  steps: steps_lib.Steps
  ckpt: checkpoint_lib.Checkpointer
  out: outputs_lib.Outputs
  compiler: Compiler
  signals: StopSignals

  def save(self, state, history: list[dict]) -> None:
    check_finite(self, state)  # Never write a checkpoint of a diverged state.
    self.ckpt.save(state, {'step': int(state.step),
                           'config': checkpoint_lib.fingerprint(self.config),
                           'history': history})


def _run(config, workdir: str, cache: CompileCache) -> dict:
  started = process_start_time()
  main = distributed.is_main_process()
  data_start = time.perf_counter()
  if not main:  # Process 0 prepares the data first; the others then read its copy.
    distributed.barrier('data')
  arrays = data_lib.load(config.data, verbose=main)
  if main:
    distributed.barrier('data')
  data_seconds = time.perf_counter() - data_start
  distributed.check_divisible(config.batch_size)
  plan = RunPlan.create(config, len(arrays['train']['label']), len(arrays['test']['label']),
                        jax.device_count())
  mesh = distributed.make_mesh()
  compiler = Compiler(cache, compilation.identity(config, mesh))
  graphdef, state = steps_lib.init_state(config, compiler.get)
  state = jax.device_put(state, distributed.replicated(mesh))
  ckpt = checkpoint_lib.Checkpointer(workdir, config.max_checkpoints_to_keep, fresh=config.fresh)
  run = Run(config=config, workdir=workdir, plan=plan, mesh=mesh, graphdef=graphdef,
            steps=steps_lib.make_steps(config, graphdef), ckpt=ckpt,
            out=outputs_lib.Outputs(workdir, config, main), compiler=compiler,
            signals=StopSignals())
  try:
    ckpt.check_compatible(config)
    restored = ckpt.restore(state)
    history = []
    if restored is not None:
      state, record = restored
      history = record['history']
      step = int(state.step)
      if step >= plan.total_steps:
        saved = _finished_summary(run, step)
        if saved is not None:
          return saved
      else:
        run.out.log(f'Resuming from the checkpoint at step {step} ({plan.position(step)}).')
    run.out.start(history)
    timing = {'started': started, 'data_seconds': data_seconds, 'cache': cache}
    return _train(run, state, history, arrays, timing)
  finally:
    ckpt.close()
    run.out.close()


def _finished_summary(run: Run, step: int) -> dict | None:
  """The saved summary of a finished run, or None when it must be (re)written by evaluating."""
  path = workdir_lib.path(run.workdir, workdir_lib.SUMMARY)
  if step > run.plan.total_steps:
    raise UserError(f'{run.workdir} holds a run of {step} steps, more than the '
                    f'{run.plan.total_steps} of num_epochs={run.config.num_epochs}; use '
                    '--config.fresh=True or another --workdir for a shorter run.')
  if not os.path.exists(path):
    return None
  try:
    summary = workdir_lib.read_json(path, 'rewriting it', required=(
        'test_accuracy', 'test_loss', 'steps', 'devices', 'backend', 'train_seconds',
        'compile_seconds'))
  except workdir_lib.WorkdirError as e:
    run.out.log(f'warning: {e}')
    return None  # Evaluated again from the final checkpoint and rewritten.
  run.out.log(outputs_lib.finished_line(run.workdir, summary))
  run.out.log(outputs_lib.result_line(summary))
  return summary


def _train(run: Run, state, history: list[dict], arrays, timing: dict) -> dict:
  config, plan = run.config, run.plan
  test = test_batches(run, arrays['test'])
  evaluate = run.compiler.get('eval', jax.jit(run.steps.evaluate), state.params, test)
  if config.input_mode == 'device':
    run_epoch = device_epoch_runner(run, state, arrays['train'])
  else:
    run_epoch = stream_epoch_runner(run, state)
  train_seconds = eval_seconds = 0.0
  steps_run = plan.total_steps - int(state.step)
  first_step_at = time.time() - run.compiler.seconds  # Start-up without compilation.
  with run.signals.installed():
    while int(state.step) < plan.total_steps:
      epoch = plan.epoch_of(int(state.step))
      state, seconds, stop = run_epoch(state, history, epoch)
      train_seconds += seconds
      start = time.perf_counter()
      test_sums = jax.device_get(evaluate(state.params, test))
      eval_seconds += time.perf_counter() - start
      state, entry = end_epoch(run, state, epoch, seconds, test_sums)
      history.append(entry)
      run.save(state, history)
      run.out.epoch(entry, plan.steps_per_epoch)
      if stop and int(state.step) < plan.total_steps:
        raise interrupted(run, state)  # The epoch-end checkpoint is already saved.
  if config.tensorboard:
    images, labels = arrays['test']['image'][:15], arrays['test']['label'][:15]
    probs = inference.predict_probs(config, run.graphdef, host_params(state), images)
    run.out.prediction_images(images, probs, labels, config.num_epochs)
  summary = make_summary(run, state, history, arrays['test'], steps_run, {
      'train_seconds': train_seconds, 'eval_seconds': eval_seconds,
      'compile_seconds': run.compiler.seconds, 'data_seconds': timing['data_seconds'],
      'startup_seconds': first_step_at - timing['started'],
      'compile_cache_hit': timing['cache'].hit(run.compiler)})
  run.ckpt.wait()  # The summary says the run is finished only once its checkpoint is on disk.
  summary['total_seconds'] = time.time() - timing['started']
  run.out.finish(summary)
  return summary


# Chunks and epochs -------------------------------------------------------------------------------


def after_chunk(run: Run, state, history: list[dict], epoch: int, epoch_started: float) -> bool:
  """Divergence check, mid-epoch checkpoint, agreed stop and progress; True when stopping.

  Every process calls it at the same steps, so the stop decision is collective and identical.
  """
  step = int(state.step)  # Waits for the chunk to finish.
  check_finite(run, state)
  at_epoch_end = step % run.plan.steps_per_epoch == 0
  stop = run.signals.agreed()
  if not at_epoch_end and (stop or run.plan.checkpoint_due(step)):
    run.save(state, history)
  if stop and not at_epoch_end:
    raise interrupted(run, state)
  if not at_epoch_end:
    run.out.progress(epoch, step - epoch * run.plan.steps_per_epoch, run.plan.steps_per_epoch,
                     time.perf_counter() - epoch_started)
  return stop  # At an epoch end the epoch's checkpoint comes first; the loop stops after it.


def _spec(array) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=array.sharding)


def _compiled_chunk(run: Run, state, data) -> Callable:
  """The one training program for chunks of `data`'s shape, whatever their length."""
  chunk = jax.jit(run.steps.train_chunk, donate_argnums=0)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  shapes = tuple((k, v.shape) for k, v in sorted(data.items()))
  return run.compiler.get(('chunk', shapes), chunk,
                          jax.tree.map(_spec, state), jax.tree.map(_spec, data), scalar, scalar)


def device_epoch_runner(run: Run, state, train) -> Callable:
  """Epoch runner for the 'device' mode: resident data, on-device shuffle, fused chunks."""
  config, plan = run.config, run.plan
  sharding = distributed.dataset_sharding(run.mesh, len(train['label']))
  images = distributed.put(train['image'].reshape(len(train['image']), -1), sharding)
  labels = distributed.put(train['label'], sharding)
  shuffle = jax.jit(run.steps.shuffle, static_argnames='batch_size',
                    out_shardings=distributed.batch_sharded(run.mesh, 1))
  shuffle = run.compiler.get('shuffle', shuffle, state.rng, jnp.zeros((), jnp.int32), images,
                             labels, batch_size=config.batch_size)
  spe = plan.steps_per_epoch

  def run_epoch(state, history, epoch):
    start = time.perf_counter()
    compile_before = run.compiler.seconds
    epoch_data = shuffle(state.rng, jnp.int32(epoch), images, labels)
    chunk = _compiled_chunk(run, state, epoch_data)
    stop = False
    while not stop and int(state.step) < (epoch + 1) * spe:
      step = int(state.step)
      n = plan.next_stop(step) - step
      state = chunk(state, epoch_data, jnp.int32(step - epoch * spe), jnp.int32(n))
      stop = after_chunk(run, state, history, epoch, start)
    return state, time.perf_counter() - start - (run.compiler.seconds - compile_before), stop

  return run_epoch


def stream_epoch_runner(run: Run, state) -> Callable:
  """Epoch runner for the 'stream' and 'tfds' modes: batches from the host (numpy or tf.data) in
  chunks of [K, B, ...], put on the devices by a background thread while the previous chunk
  trains, into the same fused program as the device mode."""
  config, plan = run.config, run.plan
  stream = (data_lib.HostStream if config.input_mode == 'stream' else data_lib.TfdsStream)(
      config.data, 'train')
  sharding = distributed.batch_sharded(run.mesh, 1)
  k = min(config.stream_chunk_steps, plan.steps_per_epoch)
  spe = plan.steps_per_epoch
  data_spec = {
      'image': jax.ShapeDtypeStruct((k, config.batch_size, 28, 28), jnp.uint8, sharding=sharding),
      'label': jax.ShapeDtypeStruct((k, config.batch_size), jnp.int32, sharding=sharding),
      'mask': jax.ShapeDtypeStruct((k, config.batch_size), jnp.float32, sharding=sharding)}
  chunk = _compiled_chunk(run, state, data_spec)

  def chunks(step, epoch):
    """(device chunk, number of real batches) of this epoch from `step` on."""
    for rows, n in stream.chunks(config.batch_size, k, shuffle_seed=epoch_seed(config.seed, epoch),
                                 skip_batches=step - epoch * spe,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count()):
      yield distributed.put_local_batch(rows, sharding), n

  def run_epoch(state, history, epoch):
    start = time.perf_counter()
    step = int(state.step)
    for data, n in _prefetched(chunks(step, epoch)):
      done = 0
      while done < n:  # A chunk runs in pieces that end at the plan's stops.
        piece = min(n - done, plan.next_stop(step) - step)
        state = chunk(state, data, jnp.int32(done), jnp.int32(piece))
        step += piece
        done += piece
        if step == plan.next_stop(step - piece) and after_chunk(run, state, history, epoch,
                                                                start):
          return state, time.perf_counter() - start, True
    return state, time.perf_counter() - start, False

  return run_epoch


def _prefetched(iterator, depth: int = 2):
  """Runs `iterator` in a background thread, `depth` items ahead."""
  items = queue.Queue(maxsize=depth)
  done = object()
  stopped = threading.Event()

  def produce():
    try:
      for item in iterator:
        while not stopped.is_set():
          try:
            items.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stopped.is_set():
          return
    except BaseException as e:  # pylint: disable=broad-except
      items.put(e)
      return
    items.put(done)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = items.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stopped.set()


def end_epoch(run: Run, state, epoch: int, seconds: float, test_sums):
  """Turns the epoch's running sums into an entry for metrics.jsonl and resets them."""
  loss_sum, correct, count = jax.device_get((state.loss_sum, state.correct, state.count))
  test_loss, test_correct = test_sums
  num_test = run.plan.num_test
  per_model = {
      'train_loss': np.atleast_1d(loss_sum / count),
      'train_accuracy': np.atleast_1d(correct / count),
      'test_loss': np.atleast_1d(test_loss / num_test),
      'test_accuracy': np.atleast_1d(test_correct / num_test)}
  steps_done = int(state.step) - epoch * run.plan.steps_per_epoch  # The whole epoch, even resumed.
  entry = {'epoch': epoch + 1, 'step': int(state.step),
           **{k: float(np.mean(v)) for k, v in per_model.items()},
           'seconds': seconds, 'steps_per_second': steps_done / seconds if seconds else None}
  if run.config.num_models > 1:
    entry['per_model'] = {k: [float(x) for x in v] for k, v in per_model.items()}
  # Fresh buffers for each field: the state is donated, and one buffer may not be donated twice.
  repl = distributed.replicated(run.mesh)
  zeros = lambda a: jax.device_put(np.zeros(a.shape, a.dtype), repl)
  state = state.replace(loss_sum=zeros(state.loss_sum), correct=zeros(state.correct),
                        count=zeros(state.count))
  return state, entry


def check_finite(run: Run, state) -> None:
  """Raises DivergenceError at the first non-finite loss, or non-finite parameters."""
  bad = int(state.first_nonfinite)
  if bad < 0:
    finite = run.compiler.get('finite', jax.jit(run.steps.params_finite), state.params)
    if not bool(finite(state.params)):
      bad = int(state.step) - 1  # A non-finite gradient in the chunk's last step.
  if bad >= 0:
    last = run.ckpt.latest_step()
    kept = f'the last good checkpoint (step {last}) is kept' if last is not None else (
        'no checkpoint was written')
    spe = run.plan.steps_per_epoch
    raise DivergenceError(
        f'non-finite loss or parameters at epoch {bad // spe + 1}, step {bad % spe + 1} (global '
        f'step {bad + 1}); training stopped and {kept}. Lower --config.learning_rate (now '
        f'{run.config.learning_rate}); if it diverged right after resuming, that checkpoint may '
        'be damaged: move it aside or start over with --config.fresh=True.')


def interrupted(run: Run, state) -> Interrupted:
  step = int(state.step)
  return Interrupted(f'{run.signals.received or "a stop signal on another process"} received: '
                     f'stopped at step {step} (epoch {(step - 1) // run.plan.steps_per_epoch + 1})'
                     f' and saved a checkpoint in {run.ckpt.directory}; run the same command '
                     'again to resume.')


# Evaluation and summary --------------------------------------------------------------------------


def test_batches(run: Run, test) -> dict:
  """The test set as padded batches [S, B, ...] on the devices, split over the data axis."""
  plan = run.plan
  padded = data_lib.pad_batch(test, plan.test_batches * plan.eval_batch_size)
  sharding = distributed.batch_sharded(run.mesh, 1)
  return {k: distributed.put(v.reshape((-1, plan.eval_batch_size) + v.shape[1:]), sharding)
          for k, v in padded.items()}


def make_summary(run: Run, state, history, test, steps_run: int, timing: dict) -> dict:
  config, plan = run.config, run.plan
  final = history[-1]
  train_seconds = timing['train_seconds']
  summary = {
      'test_accuracy': final['test_accuracy'], 'test_loss': final['test_loss'],
      'train_accuracy': final['train_accuracy'], 'train_loss': final['train_loss'],
      'epochs': config.num_epochs, 'steps': plan.total_steps, 'batch_size': config.batch_size,
      'steps_per_epoch': plan.steps_per_epoch, **timing, 'steps_run': steps_run,
      'steps_per_second': steps_run / train_seconds if train_seconds else None,
      'examples_per_second': (steps_run * config.batch_size / train_seconds
                              if train_seconds else None),
      'backend': jax.default_backend(), 'devices': jax.device_count(),
      'device_kind': jax.devices()[0].device_kind, 'processes': jax.process_count(),
      'seed': config.seed, 'input_mode': config.input_mode,
      'compute_dtype': config.compute_dtype, 'num_models': config.num_models,
      'param_count': model_lib.param_count(state.params, config.num_models),
      'jax_version': jax.__version__,
  }
  if config.num_models > 1:
    summary['models'] = model_stats(run, state, history, test)
  return summary


def model_stats(run: Run, state, history, test) -> dict:
  """Spread of the K models' test accuracies, and the accuracy of their averaged probabilities."""
  config = run.config
  accs = np.asarray(history[-1]['per_model']['test_accuracy'])
  probs = inference.predict_probs(config, run.graphdef, host_params(state), test['image'])
  ensemble = float((probs.argmax(axis=1) == test['label']).mean())
  return {'test_accuracy_mean': float(accs.mean()), 'test_accuracy_std': float(accs.std()),
          'test_accuracy_min': float(accs.min()), 'test_accuracy_max': float(accs.max()),
          'ensemble_test_accuracy': ensemble,
          'learning_rates': list(steps_lib.model_learning_rates(config)),
          'seeds': [config.seed + k for k in range(config.num_models)]}


def host_params(state):
  """A host copy of the (replicated) parameters, so that code running on one process alone never
  launches work over other processes' devices."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), state.params)


def epoch_seed(seed: int, epoch: int) -> int:
  """The tf.data shuffle seed of one epoch (tfds mode): fixed, so a resumed epoch replays it."""
  return (seed * 1_000_003 + epoch) % (2**31 - 1)

