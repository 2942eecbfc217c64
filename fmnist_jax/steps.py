"""Pure step functions: one train step, many fused steps, the epoch shuffle, evaluation.

Everything here is a pure function of arrays, built by `make_steps` around the static pieces
(the model's graph definition, the optimizer, the compute dtype). The trainer decides how to jit
them (donation, shardings) and where the data lives.

With `num_models > 1` the per-model functions are `jax.vmap`-ed over a leading model axis of the
parameters and optimizer state; all models see the same batches.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fmnist_jax import metrics
from fmnist_jax import model as model_lib

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


def make_optimizer(config) -> optax.GradientTransformation:
  """optax's Adam without its last stage, the learning rate, which the step applies.

  `optax.adam(lr)` is `chain(scale_by_adam(), scale_by_learning_rate(lr))`; applying `-lr` in the
  step instead gives the same numbers and lets vmapped models each have their own rate.
  (`optax.inject_hyperparams` would do that too, but doubles the cost of the update on a CPU.)
  """
  return optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps)


def model_learning_rates(config) -> tuple[float, ...]:
  return tuple(config.learning_rates) or (config.learning_rate,) * config.num_models


def init_state(config, compile_fn: Callable | None = None) -> tuple[Any, TrainState]:
  """Builds (graphdef, state): model k is initialised with seed `config.seed + k`.

  Jitted: one compiled program instead of dozens of eager operations, each dispatched and
  compiled on its own (a third of a second on a CPU). `compile_fn(key, jitted)` (the trainer's
  Compiler.get) may supply the compiled program, e.g. from the program store.
  """
  jitted = jax.jit(lambda: _init_state(config)[1])
  program = compile_fn('init', jitted) if compile_fn else jitted
  return model_lib.graphdef(config), program()


def _init_state(config) -> tuple[Any, TrainState]:
  tx = make_optimizer(config)
  graphdef, params = model_lib.create(config, config.seed)
  if config.num_models > 1:
    models = [params] + [model_lib.create(config, config.seed + k)[1]
                         for k in range(1, config.num_models)]
    params = jax.tree.map(lambda *p: jnp.stack(p), *models)
    opt_state = jax.vmap(tx.init)(params)
    per_model = (config.num_models,)
  else:
    opt_state = tx.init(params)
    per_model = ()
  state = TrainState(
      step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(config.seed + 1_000_003),
      params=params, opt_state=opt_state, loss_sum=jnp.zeros(per_model, jnp.float32),
      correct=jnp.zeros(per_model, jnp.float32),
      count=jnp.zeros((), jnp.float32), first_nonfinite=jnp.full((), -1, jnp.int32))
  return graphdef, state


@dataclasses.dataclass(frozen=True)
class Steps:
  """The pure functions of one configuration (see module docstring)."""
  train_step: Callable[[TrainState, Batch], TrainState]
  train_chunk: Callable[..., TrainState]
  shuffle: Callable[..., Batch]
  evaluate: Callable[..., tuple[jax.Array, jax.Array]]
  logits: Callable[[Any, jax.Array], jax.Array]
  params_finite: Callable[[Any], jax.Array]


def make_steps(config, graphdef) -> Steps:
  """Builds the step functions for `config` around the model's static graph definition."""
  tx = make_optimizer(config)
  dtype = jnp.dtype(config.compute_dtype)
  multi = config.num_models > 1

  def logits_fn(params, images):
    return model_lib.apply(graphdef, params, images, dtype)

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
    finite = jnp.isfinite(loss)
    n = jnp.sum(batch['mask'])
    return (params, opt_state, loss * n,
            metrics.correct_sum(logits, batch['label'], batch['mask']), finite)

  if multi:
    model_step = jax.vmap(model_step, in_axes=(0, 0, 0, None))
    lr = jnp.asarray(model_learning_rates(config), jnp.float32)
  else:
    lr = config.learning_rate

  def train_step(state: TrainState, batch: Batch) -> TrainState:
    params, opt_state, loss_sum, correct, finite = model_step(
        state.params, state.opt_state, lr, batch)
    all_finite = jnp.all(finite)
    first_bad = jnp.where((state.first_nonfinite < 0) & ~all_finite, state.step,
                          state.first_nonfinite)
    return state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        loss_sum=state.loss_sum + loss_sum, correct=state.correct + correct,
        count=state.count + jnp.sum(batch['mask']), first_nonfinite=first_bad)

  def train_chunk(state: TrainState, epoch_data: Batch, start, num_steps) -> TrainState:
    """`num_steps` train steps on batches start, start+1, ... of `epoch_data` [S, B, ...].

    `start` and `num_steps` are runtime values, so one compiled program serves every chunk
    length (checkpoint intervals, a resume mid-epoch, the short last chunk of a stream).
    """
    unroll = config.scan_unroll

    def step_at(i, state):
      batch = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, start + i, keepdims=False),
                           epoch_data)
      return train_step(state, batch)

    def block(j, state):  # `unroll` steps per loop iteration: less loop overhead on a CPU.
      for k in range(unroll):
        state = step_at(j * unroll + k, state)
      return state

    blocks = num_steps // unroll
    state = jax.lax.fori_loop(0, blocks, block, state)
    return jax.lax.fori_loop(blocks * unroll, num_steps, step_at, state)

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

  def evaluate(params, test: Batch) -> tuple[jax.Array, jax.Array]:
    """Summed loss and correct count over padded test batches [S, B, ...] (mask skips padding)."""
    def sums(p, batch):
      logits = logits_fn(p, batch['image'])
      return (metrics.cross_entropy_sum(logits, batch['label'], batch['mask']),
              metrics.correct_sum(logits, batch['label'], batch['mask']))
    if multi:
      sums = jax.vmap(sums, in_axes=(0, None))

    def body(carry, batch):
      loss, correct = sums(params, batch)
      return (carry[0] + loss, carry[1] + correct), None
    zero = jnp.zeros((config.num_models,) if multi else (), jnp.float32)
    (loss, correct), _ = jax.lax.scan(body, (zero, zero), test)
    return loss, correct

  def params_finite(params) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))

  return Steps(train_step=train_step, train_chunk=train_chunk, shuffle=shuffle,
               evaluate=evaluate, logits=logits_fn, params_finite=params_finite)
