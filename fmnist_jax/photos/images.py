"""Your own pictures as Fashion-MNIST inputs, made the way the dataset's images were made.

Fashion-MNIST's conversion (Xiao, Rasul, Vollgraf 2017, section 2): trim the background around
the article, resize the longest edge to 28, sharpen, centre on a 28x28 canvas, negate, 8-bit gray.
A photo only looks like the training data after the same steps: without the trim an article with
margins shrinks to a blob in the middle of the frame. Two steps the dataset did not need come
first, for photos taken at home: a soft cast shadow is told from the article by its soft edges
and measured as part of the background, and an article turned by up to 15 degrees is turned back
upright (the dataset's articles are upright and axis-aligned).
"""

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage, spatial

from fmnist_jax import IMAGE_SIZE as SIZE  # The dataset's 28 x 28.
from fmnist_jax.errors import UserError
from fmnist_jax.run import workdir

# Longest side a picture is reduced to before background detection (a phone photo is 4000 px).
WORK_SIZE = 512
# The dataset's trim tolerance: 5% of the maximum intensity.
TOLERANCE = 0.05 * 255
# ITU-R 601 luma, the weights of Pillow's convert('L').
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# The darkest shadow told from an article: it takes away at most this fraction of the light.
MAX_SHADOW = 0.55
# An outline rises by at least this share of the darkness around it (a shadow's edge by less).
OUTLINE_SHARE = 0.35
# A cast shadow is on average at most this share of the article's size deep.
MAX_DEPTH = 0.12
# When soft edges alone leave out this share of what differs from the background, there is a
# shadow (less is the article's own soft margin).
SHADOW_FOUND = 0.04
# A cast shadow covers at most this share of what differs from the background.
SHADOW_SHARE = 0.35
# Articles turned by up to this many degrees are turned back upright (the search goes further, so
# a best angle at its end, a shape no turn makes upright, is not taken).
MAX_TILT = 15
_ANGLES = np.deg2rad(np.arange(-MAX_TILT - 5, MAX_TILT + 5.01, 0.25))
# A turned article's bounding box shrinks by more than this when turned upright.
TILT_GAIN = 0.96
# ...or by more than this, when the direction of its outlines agrees.
TILT_GAIN_AGREED = 0.99
_EIGHT = np.ones((3, 3), bool)  # A pixel's eight neighbours: what touches diagonally is joined.


class ImageFileError(UserError):
  """A file that is missing, is not a readable image, or shows no object."""


def _sharpen_kernel() -> np.ndarray:
  """ImageMagick's `-sharpen 1x1` kernel: radius 1, Gaussian sigma 1, as the dataset used."""
  u = np.arange(-1, 2)
  g = np.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / 2.0) / (2 * np.pi)
  kernel = -g
  kernel[1, 1] = 2 * g.sum()
  return (kernel / kernel.sum()).astype(np.float32)


SHARPEN = _sharpen_kernel()


def _gray_levels(image: Image.Image) -> np.ndarray:
  """A 16-bit or 32-bit grayscale image as float 0-255 (not clipped to white as convert('L'))."""
  a = np.asarray(image, dtype=np.float64)
  finite = a[np.isfinite(a)]
  if finite.size == 0:
    return np.zeros(a.shape, np.float32)
  lo, hi = float(finite.min()), float(finite.max())
  if image.mode.startswith('I;16'):
    scaled = a / 257.0  # The format's own range, 0-65535.
  elif image.mode == 'F' and lo >= 0 and hi <= 1:
    scaled = a * 255.0  # Floats in 0-1, the usual convention.
  elif lo >= 0 and hi <= 255:
    scaled = a
  elif lo >= 0 and hi <= 65535:
    scaled = a / 257.0  # A 16-bit image stored as 32-bit (how Pillow opens some 16-bit PNGs).
  else:
    scaled = (a - lo) * (255.0 / (hi - lo))  # Anything else: its own min/max.
  return np.nan_to_num(np.clip(scaled, 0, 255)).astype(np.float32)


def to_rgb_or_gray(image: Image.Image) -> np.ndarray:
  """Any PIL image as float32 0-255, [H, W] (gray) or [H, W, 3] (colour): transparency on white
  (like a web page), 16/32-bit gray scaled, other modes through Pillow's RGB conversion."""
  if image.mode in ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F'):
    return _gray_levels(image)
  if image.mode in ('1', 'L'):
    return np.asarray(image.convert('L'), dtype=np.float32)
  if image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in image.info:
    image = Image.alpha_composite(Image.new('RGBA', image.size, 'white'), image.convert('RGBA'))
  return np.asarray(image.convert('RGB'), dtype=np.float32)


