"""fmnist_jax: the TensorFlow Fashion-MNIST tutorial, trained fast with JAX, Flax and optax."""

__version__ = '0.1.0'

# The dataset's constants: every module takes them from here.
CLASS_NAMES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
    'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28  # Images are IMAGE_SIZE x IMAGE_SIZE uint8.
IMAGE_PIXELS = IMAGE_SIZE * IMAGE_SIZE
NUM_TRAIN = 60_000
NUM_TEST = 10_000
