"""Devices and hosts through JAX's own machinery: jax.distributed, a Mesh and NamedShardings.

One mesh axis, 'data': the global batch is split over all devices of all processes, parameters
and optimizer state are replicated. With one device every sharding is trivial and nothing changes.
"""

import atexit
import contextlib
import importlib.util
import os
import re
import select
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmnist_jax import cli
from fmnist_jax.errors import UserError

DATA_AXIS = 'data'

# Environment variables that mean "this is one process of several" (JAX's own and the cluster
# managers that jax.distributed.initialize() auto-detects: SLURM, Open MPI, Cloud TPU pods).
_MULTI_PROCESS_ENV = ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE',
                      'MEGASCALE_COORDINATOR_ADDRESS')


def initialize(dist_config) -> None:
  """Starts jax.distributed when the config or the environment asks for several processes, then
  JAX's backends (see start_backends).

  Must run before anything touches a device. Config fields win over the environment; with
  neither, this is a single-process run and only the backends are started.
  """
  if not jax.distributed.is_initialized():
    kwargs = {}
    if dist_config.coordinator_address:
      kwargs['coordinator_address'] = dist_config.coordinator_address
    if dist_config.num_processes > 0:
      kwargs['num_processes'] = dist_config.num_processes
    if dist_config.process_id >= 0:
      kwargs['process_id'] = dist_config.process_id
    if kwargs or any(os.environ.get(name) for name in _MULTI_PROCESS_ENV):
      if not cli.verbose():
        _drop_gloo_lines()
      jax.distributed.initialize(**kwargs)
  start_backends()


# Platforms that JAX_PLATFORMS may name, and the packages of the `[tpu]` and `[cuda*]` installs:
# where one is there, a run on the CPU is worth one line.
_ACCELERATOR_PLATFORMS = ('tpu', 'cuda', 'gpu', 'rocm')
_ACCELERATOR_PACKAGES = (('libtpu', 'TPU'), ('jax_cuda12_plugin', 'CUDA GPU'),
                         ('jax_cuda13_plugin', 'CUDA GPU'))
_backends_started = False


def start_backends() -> None:
  """Starts JAX's backends with what they print on stderr held back.

  libtpu on a machine without a TPU prints warnings and errors about its own setup ("could not
  determine TPU accelerator type", "unexpected worker hostname") that no environment setting
  silences. They are shown with --verbosity=0 or more; otherwise, a fall back to the CPU where an
  accelerator was expected is said in one line. A platform that JAX_PLATFORMS names and that
  cannot start is a UserError.
  """
  global _backends_started
  if _backends_started:
    return
  _backends_started = True
  error = None
  with cli.held_stderr() as held:
    try:
      backend = jax.default_backend()
    except RuntimeError as e:  # JAX_PLATFORMS names a platform that cannot start.
      error = ' '.join(str(e).split())
  if cli.verbose():
    os.write(2, held)
  if error:
    raise UserError(f'{error}; --verbosity=0 shows the libraries\' own messages.')
  expected = expected_accelerators()
  if backend == 'cpu' and expected and jax.process_index() == 0:
    why = '' if cli.verbose() else ' (--verbosity=0 shows why)'
    print(f'warning: no {" or ".join(expected)} could be used; running on the CPU{why}.',
          file=sys.stderr, flush=True)


def expected_accelerators() -> list[str]:
  """The accelerators that JAX_PLATFORMS names or, without it, this install's accelerator
  packages bring (empty for a CPU-only install or JAX_PLATFORMS=cpu)."""
  platforms = jax.config.jax_platforms
  if platforms:
    named = [p.strip() for p in platforms.lower().split(',')]
    return [p.upper() for p in named if p in _ACCELERATOR_PLATFORMS]
  return list(dict.fromkeys(kind for package, kind in _ACCELERATOR_PACKAGES
                            if importlib.util.find_spec(package) is not None))


# Gloo (the CPU collectives of a multi-process run) prints "[Gloo] Rank N is connected to M peer
# ranks. Expected number of connected peer ranks is : M" for every new group of devices, on stdout
# and stderr, from C++ with no log level to turn it off. Pieces of two such lines written at once
# can interleave, hence the second pattern.
_GLOO_LINE = re.compile(rb'\[Gloo\]|connected peer ranks')


def _drop_gloo_lines() -> None:
  """Filters Gloo's connection lines out of this process's stdout and stderr (file descriptors 1
  and 2), until the process exits."""
  for fd in (1, 2):
    _LineFilter(fd, _GLOO_LINE)


class _LineFilter:
  """Passes what is written to file descriptor `fd` on to where it went before, less the lines
  that match `pattern`. A thread copies; an unfinished line is held at most `hold` seconds (a
  progress bar rewritten with '\r' still moves)."""

  def __init__(self, fd: int, pattern: re.Pattern, hold: float = 0.05):
    self._fd, self._pattern, self._hold = fd, pattern, hold
    self._target = os.dup(fd)
    self._source, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    self._thread = threading.Thread(target=self._copy, daemon=True)
    self._thread.start()
    atexit.register(self.close)

  def _copy(self) -> None:
    pending = b''
    while True:
      ready, _, _ = select.select([self._source], [], [], self._hold)
      if not ready:
        if not self._pattern.search(pending):
          self._write(pending)  # A line left unfinished (a progress bar): pass on what there is.
        pending = b''
        continue
      data = os.read(self._source, 65536)
      if not data:  # Closed: the process is exiting.
        self._write(pending)
        return
      *lines, pending = (pending + data).split(b'\n')
      self._write(b''.join(line + b'\n' for line in lines if not self._pattern.search(line)))

  def _write(self, data: bytes) -> None:
    while data:
      data = data[os.write(self._target, data):]

  def close(self) -> None:
    """Gives `fd` back its old destination; what was written before is passed on first."""
    for stream in (sys.stdout, sys.stderr):
      stream.flush()
    os.dup2(self._target, self._fd)  # Closes the pipe's last write end: the copier sees its end.
    self._thread.join(timeout=5)


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
