"""Your own pictures as Fashion-MNIST inputs: grayscale, 28x28, light object on black."""

import numpy as np
from PIL import Image, UnidentifiedImageError

from fmnist_jax.errors import UserError

SIZE = 28


class ImageFileError(UserError):
  """A file that is missing or is not a readable image."""


def to_fashion_mnist(image: Image.Image) -> np.ndarray:
  """Converts any PIL image to uint8 [28, 28] the way Fashion-MNIST looks.

  Grayscale; scaled so the longer side is 28 (aspect ratio kept, area-averaged when shrinking)
  and centred on the background colour; inverted when the background is light, because
  Fashion-MNIST shows a light object on a black background.
  """
  if image.mode in ('RGBA', 'LA', 'P'):
    image = image.convert('RGBA')
    background = Image.new('RGBA', image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, image)  # Transparent -> white, like a web page.
  gray = image.convert('L')
  pixels = np.asarray(gray)
  border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
  background = int(np.median(border))
  width, height = gray.size
  scale = SIZE / max(width, height)
  new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
  resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
  resized = gray.resize(new_size, resample) if new_size != gray.size else gray
  canvas = Image.new('L', (SIZE, SIZE), background)
  canvas.paste(resized, ((SIZE - new_size[0]) // 2, (SIZE - new_size[1]) // 2))
  out = np.asarray(canvas, dtype=np.uint8)
  return 255 - out if background > 127 else out


def load(path: str) -> np.ndarray:
  """Reads an image file into uint8 [28, 28]; ImageFileError names the file on failure."""
  try:
    with Image.open(path) as image:
      image.load()
      return to_fashion_mnist(image)
  except FileNotFoundError:
    raise ImageFileError(f'{path}: file not found.') from None
  except IsADirectoryError:
    raise ImageFileError(f'{path}: is a folder, not an image file.') from None
  except (UnidentifiedImageError, OSError, ValueError) as e:
    reason = 'not an image file' if isinstance(e, UnidentifiedImageError) else str(e)
    raise ImageFileError(f'{path}: {reason} (PNG, JPEG, GIF, BMP, TIFF and WebP are read).'
                         ) from None
