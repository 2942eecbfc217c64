"""Your own pictures: the dataset's conversion, photo families against floors, hostile files."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fmnist_jax import CLASS_NAMES, inference
from fmnist_jax.photos import images
from fmnist_jax.photos import robustness
from tests.conftest import run_cli

# Floors a few points below what configs/test.py's one-epoch model measured on these 200 test
# images per family (untouched 0.795-0.820; whole-article families 0.795-0.855; rotated 0.805;
# shadow 0.785). The base config's numbers (1000 per family) are in the README.
FLOORS = {
    'untouched': 0.77,
    'light_margins': 0.78,
    'dark_margins': 0.78,
    'off_centre': 0.78,
    'non_square': 0.78,
    'jpeg': 0.78,
    'noise': 0.78,
    'blur': 0.76,
    'rotated': 0.77,  # Turned back upright; without that, 0.735.
    'coloured_background': 0.78,
    'gradient': 0.78,
    'shadow': 0.74,  # The shadow left out; kept, it is taken for part of the article (0.68).
    'textured_background': 0.78,
}


@pytest.fixture(scope='module')
def model(trained_workdir):
  """configs/test.py trained for its one epoch: a probs_fn for uint8 [N, 28, 28]."""
  return inference.load_trained(str(trained_workdir)).probs


def test_photo_families_meet_their_floors(model, arrays):
  test = arrays['test']
  results = robustness.evaluate(model, test['image'], test['label'], n_per_family=200, seed=0)
  assert set(results) == set(robustness.FAMILIES) == set(FLOORS)
  report = {f: round(r['accuracy'], 3) for f, r in results.items()}
  for family, r in results.items():
    assert r['count'] == 200
    assert r['accuracy'] >= FLOORS[family], (family, report)
  # The families that keep the article whole are close to the untouched images.
  untouched = results['untouched']['accuracy']
  for family in ('light_margins', 'dark_margins', 'off_centre', 'non_square', 'jpeg'):
    assert results[family]['accuracy'] >= untouched - 0.05, (family, report)


def test_whole_canvas_scaling_fails_where_trimming_works(model, arrays):
  """Shrinking the whole canvas (the old conversion) loses the article; trimming first keeps it."""
  def whole_canvas(picture):
    gray = picture.convert('L')
    gray.thumbnail((28, 28), Image.Resampling.BOX)
    canvas = Image.new('L', (28, 28), 255)
    canvas.paste(gray, ((28 - gray.size[0]) // 2, (28 - gray.size[1]) // 2))
    return 255 - np.asarray(canvas)
  test = arrays['test']
  kwargs = dict(n_per_family=100, seed=1, families=['light_margins'])
  old = robustness.evaluate(model, test['image'], test['label'], convert=whole_canvas, **kwargs)
  new = robustness.evaluate(model, test['image'], test['label'], **kwargs)
  assert new['light_margins']['accuracy'] > old['light_margins']['accuracy'] + 0.3


def test_photos_are_deterministic_and_realistic(arrays):
  image = arrays['test']['image'][:2]
  for family in robustness.FAMILIES:
    a, b = robustness.photos(image, family, seed=3), robustness.photos(image, family, seed=3)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]), err_msg=family)
    if family != 'untouched':
      assert min(a[0].size) > 56, family  # An upscaled article on a canvas, not a thumbnail.
  light = np.asarray(robustness.photos(image, 'light_margins')[0])
  assert light.ndim == 3 and light[0, 0].min() > 200  # RGB, light border.


def test_fashion_mnist_images_pass_through_bit_exact(arrays, tmp_path):
  test = arrays['test']['image'][:200]
  for i, x in enumerate(test):
    np.testing.assert_array_equal(images.to_fashion_mnist(Image.fromarray(x)), x, err_msg=i)
  Image.fromarray(test[0]).save(tmp_path / 'x.png')
  np.testing.assert_array_equal(images.load(str(tmp_path / 'x.png')), test[0])
  white = Image.fromarray(255 - test[1]).convert('RGB')  # Dark on white: inverted back exactly.
  np.testing.assert_array_equal(images.to_fashion_mnist(white), test[1])


def test_conversion_steps_end_in_the_result(arrays):
  photo = robustness.photos(arrays['test']['image'][:1], 'light_margins')[0]
  steps = images.conversion_steps(photo)
  assert [name for name, _ in steps][0] == 'picture' and len(steps) >= 5
  np.testing.assert_array_equal(steps[-1][1], images.to_fashion_mnist(photo))
  out = steps[-1][1]
  assert out.dtype == np.uint8 and out.shape == (28, 28)
  assert out[0].max() < 30 or out[:, 0].max() < 30  # Black background...
  rows, cols = np.flatnonzero(out.max(1) > 30), np.flatnonzero(out.max(0) > 30)
  assert max(rows[-1] - rows[0], cols[-1] - cols[0]) >= 25  # ...the article trimmed to fill it.


def _on_light_background(image, angle=0.0, shadow=0.0, size=140):
  """A uint8 [28, 28] test image as a dark article on a light gray RGB picture, optionally turned
  by `angle` degrees (counter-clockwise) or with a soft shadow `shadow` darker, offset down-right.
  """
  alpha = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)
  if angle:
    alpha = alpha.rotate(angle, Image.Resampling.BICUBIC, expand=True)
  a = np.asarray(alpha, np.float32)[..., None] / 255
  h, w = a.shape[:2]
  background = np.full((h + 80, w + 90, 3), 235, np.float32)
  if shadow:
    cast = Image.new('L', (w + 90, h + 80), 0)
    cast.paste(alpha, (40 + size // 14, 40 + size // 14))
    cast = np.asarray(cast.filter(ImageFilter.GaussianBlur(size / 20)), np.float32) / 255
    background *= 1 - shadow * cast[..., None]
  background[40:40 + h, 40:40 + w] = background[40:40 + h, 40:40 + w] * (1 - a) + 20 * a
  return Image.fromarray(np.round(background).astype(np.uint8))


def _extent(x):
  """First and last row, first and last column of a 28x28 image's article (pixels above 30)."""
  rows, cols = np.flatnonzero(x.max(1) > 30), np.flatnonzero(x.max(0) > 30)
  return np.array([rows[0], rows[-1], cols[0], cols[-1]])


