"""The values a run is built from, derived once from its config, immutable: the model's shape, the
optimizer's numbers, and the run plan (steps, epochs, batches, where the host checks the run).

The core (model, steps, programs, inference) takes these, never the config itself.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The model's shape and how it computes."""
  hidden_sizes: tuple[int, ...]
  num_classes: int
  num_models: int  # Trained at once with jax.vmap; model k is initialised with seed + k.
  compute_dtype: str  # bfloat16 computes in bf16 and keeps float32 parameters.

  @classmethod
  def from_config(cls, config) -> 'ModelSpec':
    return cls(tuple(config.hidden_sizes), config.num_classes, config.num_models,
               config.compute_dtype)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """Adam's numbers, with one learning rate per model."""
  learning_rates: tuple[float, ...]
  b1: float
  b2: float
  eps: float

  @classmethod
  def from_config(cls, config) -> 'OptimizerSpec':
    """`learning_rates` when given (one per model), else `learning_rate` for every model."""
    rates = tuple(config.learning_rates) or (config.learning_rate,) * config.num_models
    return cls(rates, config.b1, config.b2, config.eps)


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """Steps, epochs and check points of one run.

  A check point is where the host checks the run (divergence, signals, progress, checkpoints):
  at an epoch end, every `check_every_steps` steps into an epoch, and every
  `checkpoint_every_steps` global steps. Between two the steps run in compiled chunks alone.
  """
  num_train: int
  num_test: int
  input_mode: str  # Where the data lives: 'device', or streamed from the host ('stream', 'tfds').
  batch_size: int
  eval_batch_size: int  # At most the test split, rounded up to a multiple of the device count.
  num_epochs: int
  check_every_steps: int  # 0 = once per epoch.
  checkpoint_every_steps: int  # 0 = only at epoch ends.
  stream_batches: int  # stream/tfds modes: batches per host chunk (as configured).
  profile_window: tuple[int, int] | None = None  # Global steps [start, end) traced.

  @classmethod
  def create(cls, config, num_train: int, num_test: int, device_count: int) -> 'RunPlan':
    return cls(num_train=num_train, num_test=num_test, input_mode=config.input_mode,
               batch_size=config.batch_size,
               eval_batch_size=-(-min(config.eval_batch_size, num_test) // device_count)
               * device_count,
               num_epochs=config.num_epochs, check_every_steps=config.check_every_steps,
               checkpoint_every_steps=config.checkpoint_every_steps,
               stream_batches=config.stream_chunk_steps)

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.num_train // self.batch_size)  # The last batch is padded, never dropped.

  @property
  def stream_chunk_steps(self) -> int:
    """Batches per host chunk: never more than an epoch."""
    return min(self.stream_batches, self.steps_per_epoch)

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.num_epochs

  @property
  def num_test_batches(self) -> int:
    return -(-self.num_test // self.eval_batch_size)

  def with_profile_window(self, first_step: int, profile_steps: int) -> 'RunPlan':
    """The plan with `profile_steps` steady-state steps traced: the window starts that many steps
    after this run's first step (the programs warm, the first chunk done) and ends at the last
    step at the latest. Its edges are check points, which change no number."""
    if not profile_steps:
      return self
    start = min(first_step + profile_steps, self.total_steps - 1)
    return dataclasses.replace(self, profile_window=(start, min(start + profile_steps,
                                                                self.total_steps)))

  def epoch_of(self, step: int) -> int:
    """The 0-based epoch that global step `step` (the next one to run) belongs to."""
    return step // self.steps_per_epoch

  def next_check(self, step: int) -> int:
    """The first check point after `step`."""
    spe = self.steps_per_epoch
    epoch_start = step // spe * spe
    checks = [epoch_start + spe]
    if self.check_every_steps:
      every = self.check_every_steps
      checks.append(epoch_start + ((step - epoch_start) // every + 1) * every)
    if self.checkpoint_every_steps:
      every = self.checkpoint_every_steps
      checks.append((step // every + 1) * every)
    checks += [s for s in self.profile_window or () if s > step]
    return min(checks)

  def checkpoint_due(self, step: int) -> bool:
    """Whether a checkpoint is saved after `step` steps (epoch ends are saved separately)."""
    return bool(self.checkpoint_every_steps) and step % self.checkpoint_every_steps == 0

  def position(self, step: int) -> str:
    """'epoch E, step S of N' for `step` completed steps."""
    spe = self.steps_per_epoch
    return f'epoch {step // spe + 1}, step {step % spe} of {spe}'
