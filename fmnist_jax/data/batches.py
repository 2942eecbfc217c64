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

Chunk = dict[str, np.ndarray]


def chunk_indices(order: np.ndarray, global_batch: int, chunk_batches: int, skip_batches: int,
                  process_index: int, process_count: int) -> np.ndarray:
  """Example indices [C, K, local] of a pass's chunks from batch `skip_batches` on.

  `order` is the pass's permutation of the N examples. It is padded once, with the index N (a
  zero example: mask 0), to whole chunks, so no batch is padded on its own. Each process keeps
  rows [index * local, (index + 1) * local) of every global batch.
  """
  n = len(order)
  steps = -(-n // global_batch)
  num_chunks = -(-(steps - skip_batches) // chunk_batches)
  total = (skip_batches + num_chunks * chunk_batches) * global_batch
  padded = np.concatenate([order.astype(np.int32), np.full(total - n, n, np.int32)])
  local = global_batch // process_count
  grid = padded.reshape(-1, global_batch)[skip_batches:,
                                          process_index * local:(process_index + 1) * local]
  return grid.reshape(num_chunks, chunk_batches, local)


def _real_batches(n: int, global_batch: int, chunk_batches: int, skip_batches: int, chunk: int):
  """How many of chunk `chunk`'s batches hold examples (the last chunk of a pass holds fewer)."""
  steps = -(-n // global_batch)
  return min(chunk_batches, steps - skip_batches - chunk * chunk_batches)


class TfdsStream:
  """The classic streaming pipeline: tfds -> tf.data (decode once, shuffle, batch, prefetch).

  The split is decoded once into tensors; each pass, tf.data shuffles the example indices (the
  same order as shuffling the examples with `data.shuffle_buffer`), and gathers whole chunks of
  padded batches from the decoded tensors, so one numpy array per chunk (not per batch) crosses
  into Python. Each process of a multi-process run reads the same global batches and keeps its
  contiguous slice of rows, so the global batch is the same as in a single-process run.
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
    # One zero example at index N: the padding rows gather it (mask 0).
    self._image = tf.constant(np.concatenate(
        [whole['image'][..., 0], np.zeros((1,) + whole['image'].shape[1:3], np.uint8)]))
    self._label = tf.constant(np.append(whole['label'].astype(np.int32), np.int32(0)))

  def _order(self, shuffle_seed: int) -> np.ndarray:
    """The pass's permutation: tf.data's shuffle (buffer `data.shuffle_buffer`) of the indices,
    the same order a shuffle of the examples themselves gives, without moving images around."""
    tf = self._tf
    order = tf.data.Dataset.range(self._size).shuffle(
        self._config.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    return order.batch(self._size).get_single_element().numpy()

  def chunks(self, global_batch: int, chunk_batches: int, *, shuffle_seed: int,
             skip_batches: int = 0, process_index: int = 0, process_count: int = 1
             ) -> Iterator[tuple[Chunk, int]]:
    """Yields (chunk, n): this process's rows of `chunk_batches` padded global batches of a pass.

    Args:
      global_batch: examples per step over all processes.
      chunk_batches: K, batches per chunk; arrays are [K, local_batch, ...].
      shuffle_seed: fixes this pass's order (one seed per epoch), so a resumed pass replays it.
      skip_batches: batches to skip first, to resume inside a pass; chunks start at
        skip_batches + i * K.
      process_index: this process's index; it keeps rows [index * local, (index + 1) * local).
      process_count: number of processes sharing each global batch.

    Yields:
      ({'image': uint8 [K, local, 28, 28], 'label': int32 [K, local], 'mask': float32 [K, local]},
      n), n the number of real batches; the others are zeros with mask 0.
    """
    tf = self._tf
    n = self._size
    grid = chunk_indices(self._order(shuffle_seed), global_batch, chunk_batches, skip_batches,
                         process_index, process_count)
    image, label = self._image, self._label

    def gather(indices):
      return {'image': tf.gather(image, indices), 'label': tf.gather(label, indices),
              'mask': tf.cast(indices < n, tf.float32)}

    ds = tf.data.Dataset.from_tensor_slices(grid).map(gather).prefetch(1)
    ds = ds.with_options(_pipeline_options(tf))
    for i, chunk in enumerate(ds.as_numpy_iterator()):
      yield chunk, _real_batches(n, global_batch, chunk_batches, skip_batches, i)


def _pipeline_options(tf):
  """tf.data options for a machine whose cores the compiled training loop also needs: one
  gather per chunk needs no pool of threads, and a pool of them would compete with the loop."""
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  return options


class HostStream:
  """Chunks streamed from the decoded copy in host memory: shuffled with numpy, no TensorFlow.

  The same interface and padding as TfdsStream; for data that fits in the host's memory but not
  on the device. The order of a pass is fixed by its seed, so a resumed pass replays it.
  """

  def __init__(self, split: dict[str, np.ndarray]):
    self._size = len(split['label'])
    # One zero example at index N: the padding rows gather it (mask 0).
    self._arrays = {k: np.concatenate([v, np.zeros((1,) + v.shape[1:], v.dtype)])
                    for k, v in split.items()}

  def chunks(self, global_batch: int, chunk_batches: int, *, shuffle_seed: int,
             skip_batches: int = 0, process_index: int = 0, process_count: int = 1
             ) -> Iterator[tuple[Chunk, int]]:
    """Yields (chunk, n) as TfdsStream.chunks does."""
    n = self._size
    order = np.random.default_rng(shuffle_seed).permutation(n)
    grid = chunk_indices(order, global_batch, chunk_batches, skip_batches, process_index,
                         process_count)
    for i, indices in enumerate(grid):
      chunk = {k: v[indices] for k, v in self._arrays.items()}
      chunk['mask'] = (indices < n).astype(np.float32)
      yield chunk, _real_batches(n, global_batch, chunk_batches, skip_batches, i)


def epoch_seed(seed: int, epoch: int) -> int:
  """The host shuffle seed of one epoch (stream and tfds modes): fixed, so a resumed epoch
  replays it."""
  return (seed * 1_000_003 + epoch) % (2**31 - 1)


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads a batch's arrays with zero rows to `batch_size` rows and adds `mask` (1 real, 0
  padding): the host's one way to fill a last batch, never dropping an example."""
  n = len(next(iter(batch.values())))
  if n == batch_size:  # Every batch but the last: no copies.
    return {**batch, 'mask': np.ones(batch_size, np.float32)}
  out = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
         for k, v in batch.items()}
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
