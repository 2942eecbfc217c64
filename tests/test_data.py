"""Offline preparation of the official tfds dataset, the warm-start copy, and data errors."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import load_test_config, ROOT

from fmnist_jax import CLASS_NAMES, data
from fmnist_jax.data import batches, idx


def _config(data_dir, manual_dir=''):
  config = load_test_config()
  config.data.data_dir = str(data_dir)
  config.data.manual_dir = str(manual_dir)
  config.data.download = False
  return config.data


def test_prepared_dataset_is_the_official_tfds_one(data_dir, arrays):
  info = json.load(open(os.path.join(data_dir, 'fashion_mnist', '3.0.1', 'dataset_info.json')))
  assert info['name'] == 'fashion_mnist'
  counts = {s['name']: sum(int(n) for n in s['shardLengths']) for s in info['splits']}
  assert counts == {'train': 60_000, 'test': 10_000}
  labels_file = os.path.join(data_dir, 'fashion_mnist', '3.0.1', 'label.labels.txt')
  assert tuple(open(labels_file).read().split('\n')[:10]) == CLASS_NAMES
  assert arrays['train']['image'].shape == (60_000, 28, 28)
  assert arrays['test']['image'].dtype == np.uint8
  assert arrays['train']['image'].max() == 255 and arrays['train']['image'].min() == 0
  np.testing.assert_array_equal(np.bincount(arrays['train']['label']), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(arrays['test']['label']), [1000] * 10)


def test_same_content_as_the_idx_files(arrays, source_dir):
  """tfds shuffles the example order; the multiset of (image, label) pairs is unchanged."""
  images, labels = idx.load_split(source_dir, 'test')
  def keyed(imgs, labs):
    return sorted(zip((i.tobytes() for i in imgs), labs.tolist()))
  assert keyed(images, labels) == keyed(arrays['test']['image'], arrays['test']['label'])


def test_warm_load_does_not_import_tensorflow(data_dir):
  code = ('import sys, time, ml_collections; from fmnist_jax import data; '
          f'c = ml_collections.ConfigDict(dict(data_dir={data_dir!r})); '
          't = time.perf_counter(); a = data.load(c); '
          'print(len(a["train"]["label"]), "tensorflow" in sys.modules, '
          '"tensorflow_datasets" in sys.modules, time.perf_counter() - t)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  count, tf_imported, tfds_imported, seconds = out.stdout.split()
  assert (count, tf_imported, tfds_imported) == ('60000', 'False', 'False')
  print(f'warm load: {float(seconds):.3f} s')


def test_copy_without_tfds_data_is_not_trusted(tmp_path, data_dir):
  """A copy whose tfds data vanished (or never finished) is not used: `load` then prepares the
  dataset as on a first run (the session's data_dir fixture does that)."""
  import shutil
  root = tmp_path / 'tfds'
  shutil.copytree(data_dir, root)
  assert data._load_copy(str(root)) is not None
  shutil.rmtree(root / 'fashion_mnist' / '3.0.1')
  assert data._load_copy(str(root)) is None


def test_corrupt_copy_is_rebuilt(tmp_path, data_dir):
  import shutil
  root = tmp_path / 'tfds'
  shutil.copytree(data_dir, root)
  copy = glob.glob(str(root / 'fashion_mnist' / 'fmnist_jax-*.npz'))[0]
  with open(copy, 'r+b') as f:
    f.truncate(1000)
  arrays = data.load(_config(root))  # Rebuilt from the tfds data, no IDX files needed.
  assert len(arrays['test']['label']) == 10_000
  assert os.path.getsize(copy) > 50_000_000


def _member_bytes(path, name) -> tuple[int, int]:
  """(offset, size) of zip member `name`'s stored bytes in the file at `path`."""
  import struct
  import zipfile
  with zipfile.ZipFile(path) as z:
    info = z.getinfo(name)
  with open(path, 'rb') as f:
    f.seek(info.header_offset)
    header = f.read(30)  # The local file header; its name and extra field follow.
  name_length, extra_length = struct.unpack('<HH', header[26:30])
  return info.header_offset + 30 + name_length + extra_length, info.file_size


def test_same_size_bit_flip_in_the_copy_is_caught_by_its_crc(tmp_path, data_dir, arrays):
  """One flipped bit in a training image's pixels keeps the copy's size, shapes, dtypes and label
  range: only its zip CRC can tell. The copy is rebuilt from the tfds data, never loaded."""
  import shutil
  import zipfile
  root = tmp_path / 'tfds'
  shutil.copytree(data_dir, root)
  (copy,) = glob.glob(str(root / 'fashion_mnist' / 'fmnist_jax-*.npz'))
  start, size = _member_bytes(copy, 'train_image.npy')
  offset = start + size // 2  # Far past the .npy header: a pixel of the training set.
  with open(copy, 'r+b') as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ 0x10]))
  with zipfile.ZipFile(copy) as z:
    assert z.testzip() == 'train_image.npy'  # Damaged, and only there.
  loaded = data.load(_config(root))
  for split in ('train', 'test'):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(loaded[split][key], arrays[split][key])
  with zipfile.ZipFile(copy) as z:
    assert z.testzip() is None  # Written again, whole.


