"""The training loop: train_and_evaluate(config, workdir) -> summary dict.

Every epoch is one loop over chunks of batches, each run by one compiled program (`train_chunk`).
Only where chunks come from differs: in the 'device' mode the uint8 train set lives on the
devices and each epoch, shuffled there, is the chunk; in the 'stream' and 'tfds' modes [K, B, ...]
chunks come from the host, put on the devices by a background thread while the previous one
trains. The host steps in only at check points (plan.py): divergence, checkpoints, progress, stop
signals. What a run writes is in run/ (workdir, checkpoint, outputs).
"""

import dataclasses
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from fmnist_jax import config as config_lib
from fmnist_jax import data as data_lib
from fmnist_jax import distributed
from fmnist_jax import metrics
from fmnist_jax import model as model_lib
from fmnist_jax import programs as programs_lib
from fmnist_jax import steps as steps_lib
from fmnist_jax.data import batches
from fmnist_jax.errors import DivergenceError
from fmnist_jax.plan import ModelSpec, OptimizerSpec, RunPlan
from fmnist_jax.run import checkpoint as checkpoint_lib
from fmnist_jax.run import outputs as outputs_lib
from fmnist_jax.run import signals
from fmnist_jax.run import workdir as workdir_lib


def train_and_evaluate(config, workdir: str, fresh: bool = False) -> dict:
  """Validates the config, trains (or resumes) in `workdir`, and returns the summary dict.

  Args:
    config: a ConfigDict like configs/base.py's.
    workdir: the run's folder; an existing run there is resumed (or reported, if finished).
    fresh: delete the workdir's checkpoints first and start over.

  Raises:
    UserError: for bad config, data or workdir, a full disk, another training in the same
      workdir, or checkpoints that exist but cannot be restored (the CLI prints one line).
    DivergenceError: for a non-finite loss or gradient.
    Interrupted: after SIGTERM / SIGINT on any process, once a checkpoint is saved.
  """
  config_lib.validate_config(config)
  distributed.initialize(config.distributed)
  config_lib.check_sizes(config, config_lib.device_memory_bytes())  # Before any file is written.
  workdir = workdir_lib.prepare(workdir, fresh=fresh)
  programs_lib.use_compile_cache(config.compile_cache_dir)
  with distributed.one_writer(workdir_lib.Lock(workdir)), workdir_lib.storage_errors(workdir):
    if fresh and distributed.is_main_process():
      workdir_lib.remove_for_fresh(workdir)
    distributed.barrier('fresh')  # Nobody opens the checkpoints while process 0 deletes them.
    return _run(config, workdir)


@dataclasses.dataclass(frozen=True)
class Run:
  """What every part of one run shares; built once by _run."""
  config: Any  # For the outputs and the checkpoints' record; the core takes the values below.
  model: ModelSpec
  plan: RunPlan
  mesh: Any
  compiled: programs_lib.Compiled
  ckpt: checkpoint_lib.Checkpointer
  out: outputs_lib.Outputs
  checked: dict = dataclasses.field(default_factory=lambda: {'step': -1})  # Last finite step.

  def save(self, state, history: list[dict]) -> None:
    """Saves a checkpoint of `state`, never of a diverged one (checked unless just checked)."""
    if self.checked['step'] != int(state.step):
      check_finite(self, state)
    self.ckpt.save(state, {'step': int(state.step), 'config': fingerprint(self.config),
                           'history': history})


def fingerprint(config) -> dict:
  return config_lib.resume_fingerprint(config, jax.device_count(), jax.process_count())


def _run(config, workdir: str) -> dict:
  started = outputs_lib.process_start_time()
  main = distributed.is_main_process()
  arrays, data_seconds = _load_data(config, main)
  config_lib.check_divisible(config.batch_size, jax.device_count())
  plan = RunPlan.create(config, len(arrays['train']['label']), len(arrays['test']['label']),
                        jax.device_count())
  model, optimizer = ModelSpec.from_config(config), OptimizerSpec.from_config(config)
  mesh = distributed.make_mesh()
  graphdef, state = steps_lib.init_state(model, optimizer, config.seed)
  state = jax.device_put(state, distributed.replicated(mesh))
  ckpt = checkpoint_lib.Checkpointer(workdir, config.max_checkpoints_to_keep)
  out = outputs_lib.Outputs(workdir, config, main)
  with signals.deferred():  # Signals stop the run before training, or at a check point, saved.
    try:
      checkpoint_lib.check_compatible(ckpt, fingerprint(config))
      restored = ckpt.restore(state)
      history = []
      if restored is not None:
        state, history = restored[0], restored[1]['history']
      step = int(state.step)
      if step >= plan.total_steps:
        summary = out.finished_summary(step, plan.total_steps)
        if summary is not None:
          return summary
      elif step:
        out.note(f'Resuming from the checkpoint at step {step} ({plan.position(step)}).')
      plan = plan.with_profile_window(step, config.profile_steps)
      progs = programs_lib.build(model, optimizer, plan, mesh, graphdef)
      if not config.tensorboard and model.num_models == 1:
        del progs['predict']  # Only the TensorBoard figure and the ensemble use it.
      compiled = programs_lib.compile_all(progs, config_lib.device_memory_bytes())
      if distributed.any_process(signals.received() is not None):  # Nothing is written yet.
        raise signals.stopped()
      out.start(history)
      return _train(Run(config, model, plan, mesh, compiled, ckpt, out), state, history, arrays,
                    {'started': started, 'data_seconds': data_seconds})
    finally:
      ckpt.close()
      out.close()


