"""Fashion-MNIST input: tfds's official dataset, prepared offline from local IDX files if needed.

Three layers, cheapest first (docs/data.md): a decoded uint8 copy beside the tfds data, loaded
without TensorFlow (the warm start); the tfds dataset `fashion_mnist`, read to build that copy and
streamed by the `tfds` input mode; its preparation, from local IDX files or by tfds's download.
Every write is atomic; an offline machine without data is told so before TensorFlow loads. Numpy
arrays out: nothing here knows models or devices.
"""

import contextlib
import glob
import io
import json
import os
import shutil
import socket
import sys
import threading
import time
import urllib.parse
import zipfile

import numpy as np

from fmnist_jax.data import idx
from fmnist_jax.run import workdir as workdir_lib
from fmnist_jax.errors import UserError

DATASET = 'fashion_mnist'
MANUAL_DIR_ENV = 'FMNIST_JAX_MANUAL_DIR'
DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
SPLITS = ('train', 'test')
TFDS_VERSION = '3.0.1'  # tfds's fashion_mnist version; its files are those of this version.
# Where tfds downloads from (tfds.image_classification.FashionMNIST.URL): known here so that an
# offline machine is told so before TensorFlow loads.
DOWNLOAD_URL = 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'

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
                      f'Fashion-MNIST IDX .gz files ({", ".join(idx.NAMES)}); fix the path '
                      'or leave it empty to use tfds.')
    return data_config.manual_dir
  for candidate in (os.environ.get(MANUAL_DIR_ENV), DEBIAN_DIR):
    if candidate and idx.has_files(candidate):
      return candidate
  return None


def load(data_config, verbose: bool = False) -> Arrays:
  """Returns {'train'|'test': {'image': uint8 [N, 28, 28], 'label': int32 [N]}}.

  Uses the decoded copy when it is valid; otherwise prepares (or downloads) the tfds dataset,
  reads it and writes the copy. A damaged prepared dataset is rebuilt when the IDX files (or a
  download) can rebuild it. Raises DataError with the fix when nothing works.
  """
  root = data_dir(data_config)
  arrays = _load_copy(root)
  if arrays is not None:
    return arrays
  source = manual_dir(data_config)
  # Prepared (perhaps damaged) data is read by tfds, and its damage healed or named below.
  if source is None and not glob.glob(os.path.join(root, DATASET, '*', 'dataset_info.json')):
    _check_download(data_config)
  with workdir_lib.storage_errors(root):
    start = time.perf_counter()
    _remove_leftovers(root)
    try:
      arrays, version = _from_tfds(root, source, data_config, verbose)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (any reader error means damage)
      folder = os.path.join(root, DATASET)
      if source is None and not data_config.download:
        raise DataError(f'the prepared dataset in {folder} is damaged ({type(e).__name__}) and '
                        f'there are no IDX files to rebuild it from; delete {folder} and '
                        f'{HOW_TO_GET}.') from None
      print(f'warning: the prepared dataset in {folder} is damaged ({type(e).__name__}); '
            'rebuilding it.', file=sys.stderr, flush=True)
      _remove_prepared(root)
      arrays, version = _from_tfds(root, source, data_config, verbose)
    buffer = io.BytesIO()
    np.savez(buffer, **{f'{split}_{k}': v for split in SPLITS for k, v in arrays[split].items()})
    # A reader sees the old state or the complete new file, never half of it.
    workdir_lib.write_atomic(_copy_path(root, version), buffer.getvalue())
  if verbose:
    print(f'Prepared {DATASET} {version} in {root} ({time.perf_counter() - start:.1f} s).',
          flush=True)
  return arrays


def _check_download(data_config) -> None:
  """Raises DataError when tfds may not download (data.download off) or its host is unreachable:
  decided in seconds, before TensorFlow loads, instead of minutes of tfds's retries."""
  if not data_config.download:
    raise DataError(f'Fashion-MNIST not found in {data_dir(data_config)} nor as local IDX files, '
                    f'and data.download is off; {HOW_TO_GET}.')
  unreachable = _unreachable(DOWNLOAD_URL)
  if unreachable:
    raise DataError(f'Fashion-MNIST not found locally and tfds cannot download it '
                    f'({DOWNLOAD_URL} is unreachable: {unreachable}); {HOW_TO_GET}.')


