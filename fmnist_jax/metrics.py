"""Loss and accuracy: sparse categorical cross-entropy on logits, and top-1 accuracy.

Both take a `mask` (1 = real example, 0 = padding) so that padded last batches count exactly
the real examples; both return sums, which the callers divide by the count they accumulate.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def cross_entropy_sum(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum over real examples of -log softmax(logits)[label] (Keras's from_logits=True)."""
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask)


def correct_sum(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Number of real examples whose argmax logit is the label."""
  return jnp.sum((jnp.argmax(logits, axis=-1) == labels) * mask)


def mean_loss(logits, labels, mask) -> jax.Array:
  """The training objective: mean cross-entropy over the batch's real examples."""
  return cross_entropy_sum(logits, labels, mask) / jnp.maximum(jnp.sum(mask), 1.0)


def epoch_entry(epoch: int, step: int, plan, train_sums, test_sums, seconds: float,
                per_model: bool) -> dict:
  """One line of metrics.jsonl: mean losses and accuracies (over models too), time, steps/s; with
  several models, each model's numbers under 'per_model'."""
  loss_sum, correct, count = train_sums
  test_loss, test_correct = test_sums
  values = {
      'train_loss': np.atleast_1d(loss_sum / count),
      'train_accuracy': np.atleast_1d(correct / count),
      'test_loss': np.atleast_1d(test_loss / plan.num_test),
      'test_accuracy': np.atleast_1d(test_correct / plan.num_test)}
  steps_done = step - epoch * plan.steps_per_epoch  # The whole epoch, even resumed.
  entry = {'epoch': epoch + 1, 'step': step, **{k: float(np.mean(v)) for k, v in values.items()},
           'seconds': seconds, 'steps_per_second': steps_done / seconds if seconds else None}
  if per_model:
    entry['per_model'] = {k: [float(x) for x in v] for k, v in values.items()}
  return entry
