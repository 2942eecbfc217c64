"""Loss and accuracy: sparse categorical cross-entropy on logits, and top-1 accuracy.

Both take a `mask` (1 = real example, 0 = padding) so that padded last batches count exactly
the real examples; both return sums, which the callers divide by the count they accumulate.
"""

import jax
import jax.numpy as jnp
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