def _from_tfds(root: str, source: str | None, data_config, verbose: bool) -> tuple[Arrays, str]:
  """The arrays of the prepared tfds dataset (prepared first if needed), and its version."""
  local = None
  if source is not None and _tfds_counts(root, TFDS_VERSION) is None:
    local = read_idx(source)  # Bad files fail here, in a second, before TensorFlow loads.
  builder = tfds_builder(root)
  if not builder.is_prepared():
    builder = _prepare(root, source, data_config, verbose, local)
  arrays = _read_tfds(builder)
  for split in SPLITS:
    if len(arrays[split]['label']) != idx.FILES[split][2]:
      raise ValueError(f'{split} split has {len(arrays[split]["label"])} examples')
  return arrays, str(builder.version)


def _remove_prepared(root: str) -> None:
  """Deletes the prepared tfds versions and decoded copies (derived data, rebuilt next)."""
  folder = os.path.join(root, DATASET)
  for name in os.listdir(folder) if os.path.isdir(folder) else ():
    target = os.path.join(folder, name)
    if os.path.isdir(target) and not os.path.islink(target):
      shutil.rmtree(target)
    elif name.startswith('fmnist_jax-'):
      os.unlink(target)


def _remove_leftovers(root: str) -> None:
  """Removes what an interrupted preparation left: tfds's incomplete.* folders, our .tmp files."""
  folder = os.path.join(root, DATASET)
  for path in glob.glob(os.path.join(folder, 'incomplete.*')) + glob.glob(
      os.path.join(folder, '.fmnist_jax-*.tmp')):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.unlink(path)


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


def import_tensorflow():
  """Imports TensorFlow with every GPU and TPU hidden from it, so it never takes their memory."""
  # TensorFlow only decodes and batches here: no start-up lines, no oneDNN banner.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass  # Already initialised (devices hidden by an earlier call) or no such kind.
  return tf


def tfds_builder(root: str, local: Arrays | None = None):
  """tfds's fashion_mnist builder; with `local` arrays (validated, from IDX files), one that
  prepares the dataset from them instead of downloading (tfds would reject Debian's gzip files by
  checksum although their content is identical): name, version, features and files stay those of
  `fashion_mnist`."""
  workdir_lib.check_writable(os.path.join(root, DATASET), 'data dir',
                             'choose another with --config.data.data_dir or $TFDS_DATA_DIR',
                             DataError)
  import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  if local is None:
    return tfds.builder(DATASET, data_dir=root)

  class LocalFashionMNIST(tfds.image_classification.FashionMNIST, skip_registration=True):
    name = DATASET

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download.
      return [tfds.core.SplitGenerator(name=split, gen_kwargs={'split': split})
              for split in SPLITS]

    def _generate_examples(self, split):
      for i, (image, label) in enumerate(zip(local[split]['image'], local[split]['label'])):
        yield i, {'image': image[..., None], 'label': int(label)}

  return LocalFashionMNIST(data_dir=root)


def read_idx(source: str) -> Arrays:
  """Both splits from the IDX files in `source`, validated (fmnist_jax.data.idx)."""
  return {split: dict(zip(('image', 'label'), idx.load_split(source, split))) for split in SPLITS}


def _prepare(root: str, source: str | None, data_config, verbose: bool, local: Arrays | None):
  """Prepares the tfds dataset from the IDX files in `source` (`local`: those already read), else
  by tfds's download; returns the builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if source is None:
    _check_download(data_config)  # Again: `load` did not check when damaged data was there.
    builder = tfds_builder(root)
    if verbose:
      print(f'No local IDX files; asking tfds to download {DATASET}.', flush=True)
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      cause = ' '.join(str(e).split())
      raise DataError(f'Fashion-MNIST not found locally and tfds could not download it '
                      f'({type(e).__name__}: {cause}); {HOW_TO_GET}.') from None
    return builder
  builder = tfds_builder(root, local or read_idx(source))
  if verbose:
    print(f'Preparing tfds {DATASET} {builder.version} from {source}.', flush=True)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def _unreachable(url: str, timeout: float = 3.0) -> str | None:
  """Why `url`'s host cannot be reached (name lookup or TCP connect), or None when it can."""
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == 'https' else 80)
  answer = []

  def probe():
    try:
      with socket.create_connection((parts.hostname, port), timeout=timeout):
        answer.append(None)
    except OSError as e:
      answer.append(e.strerror or type(e).__name__)

  # In a thread: the socket's timeout does not cover the name lookup, which can hang for longer.
  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout)
  return answer[0] if answer else f'no answer within {timeout:g} s'


def _read_tfds(builder) -> Arrays:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  arrays = {}
  for split in SPLITS:
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    arrays[split] = {'image': data['image'][..., 0].astype(np.uint8),
                     'label': data['label'].astype(np.int32)}
  return arrays