def _load_data(config, main: bool):
  """The decoded arrays and their seconds; process 0 prepares the data, then the others read it."""
  start = time.perf_counter()
  if not main:
    distributed.barrier('data')
  arrays = data_lib.load(config.data, verbose=main)
  if main:
    distributed.barrier('data')
  return arrays, time.perf_counter() - start


def _train(run: Run, state, history: list[dict], arrays, times: dict) -> dict:
  plan = run.plan
  test = test_set_on_devices(run, arrays['test'])
  chunks = (device_chunks(run, arrays['train']) if plan.input_mode == 'device'
            else host_chunks(run, arrays['train']))
  train_seconds = eval_seconds = 0.0
  steps_run = plan.total_steps - int(state.step)
  first_step_at = time.time()
  while int(state.step) < plan.total_steps:
    epoch = plan.epoch_of(int(state.step))
    start = time.perf_counter()
    state, stop = run_epoch(run, state, history, epoch, chunks)
    seconds = time.perf_counter() - start
    train_seconds += seconds
    start = time.perf_counter()
    test_sums = jax.device_get(run.compiled['evaluate'](state.params, test))
    eval_seconds += time.perf_counter() - start
    state, entry = end_epoch(run, state, epoch, seconds, test_sums)
    history.append(entry)
    run.save(state, history)
    run.out.epoch(entry, plan.steps_per_epoch)
    if stop and int(state.step) < plan.total_steps:  # The epoch's checkpoint is saved.
      raise signals.error(int(state.step), plan.steps_per_epoch, run.ckpt.directory)
  timing = {'train_seconds': train_seconds, 'eval_seconds': eval_seconds,
            'compile_seconds': run.compiled.seconds, 'data_seconds': times['data_seconds'],
            'startup_seconds': first_step_at - run.compiled.seconds - times['started'],
            'compile_cache_hit': run.compiled.cache_hit}
  summary = outputs_lib.make_summary(run.config, plan, history, steps_run, timing,
                                     run_facts(run, state, arrays['test']))
  if run.config.tensorboard:
    shown = arrays['test']['image'][:outputs_lib.PREDICTIONS_SHOWN]
    probs = distributed.in_batches(run.compiled['predict'], state.params, shown, run.mesh,
                                   plan.eval_batch_size)
    run.out.prediction_images(shown, probs, arrays['test']['label'][:len(shown)])
  run.ckpt.wait()  # The summary says the run is finished only once its checkpoint is on disk.
  summary['total_seconds'] = time.time() - times['started']
  run.out.finish(summary)
  return summary


def run_facts(run: Run, state, test) -> dict:
  """What the summary reports beside the metrics: the devices, a step's flops (XLA's count of the
  chunk's loop body, one step), the parameters and, with several models, their ensemble."""
  facts = {**distributed.describe(),
           'flops_per_step': programs_lib.step_flops(run.compiled['train_chunk']),
           'param_count': model_lib.param_count(state.params, run.model.num_models)}
  if run.model.num_models > 1:  # The accuracy of the models' averaged probabilities.
    probs = distributed.in_batches(run.compiled['predict'], state.params, test['image'], run.mesh,
                                   run.plan.eval_batch_size)
    facts['ensemble_test_accuracy'] = float((probs.argmax(axis=1) == test['label']).mean())
  return facts


# Chunks and epochs -------------------------------------------------------------------------------

# (state, epoch, steps of the epoch already done) -> (data [S, B, ...], first batch, batches).
ChunkSource = Callable[[Any, int, int], Iterator[tuple[dict, int, int]]]


def device_chunks(run: Run, train) -> ChunkSource:
  """The device mode: the train set resident on the devices, each epoch shuffled there."""
  sharding = distributed.dataset_sharding(run.mesh, len(train['label']))
  images = distributed.put(train['image'].reshape(len(train['image']), -1), sharding)
  labels = distributed.put(train['label'], sharding)
  spe = run.plan.steps_per_epoch

  def chunks(state, epoch, done):
    yield run.compiled['shuffle'](state.rng, np.int32(epoch), images, labels), done, spe - done
  return chunks


