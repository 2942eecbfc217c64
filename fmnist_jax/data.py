"""Fashion-MNIST input: the official tfds dataset, prepared offline from IDX files when needed.

Three layers, cheapest first:

1. A decoded uint8 copy (`<data_dir>/fashion_mnist/fmnist_jax-<version>.npz`) beside the tfds data,
   checked against the tfds data's split counts. Loading it imports neither TensorFlow nor tfds:
   this is the warm start.
2. The tfds dataset `fashion_mnist` in `<data_dir>`: read through tfds (needs TensorFlow) to build
   the copy above, and streamed by the `tfds` input mode.
3. Preparing that tfds dataset: from local IDX files when they can be found (config field
   `data.manual_dir`, then `$FMNIST_JAX_MANUAL_DIR`, then Debian's `dataset-fashion-mnist` path),
   otherwise by tfds's own download. Both are atomic: tfds writes into a temporary folder and
   renames it, and the copy is written to a temporary file and renamed.

This module knows nothing about models or devices: it returns numpy arrays and numpy batches of
`{'image': uint8 [B, 28, 28], 'label': int32 [B], 'mask': float32 [B]}`.
"""

import glob
import json
import os
import tempfile
import time
import zipfile
from typing import Iterator
from unittest import mock

import numpy as np

from fmnist_jax import idx
from fmnist_jax.errors import UserError

DATASET = 'fashion_mnist'
MANUAL_DIR_ENV = 'FMNIST_JAX_MANUAL_DIR'
DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
SPLITS = ('train', 'test')

HOW_TO_GET = (
    'install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point '
    f'--config.data.manual_dir (or ${MANUAL_DIR_ENV}) at a folder with the four '
    'Fashion-MNIST IDX .gz files, or run where tfds can download it (network)')

Arrays = dict[str, dict[str, np.ndarray]]


class DataError(UserError):
  """The data cannot be found, read, prepared or written."""


def data_dir(data_config) -> str:
  """The tfds data dir: the config's, else $TFDS_DATA_DIR, else tfds's default."""
  path = data_config.data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return os.path.abspath(os.path.expanduser(path))


def manual_dir(data_config) -> str | None:
  """The first folder holding the four IDX files: config, environment, Debian; or None."""
  if data_config.manual_dir:
    if not idx.has_files(data_config.manual_dir):
      raise DataError(f'data.manual_dir={data_config.manual_dir} does not hold the four '
                      f'Fashion-MNIST IDX .gz files ({", ".join(_idx_names())}); fix the path '
                      'or leave it empty to use tfds.')
    return data_config.manual_dir
  for candidate in (os.environ.get(MANUAL_DIR_ENV), DEBIAN_DIR):
    if candidate and idx.has_files(candidate):
      return candidate
  return None


def load(data_config, verbose: bool = False) -> Arrays:
  """Returns {'train'|'test': {'image': uint8 [N, 28, 28], 'label': int32 [N]}}.

  Uses the decoded copy when it is valid; otherwise prepares (or downloads) the tfds dataset,
  reads it and writes the copy. Raises DataError with the fix when nothing works.
  """
  root = data_dir(data_config)
  arrays = _load_copy(root)
  if arrays is not None:
    return arrays
  start = time.perf_counter()
  builder = _builder(root)
  if not builder.is_prepared():
    _prepare(builder, data_config, verbose)
  arrays = _read_tfds(builder)
  _write_copy(root, str(builder.version), arrays)
  if verbose:
    print(f'Prepared {DATASET} {builder.version} in {root} '
          f'({time.perf_counter() - start:.1f} s).', flush=True)
  return arrays


def _idx_names():
  return [name for images, labels, _ in idx.FILES.values() for name in (images, labels)]


def _copy_path(root: str, version: str) -> str:
  return os.path.join(root, DATASET, f'fmnist_jax-{version}.npz')


