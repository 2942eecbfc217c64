"""Pure step functions: one train step, many fused steps, the epoch shuffle, evaluation.

`make_steps` builds them around the static pieces (the model's graph definition, the optimizer,
the compute dtype); programs.py decides how they are jitted (donation, shardings). With several
models the per-model functions are `jax.vmap`-ed over a leading model axis of the parameters and
optimizer state; all models see the same batches.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fmnist_jax import metrics
from fmnist_jax import model as model_lib
from fmnist_jax.config import DATA_SEED_OFFSET
from fmnist_jax.plan import ModelSpec, OptimizerSpec

Batch = dict[str, jax.Array]  # {'image': uint8 [B, 28, 28], 'label': int32 [B], 'mask': f32 [B]}


@struct.dataclass
class TrainState:
  """Everything a run needs to continue bitwise identically after a restart."""
  step: jax.Array  # Global step, int32.
  rng: jax.Array  # Data-order key (uint32[2]); epoch e uses fold_in(rng, e).
  params: Any  # Float32 parameters ([K, ...] with num_models > 1).
  opt_state: Any  # Adam state, same leading axis as params.
  loss_sum: jax.Array  # Running sums over the current epoch, per model ...
  correct: jax.Array
  count: jax.Array  # ... and the number of real examples they cover.
  first_nonfinite: jax.Array  # First step with a non-finite loss, or -1.


def adam(optimizer: OptimizerSpec) -> optax.GradientTransformation:
  """optax's Adam without its last stage, the learning rate, which the step applies.

  `optax.adam(lr)` is `chain(scale_by_adam(), scale_by_learning_rate(lr))`; applying `-lr` in the
  step instead gives the same numbers and lets vmapped models each have their own rate
  (`optax.inject_hyperparams` would too, but doubles the cost of the update on a CPU).
  """
  return optax.scale_by_adam(b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps)


def init_state(model: ModelSpec, optimizer: OptimizerSpec, seed: int) -> tuple[Any, TrainState]:
  """Builds (graphdef, state): model k is initialised with seed `seed + k`.

  Jitted: one compiled program instead of dozens of eager operations, each dispatched and
  compiled on its own (a third of a second on a CPU).
  """
  return model_lib.graphdef(model), jax.jit(lambda: _init_state(model, optimizer, seed))()


def abstract_state(model: ModelSpec, optimizer: OptimizerSpec) -> TrainState:
  """The train state's shapes and dtypes, without computing it."""
  return jax.eval_shape(lambda: _init_state(model, optimizer, 0))


def _init_state(model: ModelSpec, optimizer: OptimizerSpec, seed: int) -> TrainState:
  tx = adam(optimizer)
  params = [model_lib.create(model, seed + k)[1] for k in range(model.num_models)]
  if model.num_models > 1:
    params = jax.tree.map(lambda *p: jnp.stack(p), *params)
    opt_state, per_model = jax.vmap(tx.init)(params), (model.num_models,)
  else:
    params = params[0]
    opt_state, per_model = tx.init(params), ()
  return TrainState(
      step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed + DATA_SEED_OFFSET),
      params=params, opt_state=opt_state, loss_sum=jnp.zeros(per_model, jnp.float32),
      correct=jnp.zeros(per_model, jnp.float32),
      count=jnp.zeros((), jnp.float32), first_nonfinite=jnp.full((), -1, jnp.int32))


def shuffle(rng, epoch, images, labels, batch_size: int) -> Batch:
  """This epoch's batches [steps, B, ...]: a permutation, padded up to whole batches.

  Every example appears exactly once; the padding rows repeat early examples with mask 0 (the
  last batch is partial, as in Keras), so no example is dropped. Gathering rows of flat
  [N, 784] images is about twice as fast as gathering [N, 28, 28] ones.
  """
  n = labels.shape[0]
  steps = -(-n // batch_size)
  # One sort of random 32-bit keys: on a CPU half the cost of jax.random.permutation's two
  # sorting rounds. A tie (about one pair per epoch of 60,000) keeps its index order.
  perm = jnp.argsort(jax.random.bits(jax.random.fold_in(rng, epoch), (n,)))
  order = jnp.concatenate([perm, perm[:steps * batch_size - n]]).reshape(steps, batch_size)
  mask = (jnp.arange(steps * batch_size) < n).astype(jnp.float32).reshape(steps, batch_size)
  return {'image': images[order], 'label': labels[order], 'mask': mask}


def params_finite(params) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))