def host_chunks(run: Run, train) -> ChunkSource:
  """The stream and tfds modes: [K, B, ...] chunks from the host (`train`'s arrays, or tf.data),
  each process reading its rows of every global batch, put on the devices by a background thread."""
  config, plan = run.config, run.plan
  stream = (batches.HostStream(train) if plan.input_mode == 'stream'
            else batches.TfdsStream(config.data, 'train'))
  sharding = distributed.batch_sharded(run.mesh, 1)

  def chunks(state, epoch, done):
    del state
    host = stream.chunks(config.batch_size, plan.stream_chunk_steps,
                         shuffle_seed=batches.epoch_seed(config.seed, epoch), skip_batches=done,
                         process_index=jax.process_index(), process_count=jax.process_count())
    yield from batches.background(
        (distributed.put_local_batch(chunk, sharding), 0, n) for chunk, n in host)
  return chunks


def run_epoch(run: Run, state, history, epoch: int, chunks: ChunkSource):
  """Runs the rest of `epoch`, chunk by chunk, in pieces that end at the plan's check points;
  returns (state, whether to stop)."""
  plan, program = run.plan, run.compiled['train_chunk']
  step = int(state.step)
  started = time.perf_counter()
  for data, first, count in chunks(state, epoch, step - epoch * plan.steps_per_epoch):
    offset = first
    while offset < first + count:
      n = min(first + count - offset, plan.next_check(step) - step)
      run.out.profile(step, plan)
      state = program(state, data, np.int32(offset), np.int32(n))
      step, offset = step + n, offset + n
      if step == plan.next_check(step - n) and at_check(run, state, history, epoch, started):
        return state, True
  return state, False


def at_check(run: Run, state, history: list[dict], epoch: int, epoch_started: float) -> bool:
  """Divergence check, mid-epoch checkpoint, agreed stop and progress; True when stopping. Every
  process calls it at the same steps, so the stop decision is collective and identical."""
  step = int(state.step)  # Waits for the chunk to finish.
  check_finite(run, state)
  at_epoch_end = step % run.plan.steps_per_epoch == 0
  stop = distributed.any_process(signals.received() is not None)  # All processes stop together.
  if not at_epoch_end and (stop or run.plan.checkpoint_due(step)):
    run.save(state, history)
  if stop and not at_epoch_end:
    raise signals.error(step, run.plan.steps_per_epoch, run.ckpt.directory)
  if not at_epoch_end:
    run.out.progress(epoch, step - epoch * run.plan.steps_per_epoch, run.plan.steps_per_epoch,
                     time.perf_counter() - epoch_started)
  return stop  # At an epoch end the epoch's checkpoint comes first; the loop stops after it.


def end_epoch(run: Run, state, epoch: int, seconds: float, test_sums):
  """The epoch's entry for metrics.jsonl from its running sums, and the state with them reset."""
  train_sums = jax.device_get((state.loss_sum, state.correct, state.count))
  entry = metrics.epoch_entry(epoch, int(state.step), run.plan, train_sums, test_sums, seconds,
                              per_model=run.model.num_models > 1)
  # Fresh buffers for each field: the state is donated, and one buffer may not be donated twice.
  repl = distributed.replicated(run.mesh)
  zeros = lambda a: jax.device_put(np.zeros(a.shape, a.dtype), repl)
  state = state.replace(loss_sum=zeros(state.loss_sum), correct=zeros(state.correct),
                        count=zeros(state.count))
  return state, entry


def check_finite(run: Run, state) -> None:
  """Raises DivergenceError at the first non-finite loss, or non-finite parameters."""
  run.checked['step'] = -1
  bad = int(state.first_nonfinite)
  if bad < 0 and not bool(run.compiled['finite'](state.params)):
    bad = int(state.step) - 1  # A non-finite gradient in the chunk's last step.
  if bad >= 0:
    last = run.ckpt.latest_step()
    kept = (f'the last good checkpoint (step {last}) is kept' if last is not None
            else 'no checkpoint was written')
    spe = run.plan.steps_per_epoch
    raise DivergenceError(
        f'non-finite loss or parameters at epoch {bad // spe + 1}, step {bad % spe + 1} (global '
        f'step {bad + 1}); training stopped and {kept}. Lower --config.learning_rate (now '
        f'{run.config.learning_rate}); if it diverged right after resuming, that checkpoint may '
        'be damaged: move it aside or start over with --fresh.')
  run.checked['step'] = int(state.step)


def test_set_on_devices(run: Run, test) -> dict:
  """The test set as padded batches [S, B, ...] on the devices, split over the data axis."""
  plan = run.plan
  padded = batches.pad_batch(test, plan.num_test_batches * plan.eval_batch_size)
  sharding = distributed.batch_sharded(run.mesh, 1)
  return {k: distributed.put(v.reshape((-1, plan.eval_batch_size) + v.shape[1:]), sharding)
          for k, v in padded.items()}