# TensorFlow's own set_visible_devices, watched (it still runs): each call, and whether tfds had
# been imported by then. Then what reads through TensorFlow in each of its two uses.
_WATCH_TENSORFLOW = """
import json, sys
import tensorflow as tf
calls = []
real = tf.config.set_visible_devices
def watched(devices, device_type=None):
  calls.append([len(list(devices)), device_type, 'tensorflow_datasets' in sys.modules])
  return real(devices, device_type)
tf.config.set_visible_devices = watched
from fmnist_jax import config as config_lib, data
from fmnist_jax.data import batches
c = config_lib.load('configs/test.py').data
c.data_dir, c.download = sys.argv[2], False
if sys.argv[1] == 'prepare':
  assert len(data.load(c)['test']['label']) == 10000  # No decoded copy: read through tfds.
else:
  next(batches.TfdsStream(c, 'test').chunks(100, 2, shuffle_seed=0))
kinds = sorted({d.device_type for d in tf.config.get_visible_devices()})
print(json.dumps({'calls': calls, 'visible': kinds}))
"""


@pytest.mark.parametrize('use', ['prepare', 'tfds_mode'])
def test_tensorflow_is_shown_no_gpu_or_tpu(use, tmp_path, data_dir):
  """Every GPU and TPU is hidden from TensorFlow before tfds is imported (so TensorFlow never
  takes an accelerator's memory), in data preparation and in the tfds input mode."""
  import shutil
  root = tmp_path / 'tfds'
  shutil.copytree(data_dir, root, ignore=shutil.ignore_patterns('fmnist_jax-*'))
  out = subprocess.run([sys.executable, '-c', _WATCH_TENSORFLOW, use, str(root)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  seen = json.loads(out.stdout.strip().splitlines()[-1])
  assert seen['calls'][:2] == [[0, 'GPU', False], [0, 'TPU', False]], seen
  assert all(count == 0 for count, _, _ in seen['calls']), seen  # Nothing shown again.
  assert seen['visible'] == ['CPU']


def test_interrupted_preparation_leaves_nothing_trusted(tmp_path, source_dir, monkeypatch):
  """A failure in the middle of preparing leaves no dataset a later run would trust."""
  calls = {'n': 0}
  real_load_split = idx.load_split

  def fail_on_test_split(directory, split):
    calls['n'] += 1
    if split == 'test':
      raise KeyboardInterrupt  # Like Ctrl-C half-way.
    return real_load_split(directory, split)

  monkeypatch.setattr(idx, 'load_split', fail_on_test_split)
  with pytest.raises(KeyboardInterrupt):
    data.load(_config(tmp_path, source_dir))
  assert calls['n'] == 2
  assert data._load_copy(str(tmp_path)) is None
  assert not os.path.exists(tmp_path / 'fashion_mnist' / '3.0.1' / 'dataset_info.json')


def test_data_dir_order(tmp_path, monkeypatch):
  """--config.data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'env'))
  assert data.data_dir(_config(tmp_path / 'field')) == str(tmp_path / 'field')
  assert data.data_dir(_config('')) == str(tmp_path / 'env')
  monkeypatch.delenv('TFDS_DATA_DIR')
  assert data.data_dir(_config('')) == str(tmp_path / 'home' / 'tensorflow_datasets')


@pytest.mark.parametrize('mode', ['device', 'stream'])
def test_training_without_tfds_mode_never_imports_tensorflow(mode, data_dir, tmp_path):
  """With the data prepared, only the tfds input mode imports TensorFlow (Python's own import
  log, PYTHONPROFILEIMPORTTIME, names every module imported)."""
  from tests.conftest import run_cli
  result = run_cli('fmnist_jax.train', '--config', 'configs/test.py',
                   f'--config.data.data_dir={data_dir}', f'--config.input_mode={mode}',
                   '--config.tensorboard=True', f'--workdir={tmp_path}',
                   env={'PYTHONPROFILEIMPORTTIME': '1'})
  assert result.returncode == 0, result.stderr[-2000:]
  imported = {line.rsplit('|', 1)[-1].strip() for line in result.stderr.splitlines()
              if line.startswith('import time:')}
  assert {'jax', 'numpy'} <= imported  # The log is there ...
  assert not {m for m in imported if m.startswith(('tensorflow', 'tensorflow_datasets'))}


def test_manual_dir_must_hold_the_files(tmp_path):
  with pytest.raises(data.DataError, match='does not hold the four Fashion-MNIST IDX'):
    data.load(_config(tmp_path / 'tfds', manual_dir=tmp_path))


def test_manual_dir_order(tmp_path, source_dir, monkeypatch):
  """config field, then $FMNIST_JAX_MANUAL_DIR, then Debian's path; folders without files skip."""
  import shutil
  env_dir, debian_dir = tmp_path / 'env', tmp_path / 'debian'
  shutil.copytree(source_dir, env_dir)
  shutil.copytree(source_dir, debian_dir)
  monkeypatch.setattr(data, 'DEBIAN_DIR', str(debian_dir))
  monkeypatch.setenv(data.MANUAL_DIR_ENV, str(tmp_path))  # No files there: skipped.
  assert data.manual_dir(_config(tmp_path)) == str(debian_dir)
  monkeypatch.setenv(data.MANUAL_DIR_ENV, str(env_dir))
  assert data.manual_dir(_config(tmp_path)) == str(env_dir)
  assert data.manual_dir(_config(tmp_path, manual_dir=source_dir)) == source_dir
  monkeypatch.setattr(data, 'DEBIAN_DIR', str(tmp_path / 'none'))
  monkeypatch.delenv(data.MANUAL_DIR_ENV)
  assert data.manual_dir(_config(tmp_path)) is None


def test_no_data_anywhere_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.setattr(data, 'DEBIAN_DIR', str(tmp_path / 'none'))
  monkeypatch.delenv(data.MANUAL_DIR_ENV, raising=False)
  with pytest.raises(data.DataError, match='apt-get install dataset-fashion-mnist'):
    data.load(_config(tmp_path / 'tfds'))


# As on a machine without Debian's dataset-fashion-mnist and without a network, whatever this one
# has: the Debian path hidden, tfds's download host replaced by a port nothing listens on.
_OFFLINE = """
import runpy, sys
import ml_collections
from fmnist_jax import data
data.DEBIAN_DIR = {hidden!r}
data.DOWNLOAD_URL = 'http://127.0.0.1:1/'
"""


def _offline_env():
  env = dict(os.environ)
  env.pop(data.MANUAL_DIR_ENV, None)
  return env


def test_offline_error_comes_before_tensorflow(tmp_path):
  """No data, no IDX files, no network: the error is decided before TensorFlow is imported."""
  code = _OFFLINE.format(hidden=str(tmp_path / 'none')) + f"""
config = ml_collections.ConfigDict(dict(data_dir={str(tmp_path / 'tfds')!r}, manual_dir='',
                                        download=True))
try:
  data.load(config)
except data.DataError as e:
  print('DataError:', e)
print('tensorflow' in sys.modules, 'tensorflow_datasets' in sys.modules)
"""
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env=_offline_env(), check=True).stdout.splitlines()
  assert out[0].startswith('DataError: Fashion-MNIST not found locally and tfds cannot download')
  assert 'http://127.0.0.1:1/ is unreachable' in out[0] and 'apt-get install' in out[0]
  assert out[1] == 'False False'


def test_offline_cli_error_is_one_line(tmp_path):
  code = _OFFLINE.format(hidden=str(tmp_path / 'none')) + """
sys.argv = ['train'] + sys.argv[1:]
runpy.run_module('fmnist_jax.train', run_name='__main__', alter_sys=True)
"""
  result = subprocess.run(
      [sys.executable, '-c', code, '--config', 'configs/test.py',
       f'--config.data.data_dir={tmp_path / "tfds"}', f'--workdir={tmp_path / "w"}'],
      capture_output=True, text=True, env=_offline_env(), cwd=ROOT, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and 'is unreachable' in errors[0], result.stderr[-2000:]


def test_download_url_is_tfds_one():
  data.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  assert data.DOWNLOAD_URL == tfds.image_classification.FashionMNIST.URL


def test_unreachable_answers_within_its_timeout(monkeypatch):
  """A name lookup that hangs is cut at the timeout (the socket's own timeout does not cover it)."""
  import socket
  import time
  assert data._unreachable('http://127.0.0.1:1/') == 'Connection refused'
  def hanging_lookup(*args, **kwargs):
    time.sleep(3)
    raise socket.gaierror('too late')
  monkeypatch.setattr(socket, 'getaddrinfo', hanging_lookup)
  assert data._unreachable(data.DOWNLOAD_URL, timeout=0.2) == 'no answer within 0.2 s'


def test_bad_idx_file_is_named(tmp_path, source_dir):
  import shutil
  manual = tmp_path / 'manual'
  shutil.copytree(source_dir, manual)
  (manual / 't10k-labels-idx1-ubyte.gz').write_bytes(b'not gzip at all')
  with pytest.raises(idx.IdxError, match='t10k-labels-idx1-ubyte.gz: not a gzip file'):
    data.load(_config(tmp_path / 'tfds', manual))
  assert not os.path.exists(tmp_path / 'tfds' / 'fashion_mnist' / '3.0.1')


def test_unwritable_data_dir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(data.DataError, match='cannot be created'):
    data.load(_config(blocker / 'tfds'))


@pytest.fixture(scope='module')
def tfds_stream(data_dir):
  return batches.TfdsStream(_config(data_dir), 'test')


@pytest.mark.parametrize('kind', ['tfds', 'host'])
def test_stream_chunks_pad_and_cover_every_example(kind, config, tfds_stream):
  """Chunks [K, B, ...] of padded batches: every example once, the last chunk's padding zeros."""
  stream = tfds_stream if kind == 'tfds' else batches.HostStream(data.load(config.data)['test'])
  chunks = list(stream.chunks(768, 5, shuffle_seed=3))  # 14 batches: chunks of 5, 5, 4.
  assert [n for _, n in chunks] == [5, 5, 4]
  for chunk, _ in chunks:
    assert chunk['image'].shape == (5, 768, 28, 28) and chunk['image'].dtype == np.uint8
    assert chunk['label'].shape == (5, 768) and chunk['label'].dtype == np.int32
    assert chunk['mask'].shape == (5, 768) and chunk['mask'].dtype == np.float32
  image = np.concatenate([c['image'] for c, _ in chunks]).reshape(-1, 28, 28)
  label = np.concatenate([c['label'] for c, _ in chunks]).reshape(-1)
  mask = np.concatenate([c['mask'] for c, _ in chunks]).reshape(-1)
  assert mask[:10_000].all() and not mask[10_000:].any()
  assert not image[10_000:].any() and not label[10_000:].any()  # Padding: zeros, mask 0.
  test = data.load(config.data)['test']
  def keyed(imgs, labs):
    return sorted(zip((i.tobytes() for i in imgs), labs.tolist()))
  assert keyed(image[:10_000], label[:10_000]) == keyed(test['image'], test['label'])
  assert not np.array_equal(label[:10_000], test['label'])  # Shuffled.


@pytest.mark.parametrize('kind', ['tfds', 'host'])
def test_stream_chunks_replay_resume_and_split(kind, config, tfds_stream):
  """Seeded order; skip_batches resumes inside a pass; processes split each global batch."""
  stream = tfds_stream if kind == 'tfds' else batches.HostStream(data.load(config.data)['test'])
  chunks = lambda **kw: list(stream.chunks(768, 5, **kw))
  first = chunks(shuffle_seed=3)
  np.testing.assert_array_equal(chunks(shuffle_seed=3)[0][0]['label'], first[0][0]['label'])
  assert not np.array_equal(chunks(shuffle_seed=4)[0][0]['label'], first[0][0]['label'])
  resumed = chunks(shuffle_seed=3, skip_batches=7)  # Batches 7-11, 12-13.
  assert [n for _, n in resumed] == [5, 2]
  np.testing.assert_array_equal(resumed[0][0]['image'][:3], first[1][0]['image'][2:])
  np.testing.assert_array_equal(resumed[1][0]['label'][:2], first[2][0]['label'][2:4])
  halves = [chunks(shuffle_seed=3, process_index=p, process_count=2) for p in (0, 1)]
  assert halves[0][0][0]['label'].shape == (5, 384)
  np.testing.assert_array_equal(
      np.concatenate([halves[0][2][0]['mask'], halves[1][2][0]['mask']], axis=1),
      first[2][0]['mask'])


def test_tfds_order_is_the_shuffle_buffer_order(config, tfds_stream):
  """The pass's order is that of a tf.data shuffle of the examples with data.shuffle_buffer (a
  smaller buffer shuffles less), though the stream shuffles indices and gathers."""
  data.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder('fashion_mnist', data_dir=config.data.data_dir)
  labels = builder.as_dataset(split='test', shuffle_files=False).map(lambda ex: ex['label'])
  for buffer in (10_000, 100):
    config.data.shuffle_buffer = buffer
    stream = batches.TfdsStream(config.data, 'test')
    chunk, _ = next(stream.chunks(768, 2, shuffle_seed=5))
    shuffled = labels.shuffle(buffer, seed=5, reshuffle_each_iteration=False)
    expected = np.fromiter(shuffled.take(2 * 768).as_numpy_iterator(), np.int64)
    np.testing.assert_array_equal(chunk['label'].reshape(-1), expected)


def _damaged_copy(data_dir, root, damage):
  """A copy of the prepared data with `damage` done to the tfds files, without the decoded copy."""
  import shutil
  shutil.copytree(data_dir, root)
  for copy in glob.glob(os.path.join(root, 'fashion_mnist', 'fmnist_jax-*.npz')):
    os.unlink(copy)
  version = os.path.join(root, 'fashion_mnist', '3.0.1')
  if damage in ('tfrecord', 'both'):
    record = glob.glob(os.path.join(version, '*train.tfrecord*'))[0]
    with open(record, 'r+b') as f:
      f.truncate(os.path.getsize(record) // 2)
  if damage in ('info', 'both'):
    with open(os.path.join(version, 'dataset_info.json'), 'w') as f:
      f.write('{"name": "fashion_mnist", "splits": [garbage')


@pytest.mark.parametrize('damage', ['tfrecord', 'info'])
def test_damaged_prepared_data_without_a_source_is_named(damage, data_dir, tmp_path, monkeypatch):
  root = tmp_path / 'tfds'
  _damaged_copy(data_dir, root, damage)
  monkeypatch.setattr(data, 'DEBIAN_DIR', str(tmp_path / 'none'))
  monkeypatch.delenv(data.MANUAL_DIR_ENV, raising=False)
  config = _config(root)
  config.download = False
  with pytest.raises(data.DataError, match='the prepared dataset in .*fashion_mnist is damaged'):
    data.load(config)


def test_damaged_prepared_data_heals(data_dir, arrays, source_dir, tmp_path):
  """A truncated tfrecord and a garbage dataset_info.json are detected and rebuilt from the IDX
  files; what an interrupted preparation left behind is removed."""
  root = tmp_path / 'tfds'
  _damaged_copy(data_dir, root, 'both')
  os.makedirs(root / 'fashion_mnist' / 'incomplete.ABC123_3.0.1')
  (root / 'fashion_mnist' / '.fmnist_jax-3.0.1.npz.x.tmp').write_bytes(b'half')
  healed = data.load(_config(root, source_dir))
  for split in ('train', 'test'):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(healed[split][key], arrays[split][key])
  assert not glob.glob(str(root / 'fashion_mnist' / 'incomplete.*'))
  assert not glob.glob(str(root / 'fashion_mnist' / '*.tmp'))
