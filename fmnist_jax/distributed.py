"""Devices and hosts through JAX's own machinery: jax.distributed, a Mesh and NamedShardings.

One mesh axis, 'data': the global batch is split over all devices of all processes, parameters
and optimizer state are replicated. With one device every sharding is trivial and nothing changes.
"""

import contextlib
import functools
import importlib.util
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmnist_jax.errors import UserError
from fmnist_jax.run import signals

DATA_AXIS = 'data'

# Environment variables that mean "this is one process of several" (JAX's own and the cluster
# managers that jax.distributed.initialize() auto-detects: SLURM, Open MPI, Cloud TPU pods).
_MULTI_PROCESS_ENV = ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE',
                      'MEGASCALE_COORDINATOR_ADDRESS')


def initialize(dist_config) -> None:
  """Starts jax.distributed when the config (first) or the environment asks for several
  processes, then JAX's backends. Must run before anything touches a device."""
  if not jax.distributed.is_initialized():
    kwargs = {}
    if dist_config.coordinator_address:
      kwargs['coordinator_address'] = dist_config.coordinator_address
    if dist_config.num_processes > 0:
      kwargs['num_processes'] = dist_config.num_processes
    if dist_config.process_id >= 0:
      kwargs['process_id'] = dist_config.process_id
    if kwargs or any(os.environ.get(name) for name in _MULTI_PROCESS_ENV):
      jax.distributed.initialize(**kwargs)
      signals.collective()  # A signal to one process stops all of them, together.
  start_backends()


# Platforms that JAX_PLATFORMS may name, and the packages of the `[tpu]` and `[cuda*]` installs:
# where one is there, a run on the CPU is worth one line.
_ACCELERATOR_PLATFORMS = ('tpu', 'cuda', 'gpu', 'rocm')
_ACCELERATOR_PACKAGES = (('libtpu', 'TPU'), ('jax_cuda12_plugin', 'CUDA GPU'),
                         ('jax_cuda13_plugin', 'CUDA GPU'))


@functools.cache  # Once per process: train.py and the trainer both initialize.
def start_backends() -> None:
  """Starts JAX's backends: a platform that JAX_PLATFORMS names and that cannot start is a
  UserError; a fall back to the CPU where an accelerator was expected is said in one line (what
  the libraries print about it is kept back unless --verbosity=0: cli.quiet_frameworks)."""
  try:
    backend = jax.default_backend()
  except RuntimeError as e:  # JAX_PLATFORMS names a platform that cannot start.
    raise UserError(f'{" ".join(str(e).split())}; --verbosity=0 shows the libraries\' own '
                    'messages.') from None
  expected = expected_accelerators()
  if backend == 'cpu' and expected and is_main_process():
    print(f'warning: no {" or ".join(expected)} could be used; running on the CPU (--verbosity=0 '
          'shows why).', file=sys.stderr, flush=True)


def expected_accelerators() -> list[str]:
  """The accelerators that JAX_PLATFORMS names or, without it, this install's accelerator
  packages bring (empty for a CPU-only install or JAX_PLATFORMS=cpu)."""
  platforms = jax.config.jax_platforms
  if platforms:
    named = [p.strip() for p in platforms.lower().split(',')]
    return [p.upper() for p in named if p in _ACCELERATOR_PLATFORMS]
  return list(dict.fromkeys(kind for package, kind in _ACCELERATOR_PACKAGES
                            if importlib.util.find_spec(package) is not None))


def describe() -> dict:
  """The run's devices and processes, and the jax that drives them (for summary.json)."""
  return {'backend': jax.default_backend(), 'devices': jax.device_count(),
          'device_kind': jax.devices()[0].device_kind, 'processes': jax.process_count(),
          'jax_version': jax.__version__}


def make_mesh(devices=None) -> Mesh:
  """The 1-D 'data' mesh over `devices` (default: every device of every process)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Splits axis `batch_axis` over the data axis (the global batch's rows)."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds in full (works multi-host)."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_local_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
  """A global batch from each process's contiguous rows of it (the tfds input mode)."""
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)  # One call for the whole dict: less per-step overhead.
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def to_host(array: jax.Array) -> np.ndarray:
  """The whole of a global array on every process (a collective with several processes)."""
  if jax.process_count() == 1:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def in_batches(compiled, params, rows: np.ndarray, mesh: Mesh, batch_size: int) -> np.ndarray:
  """`compiled(params, batch)` over host `rows` in batches of `batch_size` split over the devices
  (every process runs it on the same rows), the last batch padded; the results on the host."""
  from fmnist_jax.data import batches  # pylint: disable=g-import-not-at-top
  padded = batches.pad_batch({'rows': rows}, -(-len(rows) // batch_size) * batch_size)['rows']
  sharding = batch_sharded(mesh)
  out = [to_host(compiled(params, put(padded[i:i + batch_size], sharding)))
         for i in range(0, len(padded), batch_size)]
  return np.concatenate(out)[:len(rows)]


def dataset_sharding(mesh: Mesh, num_examples: int) -> NamedSharding:
  """Each device keeps its share of the dataset; replicated when the rows do not divide evenly."""
  if num_examples % mesh.size:
    return replicated(mesh)
  return batch_sharded(mesh)


@contextlib.contextmanager
def one_writer(lock):
  """Holds `lock` (the workdir's) on process 0 for the whole job; every process learns whether it
  was taken, so all stop together when another training holds it."""
  error = None
  if is_main_process():
    try:
      lock.acquire()
    except UserError as e:
      error = e
  if any_process(error is not None):
    raise error or UserError('another training is writing to this workdir; wait for it to '
                             'finish, stop it, or use another --workdir.')
  try:
    yield
  finally:
    lock.release()


def is_main_process() -> bool:
  """Only process 0 writes summaries, metrics, figures and prints progress."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits for every process (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any one: a collective, so every process must call
  it at the same point (the trainer does, at each chunk boundary)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