@dataclasses.dataclass(frozen=True)
class Steps:
  """The pure functions of one configuration (see module docstring)."""
  train_step: Callable[[TrainState, Batch], TrainState]
  train_chunk: Callable[..., TrainState]
  evaluate: Callable[..., tuple[jax.Array, jax.Array]]


def make_steps(model: ModelSpec, optimizer: OptimizerSpec, graphdef) -> Steps:
  """Builds the step functions around the model's static graph definition."""
  dtype = jnp.dtype(model.compute_dtype)

  def logits_fn(params, images):
    return model_lib.apply(graphdef, params, images, dtype)

  train_step = _train_step_fn(model.num_models, optimizer, logits_fn)
  return Steps(train_step=train_step, train_chunk=_train_chunk_fn(train_step),
               evaluate=_evaluate_fn(model.num_models, logits_fn))


def _train_step_fn(num_models: int, optimizer: OptimizerSpec,
                   logits_fn) -> Callable[[TrainState, Batch], TrainState]:
  """One Adam step of every model on one batch, with the epoch's running sums."""
  tx = adam(optimizer)

  def model_step(params, opt_state, lr, batch):
    """One Adam step of one model; returns new params and state, loss and correct sums."""
    def loss_fn(p):
      logits = logits_fn(p, batch['image'])
      return metrics.mean_loss(logits, batch['label'], batch['mask']), logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
    # Only the loss is checked per step: a full pass over the gradients costs 20% of a step on a
    # CPU. A non-finite gradient makes the parameters, hence the next loss, non-finite; the
    # trainer also checks the parameters at the end of every chunk.
    n = jnp.sum(batch['mask'])
    return (params, opt_state, loss * n,
            metrics.correct_sum(logits, batch['label'], batch['mask']), jnp.isfinite(loss))

  if num_models > 1:
    model_step = jax.vmap(model_step, in_axes=(0, 0, 0, None))
    lr = jnp.asarray(optimizer.learning_rates, jnp.float32)
  else:
    lr = optimizer.learning_rates[0]

  def train_step(state: TrainState, batch: Batch) -> TrainState:
    params, opt_state, loss_sum, correct, finite = model_step(
        state.params, state.opt_state, lr, batch)
    first_bad = jnp.where((state.first_nonfinite < 0) & ~jnp.all(finite), state.step,
                          state.first_nonfinite)
    return state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        loss_sum=state.loss_sum + loss_sum, correct=state.correct + correct,
        count=state.count + jnp.sum(batch['mask']), first_nonfinite=first_bad)

  return train_step


def _train_chunk_fn(train_step) -> Callable[..., TrainState]:
  def train_chunk(state: TrainState, data: Batch, start, num_steps) -> TrainState:
    """`num_steps` train steps on batches start, start+1, ... of `data` [S, B, ...].

    `start` and `num_steps` are runtime values, so one compiled program serves every chunk
    length (checks, checkpoints, a resume mid-epoch, the short last chunk of a stream). Every
    step is one iteration of the same loop body: where a chunk starts or ends cannot change
    what a step computes, so any cut of a run gives the bits of the uncut one.
    """
    def step_at(i, state):
      batch = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, start + i, keepdims=False),
                           data)
      return train_step(state, batch)

    return jax.lax.fori_loop(0, num_steps, step_at, state)

  return train_chunk


def _evaluate_fn(num_models: int, logits_fn) -> Callable[..., tuple[jax.Array, jax.Array]]:
  multi = num_models > 1

  def sums(p, batch):
    logits = logits_fn(p, batch['image'])
    return (metrics.cross_entropy_sum(logits, batch['label'], batch['mask']),
            metrics.correct_sum(logits, batch['label'], batch['mask']))
  if multi:
    sums = jax.vmap(sums, in_axes=(0, None))

  def evaluate(params, test: Batch) -> tuple[jax.Array, jax.Array]:
    """Summed loss and correct count over padded test batches [S, B, ...] (mask skips padding)."""
    def body(carry, batch):
      loss, correct = sums(params, batch)
      return (carry[0] + loss, carry[1] + correct), None
    zero = jnp.zeros((num_models,) if multi else (), jnp.float32)
    (loss, correct), _ = jax.lax.scan(body, (zero, zero), test)
    return loss, correct

  return evaluate
