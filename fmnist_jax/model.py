"""The tutorial's model: Flatten -> Dense(128, relu) -> Dense(10) logits, in Flax NNX.

Initialised like Keras (glorot_uniform kernels, zero biases) so the comparison with the tutorial
is fair. The trainer uses the functional NNX pattern: `nnx.split` once into a static graph
definition and a parameter pytree, `apply` merges them inside jitted code.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from fmnist_jax import IMAGE_PIXELS
from fmnist_jax.plan import ModelSpec
# flax >= 0.12 needs nnx.List for a list of submodules; flax 0.11 (Colab's) has none, takes a list.
_ModuleList = getattr(nnx, 'List', list)


class MLP(nnx.Module):
  """Flatten, then Dense(relu) layers of `hidden_sizes`, then Dense(num_classes) logits."""

  def __init__(self, hidden_sizes, num_classes: int, *, rngs: nnx.Rngs):
    sizes = (IMAGE_PIXELS, *hidden_sizes)
    init = nnx.initializers.glorot_uniform()  # Keras's Dense default; Flax's is lecun_normal.
    self.hidden = _ModuleList([nnx.Linear(i, o, kernel_init=init, rngs=rngs)
                               for i, o in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(sizes[-1], num_classes, kernel_init=init, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.reshape(images.shape[0], -1)
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.out(x)


def create(spec: ModelSpec, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
  """Builds one model; returns (graphdef, params)."""
  return nnx.split(MLP(spec.hidden_sizes, spec.num_classes, rngs=nnx.Rngs(seed)), nnx.Param)


def graphdef(spec: ModelSpec) -> nnx.GraphDef:
  """The graph definition `create` returns, without creating any array (an abstract model)."""
  abstract = nnx.eval_shape(lambda: MLP(spec.hidden_sizes, spec.num_classes, rngs=nnx.Rngs(0)))
  return nnx.split(abstract, nnx.Param)[0]


def apply(graphdef: nnx.GraphDef, params: nnx.State, images: jax.Array,
          dtype=jnp.float32) -> jax.Array:
  """Logits for uint8 (or float) images [B, 28, 28]; computes in `dtype`, returns float32.

  Scaling to [0, 1] happens here, on the device, so the data can stay uint8 (4x less memory and
  transfer than float32).
  """
  x = images.astype(dtype) / 255.0
  if dtype != jnp.float32:
    params = jax.tree.map(lambda p: p.astype(dtype), params)
  logits = nnx.merge(graphdef, params)(x)
  return logits.astype(jnp.float32)


def param_count(params, num_models: int = 1) -> int:
  """Parameters of one model (a leading model axis of `num_models` is not counted)."""
  return sum(int(p.size) for p in jax.tree.leaves(params)) // num_models
