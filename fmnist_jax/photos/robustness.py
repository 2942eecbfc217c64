"""Test images turned into "photos", to measure how well the model classifies your own pictures.

Each family makes a realistic picture from a 28x28 test image: the article upscaled 3-5x with a
smooth resample (as a camera would see it), drawn dark on a light background (or light on a dark
one), with margins, on a canvas of some other shape, saved the way a user's file would be. The
picture then goes through `images.to_fashion_mnist` like any file given to `predict`, and the
model's accuracy per family is set beside its accuracy on the untouched test images. Everything
is deterministic from the seed.
"""

import io

import numpy as np
from PIL import Image, ImageFilter

from fmnist_jax import IMAGE_SIZE
from fmnist_jax.photos import images as images_lib

# name -> one-line description; every family except 'rotated' keeps the article's shape unchanged.
FAMILIES = {
    'untouched': 'the 28x28 test image itself',
    'light_margins': 'dark article on a light background with margins, RGB JPEG quality 90, '
                     'non-square canvas',
    'dark_margins': 'light article on a dark background with margins, RGB JPEG quality 90',
    'off_centre': 'article far from the centre of a large light canvas, PNG',
    'non_square': 'very wide or very tall light canvas (aspect 1:2.5 to 2.5:1), PNG',
    'jpeg': 'light background, JPEG quality 60-95',
    'noise': 'light background, Gaussian noise sigma 3-10 per channel, PNG',
    'blur': 'light background, Gaussian blur radius 1-2.5 px at photo scale, PNG',
    'rotated': 'light background, article rotated by 3-10 degrees either way, PNG',
    'coloured_background': 'dark article on a random pale or saturated coloured background, JPEG',
    'gradient': 'light background darkening by 15-30% across the frame, JPEG',
    'shadow': 'light background with a soft shadow cast by the article, offset 3-8% of its '
              'size, 25-50% darker (as its lighter parts), JPEG',
    'textured_background': 'light background with a fabric-like texture, JPEG',
}


def _canvas_size(rng, h, w, margin=(0.1, 0.6), aspect=None):
  """Canvas (H, W) around an h x w article: random margins, optionally a forced aspect ratio."""
  height = int(h * (1 + rng.uniform(*margin) + rng.uniform(*margin)))
  width = int(w * (1 + rng.uniform(*margin) + rng.uniform(*margin)))
  if aspect is not None:  # width / height
    if width / height < aspect:
      width = int(height * aspect)
    else:
      height = int(width / aspect)
  return height, width


def _encode(picture: np.ndarray, fmt: str, quality: int = 90) -> Image.Image:
  """Saves and reopens the picture as a file would be, so codec artefacts are real."""
  buffer = io.BytesIO()
  image = Image.fromarray(np.clip(np.round(picture), 0, 255).astype(np.uint8))
  image.save(buffer, fmt, quality=quality, compress_level=1)  # JPEG reads one, PNG the other.
  with Image.open(buffer) as reopened:
    reopened.load()
    return reopened


