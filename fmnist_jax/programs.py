"""The compiled programs of a run, built in one place: the trainer runs them, the export lowers them
and the TPU/GPU checks compile them for chips this machine does not have.

    progs = build(model, optimizer, plan, mesh)   # {name: Program}, nothing traced yet
    compiled = compile_all(progs)                 # ahead of time, timed, through JAX's cache

'train_chunk' runs many steps over batches [S, B, ...] (the shuffled epoch, or a host chunk);
'shuffle' (device mode), 'evaluate', 'predict' and 'finite' the rest. Every argument is a
ShapeDtypeStruct with the sharding the trainer gives it: replicated state, batch-sharded data.
JAX's persistent compilation cache (`compile_cache_dir`) keeps them across processes.
"""

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from fmnist_jax import IMAGE_PIXELS, IMAGE_SIZE
from fmnist_jax import distributed
from fmnist_jax import inference
from fmnist_jax import model as model_lib
from fmnist_jax import steps as steps_lib
from fmnist_jax.hardware import targets
from fmnist_jax.run import signals
from fmnist_jax.plan import ModelSpec, OptimizerSpec, RunPlan


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted function with the specs of its arguments (static ones in `kwargs`)."""
  jitted: Callable
  args: tuple
  kwargs: dict = dataclasses.field(default_factory=dict)
  donated: bool = False  # Whether the first argument (the train state) is donated.

  def lower(self):
    return self.jitted.lower(*self.args, **self.kwargs)


def _spec(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _batches(mesh, steps: int, batch: int, flat: bool = False) -> dict:
  """Specs of `steps` batches [steps, batch, ...] (or one batch [batch, ...] for steps=0), their
  rows split over the devices."""
  image = (IMAGE_PIXELS,) if flat else (IMAGE_SIZE, IMAGE_SIZE)
  lead = (steps,) if steps else ()
  sharding = distributed.batch_sharded(mesh, len(lead))
  return {'image': _spec(lead + (batch,) + image, jnp.uint8, sharding),
          'label': _spec(lead + (batch,), jnp.int32, sharding),
          'mask': _spec(lead + (batch,), jnp.float32, sharding)}


def build(model: ModelSpec, optimizer: OptimizerSpec, plan: RunPlan, mesh,
          graphdef=None) -> dict[str, Program]:
  """Every program the trainer runs on `mesh`, with its argument specs."""
  graphdef = graphdef if graphdef is not None else model_lib.graphdef(model)
  steps = steps_lib.make_steps(model, optimizer, graphdef)
  repl, rows = distributed.replicated(mesh), distributed.batch_sharded(mesh, 1)
  state = _state(model, optimizer, repl)
  scalar = _spec((), jnp.int32, repl)
  b = plan.batch_size
  if plan.input_mode == 'device':  # The shuffled epoch, flat images (a faster gather).
    data = _batches(mesh, plan.steps_per_epoch, b, flat=True)
  else:  # A host chunk.
    data = _batches(mesh, plan.stream_chunk_steps, b)
  progs = {
      # start and num_steps are runtime values: one program for every chunk length.
      'train_chunk': Program(jax.jit(steps.train_chunk, donate_argnums=0),
                             (state, data, scalar, scalar), donated=True),
      'evaluate': Program(jax.jit(steps.evaluate),
                          (state.params,
                           _batches(mesh, plan.num_test_batches, plan.eval_batch_size))),
      'predict': Program(jax.jit(inference.make_probs_fn(model, graphdef)),
                         (state.params, _batches(mesh, 0, plan.eval_batch_size)['image'])),
      'finite': Program(jax.jit(steps_lib.params_finite), (state.params,)),
  }
  if plan.input_mode == 'device':
    dataset = distributed.dataset_sharding(mesh, plan.num_train)
    progs['shuffle'] = Program(
        jax.jit(steps_lib.shuffle, static_argnames='batch_size', out_shardings=rows),
        (state.rng, scalar, _spec((plan.num_train, IMAGE_PIXELS), jnp.uint8, dataset),
         _spec((plan.num_train,), jnp.int32, dataset)), {'batch_size': b})
  return progs


def one_step(model: ModelSpec, optimizer: OptimizerSpec, plan: RunPlan, mesh) -> Program:
  """One train step on one batch, for the hardware tools' estimates of a step (the trainer never
  runs it: the chunk's cost also holds what a call pays once, e.g. laying out its data)."""
  steps = steps_lib.make_steps(model, optimizer, model_lib.graphdef(model))
  state = _state(model, optimizer, distributed.replicated(mesh))
  return Program(jax.jit(steps.train_step), (state, _batches(mesh, 0, plan.batch_size)))


