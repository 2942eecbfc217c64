"""IDX parsing and validation on small generated files."""

import gzip
import os

import numpy as np
import pytest

from fmnist_jax.data import idx


def _write_split(directory, split='train', n=None, images=None, labels=None):
  images_name, labels_name, count = idx.FILES[split]
  n = count if n is None else n
  rng = np.random.default_rng(0)
  if images is None:
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  if labels is None:
    labels = rng.integers(0, 10, n).astype(np.uint8)
  idx.write(os.path.join(directory, images_name), images)
  idx.write(os.path.join(directory, labels_name), labels)
  return images, labels


def test_round_trip_gzip_and_raw(tmp_path):
  images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
  for compress in (True, False):
    path = str(tmp_path / f'x{compress}.gz')
    idx.write(path, images, compress=compress)
    if not compress:
      path_raw = str(tmp_path / 'x.idx')
      os.rename(path, path_raw)
      path = path_raw
    parsed = idx.parse(idx.read_bytes(path), path, idx.IMAGES_MAGIC)
    np.testing.assert_array_equal(parsed, images)


def test_load_split_validates_counts_and_returns_int32(tmp_path):
  images, labels = _write_split(str(tmp_path), 'test')
  got_images, got_labels = idx.load_split(str(tmp_path), 'test')
  assert got_images.shape == (10_000, 28, 28) and got_images.dtype == np.uint8
  assert got_labels.dtype == np.int32
  np.testing.assert_array_equal(got_labels, labels)


def test_wrong_magic(tmp_path):
  path = str(tmp_path / 'labels.gz')
  idx.write(path, np.zeros((5, 28, 28), np.uint8))  # An images file where labels are expected.
  with pytest.raises(idx.IdxError, match='wrong IDX magic number 0x00000803'):
    idx.parse(idx.read_bytes(path), path, idx.LABELS_MAGIC)


def test_truncated_gzip(tmp_path):
  path = tmp_path / 'images.gz'
  idx.write(str(path), np.zeros((50, 28, 28), np.uint8))
  path.write_bytes(path.read_bytes()[:-30])
  with pytest.raises(idx.IdxError, match='truncated or corrupt gzip'):
    idx.read_bytes(str(path))


def test_not_gzip(tmp_path):
  path = tmp_path / 'train-images-idx3-ubyte.gz'
  path.write_text('<html>404 Not Found</html>')
  with pytest.raises(idx.IdxError, match='not a gzip file'):
    idx.read_bytes(str(path))


def test_truncated_body(tmp_path):
  path = tmp_path / 'images.gz'
  header = idx.IMAGES_MAGIC.to_bytes(4, 'big') + b''.join(
      d.to_bytes(4, 'big') for d in (10, 28, 28))
  path.write_bytes(gzip.compress(header + bytes(28 * 28 * 9)))
  with pytest.raises(idx.IdxError, match='header promises 7840 bytes of data, file holds 7056'):
    idx.parse(idx.read_bytes(str(path)), str(path), idx.IMAGES_MAGIC)


def test_wrong_image_size(tmp_path):
  path = str(tmp_path / 'images.gz')
  idx.write(path, np.zeros((4, 32, 32), np.uint8))
  with pytest.raises(idx.IdxError, match='images are 32x32, expected 28x28'):
    idx.parse(idx.read_bytes(path), path, idx.IMAGES_MAGIC)


def test_counts_disagree(tmp_path):
  images_name, labels_name, _ = idx.FILES['test']
  idx.write(str(tmp_path / images_name), np.zeros((10_000, 28, 28), np.uint8))
  idx.write(str(tmp_path / labels_name), np.zeros((9_999,), np.uint8))
  with pytest.raises(idx.IdxError, match='10000 images but 9999 labels'):
    idx.load_split(str(tmp_path), 'test')


def test_wrong_example_count(tmp_path):
  _write_split(str(tmp_path), 'test', n=500)
  with pytest.raises(idx.IdxError, match="500 examples, Fashion-MNIST's test split has 10000"):
    idx.load_split(str(tmp_path), 'test')


def test_label_out_of_range(tmp_path):
  labels = np.zeros(10_000, np.uint8)
  labels[123] = 12
  _write_split(str(tmp_path), 'test', labels=labels)
  with pytest.raises(idx.IdxError, match='label 12 outside 0-9'):
    idx.load_split(str(tmp_path), 'test')


def test_missing_file(tmp_path):
  with pytest.raises(idx.IdxError, match='file not found'):
    idx.load_split(str(tmp_path), 'train')
  assert not idx.has_files(str(tmp_path))