def _tfds_counts(root: str, version: str) -> dict[str, int] | None:
  """Split sizes from the prepared tfds dataset's dataset_info.json (plain JSON, no TF)."""
  try:
    with open(os.path.join(root, DATASET, version, 'dataset_info.json')) as f:
      info = json.load(f)
    return {s['name']: sum(int(n) for n in s['shardLengths']) for s in info['splits']}
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _load_copy(root: str) -> Arrays | None:
  """The decoded copy, if one exists that matches a prepared tfds dataset; else None."""
  for path in sorted(glob.glob(_copy_path(root, '*')), reverse=True):
    version = os.path.basename(path)[len('fmnist_jax-'):-len('.npz')]
    counts = _tfds_counts(root, version)
    if counts is None:
      continue  # No tfds data beside it (deleted or never finished): do not trust the copy.
    try:
      with np.load(path) as f:
        arrays = {s: {'image': f[f'{s}_image'], 'label': f[f'{s}_label']} for s in SPLITS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
      continue  # Truncated or foreign file: rebuild it from the tfds data.
    if all(_valid(arrays[s], counts.get(s)) for s in SPLITS):
      return arrays
  return None


def _valid(split: dict[str, np.ndarray], count: int | None) -> bool:
  image, label = split['image'], split['label']
  return (image.dtype == np.uint8 and image.shape == (count, idx.IMAGE_SIZE, idx.IMAGE_SIZE)
          and label.dtype == np.int32 and label.shape == (count,)
          and 0 <= label.min() and label.max() < idx.NUM_CLASSES)


def _write_copy(root: str, version: str, arrays: Arrays) -> None:
  path = _copy_path(root, version)
  flat = {f'{s}_{k}': v for s in SPLITS for k, v in arrays[s].items()}
  # Temporary file + rename: a reader sees the old state or the complete new file, never half.
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.npz.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **flat)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def import_tensorflow():
  """Imports TensorFlow with every GPU and TPU hidden from it, so it never takes their memory."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass  # Already initialised (devices hidden by an earlier call) or no such kind.
  return tf


def _builder(root: str):
  _check_writable(root)
  import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  return tfds.builder(DATASET, data_dir=root)


def _check_writable(root: str) -> None:
  try:
    os.makedirs(os.path.join(root, DATASET), exist_ok=True)
  except OSError as e:
    raise DataError(f'data dir {root} cannot be created ({e.strerror}); choose another with '
                    '--config.data.data_dir or $TFDS_DATA_DIR.') from None
  if not os.access(os.path.join(root, DATASET), os.W_OK):
    raise DataError(f'data dir {root} is not writable; choose another with '
                    '--config.data.data_dir or $TFDS_DATA_DIR.')


class _LocalFiles:
  """Stands in for tfds's DownloadManager: hands the builder validated local IDX files.

  The fashion_mnist builder asks `download_and_extract({'train_data': url, ...})` for paths of
  uncompressed IDX files. tfds would reject Debian's gzip files by checksum although their content
  is identical, so the content was validated instead (fmnist_jax.idx) and is served from here.
  """

  downloaded_size = 0

  def __init__(self, paths: dict[str, str]):
    self._paths = paths

  def download_and_extract(self, urls):
    return {key: self._paths[key] for key in urls}


def _prepare(builder, data_config, verbose: bool) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = manual_dir(data_config)
  if source is None and not data_config.download:
    raise DataError(f'Fashion-MNIST not found in {data_dir(data_config)} nor as local IDX files, '
                    f'and data.download is off; {HOW_TO_GET}.')
  if source is None:
    if verbose:
      print(f'No local IDX files; asking tfds to download {DATASET}.', flush=True)
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      cause = ' '.join(str(e).split())[:120]
      raise DataError(f'Fashion-MNIST not found locally and tfds could not download it '
                      f'({type(e).__name__}: {cause}); {HOW_TO_GET}.') from None
    return
  if verbose:
    print(f'Preparing tfds {DATASET} {builder.version} from {source}.', flush=True)
  with tempfile.TemporaryDirectory(prefix='fmnist_idx_') as tmp:
    paths = {}
    for split in SPLITS:
      images, labels = idx.load_split(source, split)  # Validates magic, sizes, counts, labels.
      for key, array in (('data', images), ('labels', labels)):
        paths[f'{split}_{key}'] = os.path.join(tmp, f'{split}_{key}.idx')
        idx.write(paths[f'{split}_{key}'], array, compress=False)
    with mock.patch.object(builder, '_make_download_manager',
                           lambda *args, **kwargs: _LocalFiles(paths)):
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def _read_tfds(builder) -> Arrays:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  arrays = {}
  for split in SPLITS:
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    arrays[split] = {'image': data['image'][..., 0].astype(np.uint8),
                     'label': data['label'].astype(np.int32)}
  return arrays


class TfdsStream:
  """The classic streaming pipeline: tfds -> tf.data (decode, cache, shuffle, batch, prefetch).

  Every example appears once per pass; the last batch is padded to the global batch size with
  `mask` 0, so one compiled step serves all batches. Each process of a multi-process run reads the
  same global batch and keeps its contiguous slice of rows, so the global batch is the same as in a
  single-process run.
  """

  def __init__(self, data_config, split: str):
    self._config = data_config
    tf = import_tensorflow()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._tf, self._tfds = tf, tfds
    builder = _builder(data_dir(data_config))
    if not builder.is_prepared():
      load(data_config)  # Prepares it (offline or by download) with the usual errors.
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            read_config=tfds.ReadConfig(try_autocache=False))
    # Decoded once and cached in memory: later epochs only shuffle and batch.
    self._ds = ds.map(lambda ex: {'image': ex['image'][..., 0],
                                  'label': tf.cast(ex['label'], tf.int32)},
                      num_parallel_calls=tf.data.AUTOTUNE).cache()

  def batches(self, global_batch: int, *, shuffle_seed: int | None = None, skip_batches: int = 0,
              process_index: int = 0, process_count: int = 1
              ) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's rows of each padded global batch, with `mask`.

    Args:
      global_batch: examples per step over all processes.
      shuffle_seed: fixes this pass's order (one seed per epoch); None keeps the file order.
      skip_batches: batches to skip first, to resume inside an epoch.
      process_index: this process's index; it keeps rows [index * local, (index + 1) * local).
      process_count: number of processes sharing each global batch.
    """
    tf = self._tf
    ds = self._ds
    if shuffle_seed is not None:
      ds = ds.shuffle(self._config.shuffle_buffer, seed=shuffle_seed,
                      reshuffle_each_iteration=False)
    ds = ds.batch(global_batch).skip(skip_batches).prefetch(tf.data.AUTOTUNE)
    local = global_batch // process_count
    rows = slice(process_index * local, (process_index + 1) * local)
    for batch in self._tfds.as_numpy(ds):
      yield {k: v[rows] for k, v in pad_batch(batch, global_batch).items()}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads a batch to `batch_size` rows and adds `mask` (1 real, 0 padding)."""
  n = len(batch['label'])
  if n == batch_size:  # Every batch but the last: no copies.
    return {**batch, 'mask': np.ones(batch_size, np.float32)}
  out = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
         for k, v in batch.items()}
  out['mask'] = (np.arange(batch_size) < n).astype(np.float32)
  return out