def _gray(pixels: np.ndarray) -> np.ndarray:
  if pixels.ndim == 2 or pixels.shape[2] == 1:
    return pixels.reshape(pixels.shape[:2])
  return LUMA[0] * pixels[..., 0] + LUMA[1] * pixels[..., 1] + LUMA[2] * pixels[..., 2]


def _background(pixels: np.ndarray):
  """(background [H, W, C] float32, noise): a smooth surface fitted to the picture's border.

  Fits c0 + c1 x + c2 y + c3 x y per channel (uniform, a gradient or a shadow across the frame)
  to the border pixels twice, the second time without the first fit's outliers (an object
  touching the frame); the noise is a high quantile of the border's residuals.
  """
  h, w = pixels.shape[:2]
  channels = pixels.reshape(h, w, -1)
  strip = min(max(1, round(0.02 * min(h, w))), (min(h, w) + 1) // 2)
  rows, cols = np.r_[:strip, h - strip:h], np.r_[:strip, w - strip:w]
  yy = np.r_[np.repeat(rows, w), np.tile(np.arange(h), len(cols))]
  xx = np.r_[np.tile(np.arange(w), len(rows)), np.repeat(cols, h)]
  y = (yy / max(h - 1, 1) * 2 - 1).astype(np.float32)
  x = (xx / max(w - 1, 1) * 2 - 1).astype(np.float32)
  design = np.stack([np.ones_like(x), x, y, x * y], axis=1)
  values = channels[yy, xx]
  keep = np.ones(len(values), bool)
  for _ in range(2):
    coef, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
    coef = coef.astype(np.float32)
    residual = np.linalg.norm(values - design @ coef, axis=1)
    med = np.median(residual[keep])
    spread = 1.4826 * np.median(np.abs(residual[keep] - med)) + 1e-3
    keep = residual <= med + 4 * spread
    if keep.sum() < design.shape[1] * 4:
      keep[:] = True
  noise = float(np.quantile(residual[keep], 0.99))
  gx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
  gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
  gxy = gx * gy
  background = np.empty(channels.shape, np.float32)
  for c in range(channels.shape[2]):  # 2-D planes: faster than broadcasting over a last axis.
    background[..., c] = coef[0, c] + coef[1, c] * gx + coef[2, c] * gy + coef[3, c] * gxy
  return background, noise


def _box(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice]:
  """The bounding box of `mask`'s pixels, `pad` pixels wider on each side (within the picture)."""
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  return (slice(max(rows[0] - pad, 0), rows[-1] + pad + 1),
          slice(max(cols[0] - pad, 0), cols[-1] + pad + 1))


def _longest_side(mask: np.ndarray) -> int:
  return max(side.stop - side.start for side in _box(mask))


def _drop_specks(mask: np.ndarray) -> np.ndarray:
  """The mask without the blobs much smaller than its largest one."""
  labels, count = ndimage.label(mask, _EIGHT)
  if count < 2:
    return mask
  areas = np.bincount(labels.ravel())[1:]
  return np.isin(labels, 1 + np.flatnonzero(areas >= 0.02 * areas.max()))


def _object_mask(pixels: np.ndarray, background: np.ndarray, noise: float) -> np.ndarray:
  """Pixels whose colour stands out from the background, cleaned of noise and texture specks."""
  h, w = pixels.shape[:2]
  difference = pixels.reshape(h, w, -1) - background
  distance = np.sqrt(np.einsum('ijk,ijk->ij', difference, difference))
  mask = distance > max(TOLERANCE, 1.5 * noise)
  if min(h, w) >= 64:  # Specks of JPEG noise or texture go; a photo's object is thicker than 3 px.
    mask = ndimage.binary_opening(mask, _EIGHT)
  return _drop_specks(mask)  # The object's parts stay; stray blobs go.


def _sharp_extent(gray: np.ndarray, background_gray: np.ndarray, mask: np.ndarray,
                  reach_around: float = 1.0) -> np.ndarray:
  """The object mask without what reaches it from outside across soft edges only: a cast shadow.

  A shadow darkens the background smoothly; the article's outline rises within about one
  Fashion-MNIST pixel (1/28 of its size), by more than twice the trim tolerance and by a good
  part of the darkness around it. The background floods the mask through the other pixels that a
  shadow could be, for at most a quarter of the article's size (so a faint part with a soft edge
  loses its margin, not its inside). When what would go is more than a shadow, the mask is kept.
  `reach_around` (Fashion-MNIST pixels) is 2 once a shadow is found, so a shadow's sharper edge,
  weak beside the article's darkness two pixels away, goes too.
  """
  size = _longest_side(mask)
  pixel = max(1.0, size / SIZE)  # One Fashion-MNIST pixel at this scale.
  box = _box(mask, int(pixel) + 2)
  inside = mask[box]
  # Relative to the background's brightness (as a shadow darkens), in 0-255 units.
  shade = gray[box] / np.maximum(background_gray[box], 1)
  rise = ndimage.gaussian_gradient_magnitude(shade * 255, max(0.7, pixel / 4)) * pixel
  around = ndimage.maximum_filter(np.abs(1 - shade) * 255, size=2 * int(reach_around * pixel) + 1)
  sharp = rise > np.maximum(2 * TOLERANCE, OUTLINE_SHARE * around)
  soft = inside & ~sharp & (shade > 1 - MAX_SHADOW)
  # The outline thickened, so the gaps a faint stretch of it leaves do not let the flood inside;
  # then the flood takes back the shadow's pixels the thickening covered.
  reach = int(pixel / 2) + 1
  outline = ndimage.binary_dilation(sharp, iterations=reach)
  flooded = ndimage.binary_dilation(~inside, iterations=max(1, int(0.25 * size)),
                                    mask=soft & ~outline)
  flooded = ndimage.binary_dilation(flooded, iterations=reach, mask=soft) & inside
  # A shadow lies along the outside, a few pixels deep; a flood that came in through a gap in a
  # faint outline spreads inside the article, far from the narrow gap it used.
  labels, count = ndimage.label(flooded, _EIGHT)
  if count:
    touching = flooded & ndimage.binary_dilation(~inside)
    area = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    contact = np.bincount(labels[touching], minlength=count + 1)[1:]
    shallow = 1 + np.flatnonzero(area <= MAX_DEPTH * size * np.maximum(contact, 1))
    flooded = np.isin(labels, shallow)
  if flooded.sum() > SHADOW_SHARE * inside.sum():  # More than a shadow: a faint, soft article.
    return mask
  article = np.zeros_like(mask)
  article[box] = inside & ~flooded
  return _drop_specks(article)  # Specks left between the article and its shadow go.


def _fill(values: np.ndarray, known: np.ndarray) -> np.ndarray:
  """Fills the unknown pixels smoothly from the known ones (push-pull over an image pyramid)."""
  if known.all() or not known.any() or min(values.shape) < 2:
    return np.where(known, values, values[known].mean() if known.any() else 1.0)
  h, w = values.shape
  weights = known.astype(np.float32)
  ph, pw = h + h % 2, w + w % 2  # Even sizes, padding with unknown pixels.
  v = np.zeros((ph, pw), np.float32)
  k = np.zeros((ph, pw), np.float32)
  v[:h, :w], k[:h, :w] = values * weights, weights
  coarse_k = k.reshape(ph // 2, 2, pw // 2, 2).sum(axis=(1, 3))
  coarse_v = v.reshape(ph // 2, 2, pw // 2, 2).sum(axis=(1, 3)) / np.maximum(coarse_k, 1e-6)
  coarse = _fill(coarse_v, coarse_k > 0)
  up = ndimage.zoom(coarse, 2, order=1, mode='nearest', grid_mode=True)[:h, :w]
  return np.where(known, values, up)


def _shading(gray: np.ndarray, background_gray: np.ndarray, article: np.ndarray) -> np.ndarray:
  """The background's brightness over its border model (a shadow is below 1): a smooth field
  measured around the article and filled in under it from its surroundings."""
  size = _longest_side(article)
  known = ~ndimage.binary_dilation(ndimage.binary_fill_holes(article),
                                   iterations=max(1, int(size / 56)))
  ratio = np.clip(gray / np.maximum(background_gray, 1), 0, 1.5)
  field = _fill(ratio.astype(np.float32), known)
  return ndimage.gaussian_filter(field, max(1.0, size / 56))


def _intensity(gray: np.ndarray, background_gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Fashion-MNIST intensity 0-255: how far each pixel is from the background, toward the object
  (on white, a dark object's is exactly 255 - gray)."""
  diff = gray - background_gray
  dark_object = np.median(diff[mask]) < 0 if mask.any() else True
  if dark_object:
    out = -diff / np.maximum(background_gray, 32) * 255
  else:
    out = diff / np.maximum(255 - background_gray, 32) * 255
  return np.clip(out, 0, 255)


def _resize_longest(crop: np.ndarray) -> np.ndarray:
  """Resizes a float image so its longest edge is 28 (area average when shrinking)."""
  h, w = crop.shape
  scale = SIZE / max(h, w)
  size = (max(1, min(SIZE, round(w * scale))), max(1, min(SIZE, round(h * scale))))
  resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
  return np.asarray(Image.fromarray(crop.astype(np.float32)).resize(size, resample))


def _tilt(article: np.ndarray, intensity: np.ndarray | None = None) -> float:
  """Degrees the article is turned counter-clockwise from upright; 0 when upright or unsure.

  Fashion-MNIST's articles are upright and touch their bounding box on all sides, so the angle
  whose bounding box is smallest is the article's. Upright articles with slanted outlines (a
  shoe's toe) reach a slightly smaller box turned a little; a turned one gains several percent.
  A smaller gain counts when the direction of the outlines in `intensity` agrees.
  """
  if article.sum() < 100:  # Too few pixels to tell a few degrees.
    return 0.0
  outline = article & ~ndimage.binary_erosion(article)
  ys, xs = np.nonzero(outline)
  points = np.stack([xs, ys], axis=1).astype(np.float64)
  try:
    hull = points[spatial.ConvexHull(points).vertices]
  except spatial.QhullError:  # All on one line.
    return 0.0
  x, y = hull[:, 0][None], hull[:, 1][None]
  cos, sin = np.cos(_ANGLES)[:, None], np.sin(_ANGLES)[:, None]
  areas = (np.ptp(x * cos - y * sin, axis=1) + 1) * (np.ptp(x * sin + y * cos, axis=1) + 1)
  best = int(np.argmin(areas))
  angle = float(np.rad2deg(_ANGLES[best]))
  gain = areas[best] / areas[len(_ANGLES) // 2]
  if abs(angle) > MAX_TILT:
    return 0.0
  if gain <= TILT_GAIN:
    return angle
  if gain > TILT_GAIN_AGREED or abs(angle) < 2 or intensity is None:
    return 0.0
  # A smaller gain (a T-shirt's flared sleeves) counts when the outlines' own direction agrees.
  gy, gx = np.gradient(intensity)
  weight = gx * gx + gy * gy
  turn = np.sum(weight * np.exp(4j * np.arctan2(gy, gx)))
  edges_angle = -np.rad2deg(np.angle(turn)) / 4
  return angle if abs(edges_angle - angle) < 2 else 0.0


def _turn(intensity: np.ndarray, article: np.ndarray, angle: float):
  """Turns the article's neighbourhood back by `angle` degrees: (intensity, article mask)."""
  pad = int(np.ceil(0.3 * (_longest_side(article) - 1))) + 2
  box = _box(article)
  room = ((pad, pad), (pad, pad))  # So the corners are not cut off.
  turned = [np.asarray(Image.fromarray(np.pad(a[box], room).astype(np.float32)).rotate(
      -angle, Image.Resampling.BILINEAR)) for a in (intensity, article)]
  return turned[0], turned[1] > 0.5


def conversion_steps(image: Image.Image) -> list[tuple[str, np.ndarray]]:
  """(name, array) for each step of `to_fashion_mnist`, for a figure; the last is the result."""
  if max(image.size) > WORK_SIZE:  # Detection needs no more pixels than this; keeps it quick.
    image = image.copy()
    image.thumbnail((WORK_SIZE, WORK_SIZE), Image.Resampling.BOX)
  pixels = to_rgb_or_gray(image)
  steps = [('picture', pixels)]
  gray = _gray(pixels)
  if pixels.shape[:2] == (SIZE, SIZE):  # Already Fashion-MNIST's size: kept pixel for pixel.
    if pixels.ndim == 3:  # Pillow's integer luma, so a gray RGB file gives its gray back exactly.
      gray = np.asarray(Image.fromarray(pixels.astype(np.uint8)).convert('L'), np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    out = 255 - gray if np.median(border) > 127 else gray
    return steps + [('28x28', np.round(out).astype(np.uint8))]
  background, noise = _background(pixels)
  mask = _object_mask(pixels, background, noise)
  if not mask.any():
    why = ('the picture is one colour' if np.ptp(gray) < 8 else
           'it varies alike everywhere, as noise or a texture does')
    raise ImageFileError(f'no object stands out from the background ({why}).')
  steps.append(('differs from background', mask))
  background_gray = _gray(background)
  article = mask
  # A shadow shows on a light background; below SHADOW_FOUND only the article's own soft margin
  # would go, and the conversion stays the dataset's.
  if (np.median(gray[mask] - background_gray[mask]) < 0 and
      _sharp_extent(gray, background_gray, mask).sum() < (1 - SHADOW_FOUND) * mask.sum()):
    article = _sharp_extent(gray, background_gray, mask, reach_around=2.0)  # Sharper parts too.
    background_gray = background_gray * _shading(gray, background_gray, article)
    steps.append(('sharp-edged article', article))
    steps.append(('background and shadow', background_gray))
  filled = ndimage.binary_fill_holes(article)
  near_article = ndimage.binary_dilation(filled, _EIGHT, iterations=2)
  intensity = _intensity(gray, background_gray, filled) * near_article
  angle = _tilt(filled, intensity)
  if angle:
    intensity, filled = _turn(intensity, filled, angle)
    steps.append((f'turned back {-angle:+.0f} deg', intensity))
  box = _box(filled)
  steps.append(('trimmed, negated', intensity[box]))
  small = _resize_longest(intensity[box])
  steps.append(('longest edge 28', small))
  sharp = np.clip(ndimage.correlate(small, SHARPEN, mode='nearest'), 0, 255)
  steps.append(('sharpened', sharp))
  h, w = sharp.shape
  top, left = (SIZE - h + 1) // 2, (SIZE - w + 1) // 2  # The dataset's odd margin goes first.
  centred = np.pad(sharp, ((top, SIZE - h - top), (left, SIZE - w - left)))
  steps.append(('centred 28x28', np.round(centred).astype(np.uint8)))
  return steps


def to_fashion_mnist(image: Image.Image) -> np.ndarray:
  """Converts any PIL image to uint8 [28, 28] the way Fashion-MNIST's images were made (a 28x28
  picture is kept as it is, inverted only if its background is light).

  Raises:
    ImageFileError: nothing stands out from the background.
  """
  return conversion_steps(image)[-1][1]


def _open(path: str) -> Image.Image:
  """Opens, decodes and orients an image file; any failure becomes a one-line ImageFileError. Its
  kind is checked first (workdir.check_kind): a fifo, a socket or a device is never opened."""
  fix = 'pass an image file'
  if workdir.check_kind(path, 'file', fix, ImageFileError, follow=True) is None:
    raise ImageFileError(f'{path}: file not found.')
  data = workdir.read_regular(path, fix, ImageFileError, follow=True)
  try:
    with warnings.catch_warnings():
      # Pillow only warns for pictures between its pixel limit and twice that; refuse them too.
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as image:
        image.load()
        return ImageOps.exif_transpose(image)
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ImageFileError(f'{path}: too many pixels to read safely ({e}).') from None
  except UnidentifiedImageError:
    raise ImageFileError(f'{path}: not an image file (PNG, JPEG, GIF, BMP, TIFF and WebP '
                         'are read).') from None
  except Exception as e:  # pylint: disable=broad-except
    # A damaged file makes Pillow raise almost anything (OSError, SyntaxError, struct.error...).
    reason = ' '.join(str(e).split()) or type(e).__name__
    raise ImageFileError(f'{path}: damaged or unreadable image ({reason}).') from None


def load_with_original(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads an image file: (the picture for display, uint8 [28, 28]).

  The picture is uint8 gray or RGB, upright (EXIF), on white if transparent, and at most
  WORK_SIZE pixels on its longest side.

  Raises:
    ImageFileError: one line naming the file, when it is missing, unreadable or blank.
  """
  image = _open(path)
  try:
    steps = conversion_steps(image)
  except ImageFileError as e:
    raise ImageFileError(f'{path}: {e}') from None
  return np.round(steps[0][1]).astype(np.uint8), steps[-1][1]


def load(path: str) -> np.ndarray:
  """Reads an image file into uint8 [28, 28]; ImageFileError names the file on failure."""
  return load_with_original(path)[1]


def load_all(paths, read=load) -> tuple[list[tuple[str, Any]], list[str]]:
  """Reads many files with `read` (`load` or `load_with_original`): ([(path, what it returned),
  ...] in order, one-line errors of the others); a bad file does not stop the others, a file
  named twice is read twice."""
  loaded, errors = [], []
  for path in paths:
    try:
      loaded.append((path, read(path)))
    except ImageFileError as e:
      errors.append(str(e))
  return loaded, errors
