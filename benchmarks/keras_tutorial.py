"""The TensorFlow "Basic classification" tutorial's Keras code as written, as one script.

    python benchmarks/keras_tutorial.py [--data-dir DIR] [--epochs 5]

benchmarks.run times this script from process start to exit (the whole-command column). The only
departure from the tutorial is where the arrays come from: `fashion_mnist.load_data()` needs a
network, so the script reads the same uint8 arrays fmnist_jax prepared (the decoded copy
`<tfds data dir>/fashion_mnist/fmnist_jax-<version>.npz`, plain numpy, as load_data reads its
files). It imports only numpy and TensorFlow, like the tutorial. 5 epochs (the tutorial uses 10),
to match the benchmark's tutorial run.
"""

import argparse
import glob
import os
import sys

import numpy as np


def load_data(data_dir):
  """(train_images, train_labels), (test_images, test_labels), as fashion_mnist.load_data()."""
  root = os.path.abspath(os.path.expanduser(
      data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'))
  copies = sorted(glob.glob(os.path.join(root, 'fashion_mnist', 'fmnist_jax-*.npz')))
  if not copies:
    sys.exit(f'error: no prepared Fashion-MNIST arrays in {root}; run fmnist_jax once (for example '
             '`python -m fmnist_jax.train --config configs/base.py`) or pass --data-dir.')
  with np.load(copies[-1]) as f:
    return ((f['train_image'], f['train_label']), (f['test_image'], f['test_label']))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data-dir', default='', help='tfds data dir ($TFDS_DATA_DIR, '
                      '~/tensorflow_datasets)')
  parser.add_argument('--epochs', type=int, default=5)
  args = parser.parse_args()

  # From here on, the tutorial's code.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  (train_images, train_labels), (test_images, test_labels) = load_data(args.data_dir)

  train_images = train_images / 255.0
  test_images = test_images / 255.0

  model = tf.keras.Sequential([
      tf.keras.layers.Flatten(input_shape=(28, 28)),
      tf.keras.layers.Dense(128, activation='relu'),
      tf.keras.layers.Dense(10)
  ])

  model.compile(optimizer='adam',
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=['accuracy'])

  model.fit(train_images, train_labels, epochs=args.epochs)

  test_loss, test_acc = model.evaluate(test_images, test_labels, verbose=2)

  print('\nTest accuracy:', test_acc)


if __name__ == '__main__':
  main()
