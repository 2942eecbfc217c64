"""Batches for the training loop: masked padding, host streams of padded chunks (numpy, or the
tf.data pipeline), and a background thread that keeps the next chunks coming.

A chunk is `{'image': uint8 [K, B, 28, 28], 'label': int32 [K, B], 'mask': float32 [K, B]}`: K
global batches (each process keeps its rows of every one), the padding rows masked out.
"""

import queue
import threading
from typing import Iterable, Iterator

import numpy as np

from fmnist_jax import data
from fmnist_jax.config import DATA_SEED_OFFSET

Chunk = dict[str, np.ndarray]


def _append_zeros(array: np.ndarray, count: int) -> np.ndarray:
  """`array` with `count` zero rows after its own: the padding rows (mask 0)."""
  return np.concatenate([array, np.zeros((count,) + array.shape[1:], array.dtype)])


class _Stream:
  """Chunks of padded global batches in a seeded order; a subclass gives the order of a pass
  (`_order`) and gathers the chunks of example indices (`_gather`), N being the zero example."""

  _size: int  # N, the number of examples.

  def chunks(self, global_batch: int, chunk_batches: int, *, shuffle_seed: int,
             skip_batches: int = 0, process_index: int = 0, process_count: int = 1
             ) -> Iterator[tuple[Chunk, int]]:
    """Yields (chunk, n): this process's rows of `chunk_batches` global batches of a pass, n of
    them real (the others zeros, mask 0). The pass's order is padded once, with the zero example,
    to whole chunks, so no batch is padded on its own.

    Args:
      global_batch: examples per step over all processes.
      chunk_batches: K, batches per chunk; arrays are [K, local_batch, ...].
      shuffle_seed: fixes this pass's order (one seed per epoch), so a resumed pass replays it.
      skip_batches: batches to skip first, to resume inside a pass; chunks start at
        skip_batches + i * K.
      process_index: this process's index; it keeps rows [index * local, (index + 1) * local).
      process_count: number of processes sharing each global batch.
    """
    n = self._size
    steps = -(-n // global_batch)
    num_chunks = -(-(steps - skip_batches) // chunk_batches)
    total = (skip_batches + num_chunks * chunk_batches) * global_batch
    order = self._order(shuffle_seed).astype(np.int32)
    padded = np.concatenate([order, np.full(total - n, n, np.int32)])
    local = global_batch // process_count
    rows = slice(process_index * local, (process_index + 1) * local)
    grid = padded.reshape(-1, global_batch)[skip_batches:, rows]
    chunks = self._gather(grid.reshape(num_chunks, chunk_batches, local))
    for i, chunk in enumerate(chunks):
      yield chunk, min(chunk_batches, steps - skip_batches - i * chunk_batches)


class TfdsStream(_Stream):
  """The classic streaming pipeline: tfds -> tf.data (decode once, shuffle, batch, prefetch).

  The split is decoded once into tensors; each pass, tf.data shuffles the example indices and
  gathers whole chunks, so one numpy array per chunk (not per batch) crosses into Python.
  """

  def __init__(self, data_config, split: str):
    self._config = data_config
    tf = data.import_tensorflow()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._tf = tf
    builder = data.tfds_builder(data.data_dir(data_config))
    if not builder.is_prepared():
      data.load(data_config)  # Prepares it (offline or by download) with the usual errors.
      builder = data.tfds_builder(data.data_dir(data_config))
    whole = tfds.as_numpy(builder.as_dataset(
        split=split, batch_size=-1, shuffle_files=False,
        read_config=tfds.ReadConfig(try_autocache=False)))
    self._size = len(whole['label'])
    self._image = tf.constant(_append_zeros(whole['image'][..., 0], 1))
    self._label = tf.constant(_append_zeros(whole['label'].astype(np.int32), 1))

  def _order(self, shuffle_seed: int) -> np.ndarray:
    """tf.data's shuffle (buffer `data.shuffle_buffer`) of the indices: the order a shuffle of
    the examples themselves gives, without moving images around."""
    tf = self._tf
    order = tf.data.Dataset.range(self._size).shuffle(
        self._config.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    return order.batch(self._size).get_single_element().numpy()

  def _gather(self, grid: np.ndarray) -> Iterator[Chunk]:
    tf, n = self._tf, self._size
    image, label = self._image, self._label

    def gather(indices):
      return {'image': tf.gather(image, indices), 'label': tf.gather(label, indices),
              'mask': tf.cast(indices < n, tf.float32)}

    # One gather per chunk needs no pool of threads; one would take cores the training loop needs.
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    ds = tf.data.Dataset.from_tensor_slices(grid).map(gather).prefetch(1)
    return ds.with_options(options).as_numpy_iterator()


class HostStream(_Stream):
  """Chunks streamed from the decoded copy in host memory, shuffled with numpy (no TensorFlow):
  for data that fits in the host's memory but not on the device."""

  def __init__(self, split: dict[str, np.ndarray]):
    self._size = len(split['label'])
    self._arrays = {k: _append_zeros(v, 1) for k, v in split.items()}

  def _order(self, shuffle_seed: int) -> np.ndarray:
    return np.random.default_rng(shuffle_seed).permutation(self._size)

  def _gather(self, grid: np.ndarray) -> Iterator[Chunk]:
    for indices in grid:
      chunk = {k: v[indices] for k, v in self._arrays.items()}
      chunk['mask'] = (indices < self._size).astype(np.float32)
      yield chunk


def epoch_seed(seed: int, epoch: int) -> int:
  """The host shuffle seed of one epoch (stream and tfds modes): fixed, so a resumed epoch
  replays it; the prime that offsets the data key keeps two seeds' epochs apart."""
  return (seed * DATA_SEED_OFFSET + epoch) % (2**31 - 1)


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads a batch's arrays with zero rows to `batch_size` rows and adds `mask` (1 real, 0
  padding): the host's one way to fill a last batch, never dropping an example."""
  n = len(next(iter(batch.values())))
  if n == batch_size:  # Every batch but the last: no copies.
    return {**batch, 'mask': np.ones(batch_size, np.float32)}
  out = {k: _append_zeros(v, batch_size - n) for k, v in batch.items()}
  out['mask'] = (np.arange(batch_size) < n).astype(np.float32)
  return out


def background(iterable: Iterable, depth: int = 2) -> Iterator:
  """Yields the items of `iterable`, produced by a daemon thread up to `depth` items ahead; an
  exception in the thread is raised here. Closing the generator stops the thread."""
  items = queue.Queue(maxsize=depth)
  done = object()
  stopped = threading.Event()

  def produce():
    try:
      for item in iterable:
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

  threading.Thread(target=produce, daemon=True).start()
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