def _state(model: ModelSpec, optimizer: OptimizerSpec, sharding):
  return jax.tree.map(lambda a: _spec(a.shape, a.dtype, sharding),
                      steps_lib.abstract_state(model, optimizer))


# Compilation, timed, through JAX's persistent cache ----------------------------------------------


def cache_folder(setting: str) -> str:
  """The compile cache folder of `config.compile_cache_dir` ('auto', a path, or '' = off)."""
  if setting == 'auto':
    base = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
    return os.path.join(base, 'fmnist_jax', 'jax')
  return os.path.expanduser(setting)


def use_compile_cache(setting: str) -> str:
  """Turns JAX's persistent compilation cache on in that folder (or off with ''); returns the
  folder in use ('' when off or not creatable: a cache only ever costs compile time)."""
  folder = cache_folder(setting)
  if folder:
    try:
      os.makedirs(folder, exist_ok=True)
    except OSError:
      folder = ''
  if getattr(jax.config, 'jax_compilation_cache_dir', None) != (folder or None):
    # JAX opens its cache once, in the folder set then: a later run in the same process (a
    # notebook, a test) with another folder makes it open that one.
    jax_cache.reset_cache()
  jax.config.update('jax_compilation_cache_dir', folder or None)
  jax.config.update('jax_enable_compilation_cache', bool(folder))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  _listen_once()
  return folder


_EVENTS = {'/jax/compilation_cache/cache_hits': 0,
           '/jax/compilation_cache/compile_requests_use_cache': 0}


def _count(event: str, **kwargs) -> None:
  del kwargs
  if event in _EVENTS:
    _EVENTS[event] += 1


def _listen_once() -> None:
  if not getattr(_count, 'registered', False):
    jax.monitoring.register_event_listener(_count)
    _count.registered = True


@dataclasses.dataclass
class Compiled:
  """Compiled programs by name, the seconds compiling took, and whether JAX's cache held all."""
  programs: dict[str, Any]
  seconds: float
  cache_hit: bool | None  # None with the cache off.

  def __getitem__(self, name: str):
    return self.programs[name]


def compile_all(progs: dict[str, Program], memory_limit: int | None = None) -> Compiled:
  """Compiles the programs ahead of time, so compile time is kept apart from training; refuses in
  one line, before anything runs, one that needs more than `memory_limit` bytes per device
  (XLA's memory analysis: arguments such as the state and the resident data, outputs,
  temporaries, code)."""
  before = dict(_EVENTS)
  start = time.perf_counter()
  compiled = {}
  for name, program in progs.items():
    compiled[name] = program.lower().compile()
    signals.check()  # A signal that came while XLA compiled: nothing is written yet.
  seconds = time.perf_counter() - start
  if memory_limit:
    kind = jax.devices()[0].device_kind
    targets.check_memory([{'topology': kind, 'program': name, 'memory_bytes': memory(c)}
                          for name, c in compiled.items()], lambda _: memory_limit)
  requests, hits = (_EVENTS[k] - before[k] for k in (
      '/jax/compilation_cache/compile_requests_use_cache', '/jax/compilation_cache/cache_hits'))
  on = bool(getattr(jax.config, 'jax_compilation_cache_dir', None))
  return Compiled(compiled, seconds, (requests > 0 and hits == requests) if on else None)


def memory(compiled) -> dict:
  """XLA's memory analysis of a compiled program, in bytes per device."""
  stats = compiled.memory_analysis()
  return {'argument': stats.argument_size_in_bytes, 'output': stats.output_size_in_bytes,
          'temp': stats.temp_size_in_bytes, 'generated_code': stats.generated_code_size_in_bytes}


def cost(compiled) -> dict:
  """XLA's cost analysis of a compiled program ('flops', 'bytes accessed', ...; per device);
  {} where the backend has none (XLA:GPU without a GPU)."""
  return compiled.cost_analysis() or {}


def step_flops(compiled_chunk) -> float | None:
  """The flops of one train step: XLA's cost analysis of the compiled train chunk, which counts
  its loop body (one step, and that step's batch gather) once."""
  try:
    flops = cost(compiled_chunk).get('flops')
  except Exception:  # pylint: disable=broad-except  (a backend without cost analysis)
    return None
  return float(flops) if flops and flops > 0 else None