def _turned_back(photo):
  """The angle the conversion turned the article back by (degrees), 0 when it left it upright."""
  names = [name for name, _ in images.conversion_steps(photo) if name.startswith('turned back')]
  return float(names[0].split()[2]) if names else 0.0


def test_a_soft_cast_shadow_is_left_out(arrays):
  test = arrays['test']
  for label in (0, 1, 8):  # A T-shirt, trousers (the shadow shows between the legs), a bag.
    image = test['image'][np.flatnonzero(test['label'] == label)[0]]
    clean = images.to_fashion_mnist(_on_light_background(image)).astype(int)
    shadowed = images.to_fashion_mnist(_on_light_background(image, shadow=0.4)).astype(int)
    # As dark as the article's lighter parts. Kept, it widens the article and lights its margin
    # (a mean difference of 30-50 here); left out, the article fills the same frame.
    assert np.abs(shadowed - clean).mean() < 16, (label, np.abs(shadowed - clean).mean())
    assert np.abs(_extent(shadowed) - _extent(clean)).max() <= 1, (label, _extent(shadowed),
                                                                  _extent(clean))
    steps = dict(images.conversion_steps(_on_light_background(image, shadow=0.4)))
    found, article = steps['differs from background'], steps['sharp-edged article']
    assert article.sum() < 0.9 * found.sum(), label  # The shadow was found, then left out.


def test_a_turned_article_is_turned_back_and_an_upright_one_is_not(arrays):
  test = arrays['test']
  # Straight-sided articles; a sandal or a round bag may stay turned (no box gains enough).
  for label in (0, 1, 2, 4):  # A T-shirt, trousers, a pullover, a coat.
    image = test['image'][np.flatnonzero(test['label'] == label)[0]]
    assert _turned_back(_on_light_background(image)) == 0, label
    for angle in (-9.0, 6.0):
      turned_back = _turned_back(_on_light_background(image, angle=angle))
      assert abs(turned_back + angle) <= 2, (label, angle, turned_back)
  # Nearly all upright articles are left as they are (of these 60, a sandal and a T-shirt that is
  # slanted in the dataset itself are turned).
  upright = [_turned_back(_on_light_background(x, size=84)) for x in test['image'][:60]]
  assert sum(a != 0 for a in upright) <= 3, upright


