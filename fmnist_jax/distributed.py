"""Devices and hosts through JAX's own machinery: jax.distributed, a Mesh and NamedShardings.

One mesh axis, 'data': the global batch is split over all devices of all processes, parameters
and optimizer state are replicated. With one device every sharding is trivial and nothing changes.
"""

import contextlib
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmnist_jax.errors import UserError

DATA_AXIS = 'data'

# Environment variables that mean "this is one process of several" (JAX's own and the cluster
# managers that jax.distributed.initialize() auto-detects: SLURM, Open MPI, Cloud TPU pods).
_MULTI_PROCESS_ENV = ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE',
                      'MEGASCALE_COORDINATOR_ADDRESS')


def initialize(dist_config) -> None:
  """Starts jax.distributed when the config or the environment asks for several processes.

  Must run before anything touches a device. Config fields win over the environment; with
  neither, this is a single-process run and nothing is done.
  """
  if jax.distributed.is_initialized():
    return
  if dist_config.coordinator_address or dist_config.num_processes > 0:
    kwargs = {}
    if dist_config.coordinator_address:
      kwargs['coordinator_address'] = dist_config.coordinator_address
    if dist_config.num_processes > 0:
      kwargs['num_processes'] = dist_config.num_processes
    if dist_config.process_id >= 0:
      kwargs['process_id'] = dist_config.process_id
    jax.distributed.initialize(**kwargs)
  elif any(os.environ.get(name) for name in _MULTI_PROCESS_ENV):
    jax.distributed.initialize()


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Splits axis `batch_axis` over the data axis (the global batch's rows)."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def check_divisible(global_batch: int, what: str = 'batch_size') -> None:
  """The global batch must split evenly over the devices; says which sizes work if not."""
  n = jax.device_count()
  if global_batch % n:
    lower = max(n, global_batch // n * n)
    raise UserError(f'{what}={global_batch} does not divide over {n} devices; use a multiple '
                    f'of {n}, e.g. --config.{what}={lower} or {lower + n}.')


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
