"""fmnist_jax: the TensorFlow Fashion-MNIST tutorial, trained fast with JAX, Flax and optax."""

__version__ = '0.1.0'

CLASS_NAMES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
    'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
)