def _photo(arrays, index=0):
  """A test image as a large dark-on-white RGB picture with uneven margins."""
  article = Image.fromarray(255 - arrays['test']['image'][index]).resize((112, 112),
                                                                          Image.Resampling.BICUBIC)
  canvas = Image.new('L', (200, 150), 255)
  canvas.paste(article, (30, 20))
  return canvas.convert('RGB')


def test_sixteen_and_thirty_two_bit_gray_are_scaled_not_clipped(arrays, tmp_path):
  x = arrays['test']['image'][0]
  wide = (x.astype(np.uint16) * 257)
  Image.fromarray(wide).save(tmp_path / 'x16.png')
  with Image.open(tmp_path / 'x16.png') as reopened:
    assert reopened.mode in ('I;16', 'I')
  np.testing.assert_array_equal(images.load(str(tmp_path / 'x16.png')), x)
  Image.fromarray(wide.astype(np.int32)).save(tmp_path / 'x32.tif')
  np.testing.assert_array_equal(images.load(str(tmp_path / 'x32.tif')), x)
  Image.fromarray(x.astype(np.float32) / 255).save(tmp_path / 'xf.tif')
  np.testing.assert_array_equal(images.load(str(tmp_path / 'xf.tif')), x)
  # A large 16-bit photo converts like its 8-bit version (old code: a white, empty frame).
  gray8 = np.asarray(_photo(arrays).convert('L'))
  Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / 'photo16.png')
  out16 = images.load(str(tmp_path / 'photo16.png'))
  np.testing.assert_array_equal(out16, images.to_fashion_mnist(Image.fromarray(gray8)))
  assert out16.max() > 200


def test_exif_orientation_is_applied(arrays, tmp_path):
  photo = _photo(arrays)
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
  photo.save(tmp_path / 'phone.jpg', exif=exif.tobytes(), quality=95)
  with Image.open(tmp_path / 'phone.jpg') as stored:
    stored.load()
    upright = images.to_fashion_mnist(stored.transpose(Image.Transpose.ROTATE_270))
    sideways = images.to_fashion_mnist(stored)
  out = images.load(str(tmp_path / 'phone.jpg'))
  np.testing.assert_array_equal(out, upright)
  assert not np.array_equal(out, sideways)


def test_transparency_and_cmyk(arrays, tmp_path):
  photo = _photo(arrays)
  expected = images.to_fashion_mnist(photo)
  rgba = photo.convert('RGBA')
  alpha = (np.asarray(photo.convert('L')) < 250).astype(np.uint8) * 255
  rgba.putalpha(Image.fromarray(alpha))
  transparent = np.asarray(rgba).copy()
  transparent[alpha == 0, :3] = 0  # Black but transparent: must become white, not black.
  Image.fromarray(transparent).save(tmp_path / 'cut_out.png')
  cut_out = images.load(str(tmp_path / 'cut_out.png')).astype(int)
  assert np.abs(cut_out - expected).mean() < 2
  photo.convert('L').convert('P').save(tmp_path / 'palette.gif')
  photo.convert('CMYK').save(tmp_path / 'print.jpg', quality=95)
  for name in ('palette.gif', 'print.jpg'):
    out = images.load(str(tmp_path / name)).astype(int)
    assert np.abs(out - expected).mean() < 4, name


def _png(width, height):
  """A PNG header claiming width x height, with a tiny (and for big sizes short) pixel stream."""
  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 64))
          + chunk(b'IEND', b''))