def make_photo(image: np.ndarray, family: str, rng: np.random.Generator) -> Image.Image:
  """One uint8 [28, 28] test image as a picture of the given family (a PIL image)."""
  if family == 'untouched':
    return Image.fromarray(image)
  scale = rng.uniform(3, 5)
  size = int(round(IMAGE_SIZE * scale))
  alpha_image = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)
  if family == 'rotated':
    angle = rng.uniform(3, 10) * rng.choice([-1, 1])
    alpha_image = alpha_image.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=0)
  if family == 'blur':
    alpha_image = alpha_image.filter(ImageFilter.GaussianBlur(rng.uniform(1, 2.5)))
  alpha = np.asarray(alpha_image, np.float32)[..., None] / 255
  h, w = alpha.shape[:2]

  aspect = None
  margin = (0.1, 0.6)
  if family == 'non_square':
    aspect = float(np.exp(rng.uniform(np.log(0.4), np.log(2.5))))
  elif family == 'light_margins':
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
  elif family == 'off_centre':
    margin = (0.05, 1.5)
  canvas_h, canvas_w = _canvas_size(rng, h, w, margin, aspect)
  top = int(rng.integers(0, canvas_h - h + 1))
  left = int(rng.integers(0, canvas_w - w + 1))
  if family not in ('off_centre', 'non_square'):  # Roughly centred, as a person frames a photo.
    top = int(np.clip(round((canvas_h - h) / 2 + rng.normal(0, 0.1) * (canvas_h - h)), 0,
                      canvas_h - h))
    left = int(np.clip(round((canvas_w - w) / 2 + rng.normal(0, 0.1) * (canvas_w - w)), 0,
                       canvas_w - w))

  # Background [H, W, 3] and the colour of the article's darkest (or lightest) parts.
  if family == 'dark_margins':
    background = np.full((canvas_h, canvas_w, 3), rng.uniform(0, 25, 3), np.float32)
    ink = rng.uniform(230, 255, 3).astype(np.float32)
  else:
    background = np.full((canvas_h, canvas_w, 3), rng.uniform(225, 252, 3), np.float32)
    ink = rng.uniform(0, 25, 3).astype(np.float32)
  if family == 'coloured_background':
    hsv = (int(rng.uniform(0, 1) * 255), int(rng.uniform(60, 200)), int(rng.uniform(170, 250)))
    background[:] = Image.new('HSV', (1, 1), hsv).convert('RGB').getpixel((0, 0))
  elif family == 'gradient':
    y = np.linspace(0, 1, canvas_h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, canvas_w, dtype=np.float32)[None, :]
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(theta) * x + np.sin(theta) * y
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    background *= (1 - rng.uniform(0.15, 0.3) * ramp)[..., None]
  elif family == 'shadow':  # Cast by the article, as dark as its lighter parts, offset and soft.
    shadow = Image.new('L', (canvas_w, canvas_h), 0)
    dy = int(rng.uniform(0.03, 0.08) * h)
    dx = int(rng.uniform(0.03, 0.08) * w * rng.choice([-1, 1]))
    shadow.paste(alpha_image, (left + dx, top + dy))  # May reach past the canvas.
    shadow = np.asarray(shadow.filter(ImageFilter.GaussianBlur(rng.uniform(0.03, 0.06) * h)),
                        np.float32) / 255
    background *= (1 - rng.uniform(0.25, 0.5) * shadow)[..., None]
  elif family == 'textured_background':
    texture = rng.normal(0, 1, (canvas_h // 4 + 2, canvas_w // 4 + 2)).astype(np.float32)
    texture = np.asarray(Image.fromarray(texture).resize((canvas_w, canvas_h),
                                                              Image.Resampling.BICUBIC))
    weave = np.sin(np.arange(canvas_w) * rng.uniform(0.8, 1.6))[None, :] * np.sin(
        np.arange(canvas_h) * rng.uniform(0.8, 1.6))[:, None]
    background += (rng.uniform(3, 6) * texture + rng.uniform(2, 5) * weave)[..., None]

  picture = background.copy()
  region = picture[top:top + h, left:left + w]
  picture[top:top + h, left:left + w] = region * (1 - alpha) + ink * alpha
  if family == 'noise':
    picture += rng.normal(0, rng.uniform(3, 10), picture.shape).astype(np.float32)

  if family in ('light_margins', 'dark_margins', 'coloured_background', 'gradient', 'shadow',
                'textured_background'):
    return _encode(picture, 'JPEG', 90)
  if family == 'jpeg':
    return _encode(picture, 'JPEG', int(rng.integers(60, 96)))
  return _encode(picture, 'PNG')


def photos(images: np.ndarray, family: str, seed: int = 0) -> list[Image.Image]:
  """Every image of `images` as a picture of `family`, deterministic from the seed."""
  rng = np.random.default_rng(seed * 1000 + list(FAMILIES).index(family))  # One per family.
  return [make_photo(image, family, rng) for image in images]


def sample(num_images: int, n: int, seed: int = 0) -> np.ndarray:
  """The indices of the test images used: the same seeded subset for every family."""
  return np.sort(np.random.default_rng(seed).permutation(num_images)[:n])


def evaluate(probs_fn, images: np.ndarray, labels: np.ndarray, n_per_family: int = 500,
             seed: int = 0, convert=images_lib.to_fashion_mnist, families=None) -> dict:
  """{family: {'accuracy', 'count'}}: photos made from the same seeded `n_per_family` test images.

  Args:
    probs_fn: uint8 [N, 28, 28] -> probabilities [N, 10].
    images, labels: the test images (uint8 [N, 28, 28]) and labels.
    n_per_family: how many test images.
    seed: makes the subset and every family's random choices.
    convert: PIL image -> uint8 [28, 28]; `images.to_fashion_mnist` unless comparing another.
    families: the families to run (all of FAMILIES by default).
  """
  chosen = sample(len(images), n_per_family, seed)
  results = {}
  for family in families or FAMILIES:
    converted = np.stack([convert(p) for p in photos(images[chosen], family, seed)])
    predicted = np.asarray(probs_fn(converted)).argmax(axis=1)
    results[family] = {'accuracy': float(np.mean(predicted == labels[chosen])),
                       'count': int(len(chosen))}
  return results


def examples(images: np.ndarray, per_family: int = 3, seed: int = 0, families=None) -> dict:
  """{family: [(picture as uint8 array, converted uint8 [28, 28]), ...]} for a figure."""
  chosen = sample(len(images), per_family, seed)
  out = {}
  for family in families or FAMILIES:
    pictures = photos(images[chosen], family, seed)
    out[family] = [(np.asarray(p), images_lib.to_fashion_mnist(p)) for p in pictures]
  return out
