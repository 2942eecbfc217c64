"""The run plan: every count a run derives from its config and data, computed once, immutable."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """Steps, epochs and stops of one run.

  A stop is where the host checks the run (divergence, signals, progress, checkpoints): at an
  epoch end, every `check_every_steps` steps into an epoch, and every `checkpoint_every_steps`
  global steps. Between two stops the steps run in compiled chunks without the host.
  """
  num_train: int
  num_test: int
  batch_size: int
  eval_batch_size: int  # Rounded up to a multiple of the device count.
  num_epochs: int
  check_every_steps: int  # 0 = once per epoch.
  checkpoint_every_steps: int  # 0 = only at epoch ends.
  stream_batches: int  # stream/tfds modes: batches per host chunk (as configured).
  profile_window: tuple[int, int] | None = None  # Global steps [start, end) traced.

  @classmethod
  def create(cls, config, num_train: int, num_test: int, device_count: int) -> 'RunPlan':
    return cls(num_train=num_train, num_test=num_test, batch_size=config.batch_size,
               eval_batch_size=-(-config.eval_batch_size // device_count) * device_count,
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
  def test_batches(self) -> int:
    return -(-self.num_test // self.eval_batch_size)

  def with_profile_window(self, first_step: int, profile_steps: int) -> 'RunPlan':
    """The plan with `profile_steps` steady-state steps traced: the window starts that many steps
    after this run's first step (the programs warm, the first chunk done) and ends at the last
    step at the latest. Its edges are stops, which change no number."""
    if not profile_steps:
      return self
    start = min(first_step + profile_steps, self.total_steps - 1)
    return dataclasses.replace(self, profile_window=(start, min(start + profile_steps,
                                                                self.total_steps)))

  def epoch_of(self, step: int) -> int:
    """The 0-based epoch that global step `step` (the next one to run) belongs to."""
    return step // self.steps_per_epoch

  def next_stop(self, step: int) -> int:
    """The first stop after `step`."""
    spe = self.steps_per_epoch
    epoch_start = step // spe * spe
    stops = [epoch_start + spe]
    if self.check_every_steps:
      every = self.check_every_steps
      stops.append(epoch_start + ((step - epoch_start) // every + 1) * every)
    if self.checkpoint_every_steps:
      every = self.checkpoint_every_steps
      stops.append((step // every + 1) * every)
    stops += [s for s in self.profile_window or () if s > step]
    return min(stops)

  def checkpoint_due(self, step: int) -> bool:
    """Whether a checkpoint is saved after `step` steps (epoch ends are saved separately)."""
    return bool(self.checkpoint_every_steps) and step % self.checkpoint_every_steps == 0

  def position(self, step: int) -> str:
    """'epoch E, step S of N' for `step` completed steps."""
    spe = self.steps_per_epoch
    return f'epoch {step // spe + 1}, step {step % spe} of {spe}'
