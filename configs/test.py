"""A shrunk config for tests: one short epoch on real data, distinct sizes to catch mis-wiring.

    python -m fmnist_jax.train --config configs/test.py --workdir /tmp/fmnist_test

Expected result: test accuracy above 0.80 after one epoch.
"""

from fmnist_jax import config as config_lib


def get_config():
  config = config_lib.load('base.py', relative_to=__file__)
  config.num_epochs = 1
  config.batch_size = 64
  config.hidden_sizes = (96,)
  config.eval_batch_size = 768
  config.progress = False
  config.tensorboard = False
  return config
