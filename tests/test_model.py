"""Model shape, parameter count, Keras-style initialisation; loss and accuracy by hand."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax import config as config_lib
from fmnist_jax import metrics, model
from fmnist_jax.errors import UserError


def test_tutorial_parameter_count_and_shapes():
  graphdef, params = model.create(model.ModelSpec.from_config(config_lib.base()), seed=0)
  assert model.param_count(params) == 784 * 128 + 128 + 128 * 10 + 10 == 101_770
  logits = model.apply(graphdef, params, jnp.zeros((7, 28, 28), jnp.uint8))
  assert logits.shape == (7, 10) and logits.dtype == jnp.float32


def test_hidden_sizes_are_configurable():
  config = config_lib.base()
  config.hidden_sizes = (96, 48)
  _, params = model.create(model.ModelSpec.from_config(config), seed=0)
  assert model.param_count(params) == 784 * 96 + 96 + 96 * 48 + 48 + 48 * 10 + 10


def test_keras_initialisation():
  _, params = model.create(model.ModelSpec.from_config(config_lib.base()), seed=0)
  kernel = np.asarray(params['hidden'][0]['kernel'][...])
  limit = math.sqrt(6 / (784 + 128))  # glorot_uniform
  assert np.abs(kernel).max() <= limit
  assert np.abs(kernel).max() > 0.95 * limit  # Uniform over the whole range, not a normal.
  assert np.all(np.asarray(params['hidden'][0]['bias'][...]) == 0)
  assert np.all(np.asarray(params['out']['bias'][...]) == 0)


def test_seed_changes_initialisation():
  _, a = model.create(model.ModelSpec.from_config(config_lib.base()), seed=0)
  _, b = model.create(model.ModelSpec.from_config(config_lib.base()), seed=1)
  assert not np.array_equal(a['out']['kernel'][...], b['out']['kernel'][...])


def test_unknown_model():
  config = config_lib.base()
  config.model = 'cnn'
  with pytest.raises(UserError, match="unknown model 'cnn'"):
    config_lib.validate_config(config)


def test_loss_and_accuracy_by_hand():
  logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
  labels = jnp.array([0, 1, 2])
  mask = jnp.array([1.0, 1.0, 0.0])  # The third row is padding.
  # -log softmax: row 0 label 0: log(e^2 + e + 1) - 2; row 1 label 1: log(2 + e^3) - 0.
  expected = (math.log(math.e**2 + math.e + 1) - 2) + math.log(2 + math.e**3)
  assert float(metrics.cross_entropy_sum(logits, labels, mask)) == pytest.approx(expected, 1e-6)
  assert float(metrics.mean_loss(logits, labels, mask)) == pytest.approx(expected / 2, 1e-6)
  assert float(metrics.correct_sum(logits, labels, mask)) == 1.0  # Row 0 right, row 1 wrong.
  assert float(metrics.correct_sum(logits, labels, jnp.ones(3))) == 1.0  # argmax tie -> class 0.


def test_adam_with_keras_defaults_is_optax_adam():
  """The step applies the learning rate after optax's scale_by_adam (so vmapped models can each
  have one): three steps give the bits of optax.adam with Keras's defaults, which the base config
  holds."""
  import jax
  import optax
  from fmnist_jax import steps
  from fmnist_jax.plan import ModelSpec, OptimizerSpec
  config = config_lib.base()
  assert (config.optimizer, config.learning_rate, config.b1, config.b2, config.eps) == (
      'adam', 1e-3, 0.9, 0.999, 1e-7)
  config.hidden_sizes = (16,)
  spec, optimizer = ModelSpec.from_config(config), OptimizerSpec.from_config(config)
  graphdef, state = steps.init_state(spec, optimizer, config.seed)
  train_step = jax.jit(steps.make_steps(spec, optimizer, graphdef).train_step)
  adam = optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-7)

  @jax.jit
  def optax_step(params, opt_state, batch):
    def loss(p):
      return metrics.mean_loss(model.apply(graphdef, p, batch['image']), batch['label'],
                               batch['mask'])
    updates, opt_state = adam.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(0)
  params, opt_state = state.params, adam.init(state.params)
  for _ in range(3):
    batch = {'image': rng.integers(0, 256, (32, 28, 28), dtype=np.uint8),
             'label': rng.integers(0, 10, 32).astype(np.int32), 'mask': np.ones(32, np.float32)}
    state = train_step(state, batch)
    params, opt_state = optax_step(params, opt_state, batch)
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
