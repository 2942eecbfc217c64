"""Reading and validating the IDX files Fashion-MNIST ships in (gzip-compressed or raw).

The IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian header of magic number
0x00000803 (images, 3 dims) or 0x00000801 (labels, 1 dim), then one uint32 per dimension, then
the uint8 data. The files are validated by content, not by checksum, because Debian's
gzip files differ byte-wise from the upstream ones while holding the same data.
"""

import gzip
import os
import zlib

import numpy as np

from fmnist_jax import IMAGE_SIZE, NUM_CLASSES, NUM_TEST, NUM_TRAIN
from fmnist_jax.errors import UserError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_KINDS = {IMAGES_MAGIC: ('images', 3), LABELS_MAGIC: ('labels', 1)}  # magic -> (kind, dims)

# tfds's split name -> (images file, labels file, number of examples).
FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', NUM_TRAIN),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz', NUM_TEST),
}
NAMES = tuple(name for images, labels, _ in FILES.values() for name in (images, labels))


class IdxError(UserError):
  """An IDX file is missing, truncated, compressed wrongly or holds the wrong content."""


def read_bytes(path: str) -> bytes:
  """Returns the decompressed content of `path` (gzip if it starts with the gzip magic)."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except FileNotFoundError:
    raise IdxError(f'{path}: file not found.') from None
  except OSError as e:
    raise IdxError(f'{path}: cannot be read ({e.strerror}).') from None
  if raw[:2] != b'\x1f\x8b':
    if path.endswith('.gz'):
      raise IdxError(f'{path}: not a gzip file; replace it with the original download.')
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise IdxError(f'{path}: truncated or corrupt gzip ({e}); replace it with the original '
                   'download.') from None


def parse(data: bytes, path: str, magic: int) -> np.ndarray:
  """Parses IDX bytes into a uint8 array, checking magic number, dimensions and length."""
  kind, ndim = _KINDS[magic]
  header_len = 4 + 4 * ndim
  if len(data) < header_len:
    raise IdxError(f'{path}: too short for an IDX header ({len(data)} bytes).')
  found, *dims = np.frombuffer(data[:header_len], '>u4').tolist()
  if found != magic:
    raise IdxError(f'{path}: wrong IDX magic number 0x{found:08x}, expected 0x{magic:08x} for '
                   f'{kind}; is this the right file?')
  if magic == IMAGES_MAGIC and dims[1:] != [IMAGE_SIZE, IMAGE_SIZE]:
    raise IdxError(f'{path}: images are {dims[1]}x{dims[2]}, expected '
                   f'{IMAGE_SIZE}x{IMAGE_SIZE}.')
  expected = int(np.prod(dims))
  body = data[header_len:]
  if len(body) != expected:
    raise IdxError(f'{path}: truncated: header promises {expected} bytes of data, file holds '
                   f'{len(body)}; replace it with the original download.')
  return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads and validates one split: uint8 images [N, 28, 28] and int32 labels [N]."""
  images_name, labels_name, count = FILES[split]
  images_path = os.path.join(directory, images_name)
  labels_path = os.path.join(directory, labels_name)
  images = parse(read_bytes(images_path), images_path, IMAGES_MAGIC)
  labels = parse(read_bytes(labels_path), labels_path, LABELS_MAGIC)
  if len(images) != len(labels):
    raise IdxError(f'{directory}: {split} split has {len(images)} images but {len(labels)} '
                   'labels; the files do not belong together.')
  if len(images) != count:
    raise IdxError(f'{images_path}: {len(images)} examples, Fashion-MNIST\'s {split} split has '
                   f'{count}.')
  if labels.max(initial=0) >= NUM_CLASSES:
    raise IdxError(f'{labels_path}: label {int(labels.max())} outside 0-{NUM_CLASSES - 1}.')
  return images, labels.astype(np.int32)


def has_files(directory: str) -> bool:
  """Whether `directory` holds all four Fashion-MNIST IDX files (content unchecked)."""
  return all(os.path.isfile(os.path.join(directory, name)) for name in NAMES)


def write(path: str, array: np.ndarray, compress: bool = True) -> None:
  """Writes `array` (uint8, 1 or 3 dims) as an IDX file; used by tests and tools."""
  magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
  header = np.array([magic, *array.shape], '>u4').tobytes()
  data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
  with open(path, 'wb') as f:
    f.write(gzip.compress(data) if compress else data)