@pytest.fixture
def hostile_files(tmp_path):
  """Files that crash or fool a naive reader, each made by a few lines of code."""
  files = {}
  files['bomb.png'] = _png(20000, 20000)  # 400 megapixels: Pillow's bomb error.
  files['big.png'] = _png(10000, 10000)  # 100 megapixels: only Pillow's bomb warning.
  good = io.BytesIO()
  Image.fromarray(np.arange(1200, dtype=np.uint8).reshape(30, 40)).save(good, 'PNG')
  bad_length = bytearray(good.getvalue())
  at = bad_length.index(b'IDAT') - 4
  bad_length[at:at + 4] = struct.pack('>I', 3)
  files['bad_chunk.png'] = bytes(bad_length)
  bmp = io.BytesIO()
  Image.fromarray(np.zeros((30, 40), np.uint8)).save(bmp, 'BMP')
  bad_bmp = bytearray(bmp.getvalue())
  bad_bmp[14:18] = struct.pack('<I', 255)  # DIB header size no BMP version has.
  files['bad_header.bmp'] = bytes(bad_bmp)
  files['notes.txt'] = b'not a picture'
  files['blank.png'] = None
  paths = {}
  for name, data in files.items():
    paths[name] = str(tmp_path / name)
    if data is None:
      Image.new('RGB', (90, 60), (240, 240, 240)).save(paths[name])
    else:
      (tmp_path / name).write_bytes(data)
  return paths


def test_hostile_files_give_one_line_errors(hostile_files):
  expected = {'bomb.png': 'too many pixels', 'big.png': 'too many pixels',
              'bad_chunk.png': 'damaged or unreadable', 'bad_header.bmp': 'damaged or unreadable',
              'notes.txt': 'not an image file', 'blank.png': 'no object stands out'}
  for name, path in hostile_files.items():
    with pytest.raises(images.ImageFileError) as e:
      images.load(path)
    message = str(e.value)
    assert message.startswith(f'{path}: ') and expected[name] in message, message
    assert '\n' not in message


def test_a_batch_continues_past_bad_files(hostile_files, arrays, tmp_path):
  good = str(tmp_path / 'good\nname.png')  # A newline in a name is just a character here.
  _photo(arrays).save(good)
  paths = [good, *hostile_files.values(), good, str(tmp_path / 'missing.png')]
  loaded, errors = images.load_all(paths)
  assert [p for p, _ in loaded] == [good, good]  # Named twice, read twice.
  np.testing.assert_array_equal(loaded[0][1], images.to_fashion_mnist(_photo(arrays)))
  assert len(errors) == len(hostile_files) + 1
  assert errors[-1].endswith('missing.png: file not found.')


def test_figures_of_a_file_and_of_the_families(arrays):
  from matplotlib.figure import Figure
  from fmnist_jax import plots
  photo = robustness.photos(arrays['test']['image'][:1], 'coloured_background')[0]
  probs = np.full(10, 0.02)
  probs[7] = 0.82
  converted = images.to_fashion_mnist(photo)
  unlabelled = plots.file_prediction(np.asarray(photo), converted, probs)
  labelled = plots.file_prediction(np.asarray(photo), converted, probs, true_label=9)
  steps = plots.conversion_steps(images.conversion_steps(photo))
  results = {'untouched': {'accuracy': 0.9, 'count': 5}, 'jpeg': {'accuracy': 0.8, 'count': 5}}
  bars = plots.robustness(results)
  grid = plots.robustness_examples(robustness.examples(arrays['test']['image'], per_family=1,
                                                       families=['untouched', 'shadow']))
  for fig in (unlabelled, labelled, steps, bars, grid):
    assert isinstance(fig, Figure) and fig.axes
  assert len(unlabelled.axes) == 3 and len(steps.axes) == len(images.conversion_steps(photo))
  assert unlabelled.axes[1].get_xlabel() == f'{CLASS_NAMES[7]} 82%'
  assert len(bars.axes[0].patches) == 1  # One bar per family; 'untouched' is the line.


def test_predict_cli_reports_each_hostile_file_in_one_line(trained_workdir, hostile_files, arrays,
                                                          tmp_path):
  good = str(tmp_path / 'good\nname.png')
  _photo(arrays).save(good)
  paths = [good, *hostile_files.values(), good]
  result = run_cli('fmnist_jax.predict', f'--workdir={trained_workdir}',
                   f'--figures_dir={tmp_path / "figures"}', *paths)
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == len(hostile_files) == len(result.stderr.strip().splitlines())
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2 and all(l.startswith(f'{tmp_path}/good\\nname.png: ') for l in lines)
  figures = sorted((tmp_path / 'figures').glob('file_*.png'))
  assert len(figures) == 2  # One per classified file, a file named twice drawn twice.
