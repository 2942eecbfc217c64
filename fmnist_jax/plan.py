"""The run plan: every count a run derives from its config and data, computed once, immutable."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """Steps, epochs and stops of one run.

  A chunk is the unit of work between two host-side checks (divergence, signals, progress): it ends
  at an epoch end, every `chunk_steps` steps into an epoch, and every `checkpoint_every_steps`
  global steps, whichever comes first.
  """
  num_train: int
  num_test: int
  batch_size: int
  eval_batch_size: int  # Rounded up to a multiple of the device count.
  num_epochs: int
  chunk_steps: int  # 0 = a whole epoch.
  checkpoint_every_steps: int  # 0 = only at epoch ends.

  @classmethod
  def create(cls, config, num_train: int, num_test: int, device_count: int) -> 'RunPlan':
    return cls(num_train=num_train, num_test=num_test, batch_size=config.batch_size,
               eval_batch_size=-(-config.eval_batch_size // device_count) * device_count,
               num_epochs=config.num_epochs, chunk_steps=config.chunk_steps,
               checkpoint_every_steps=config.checkpoint_every_steps)

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.num_train // self.batch_size)  # The last batch is padded, never dropped.

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.num_epochs

  @property
  def test_batches(self) -> int:
    return -(-self.num_test // self.eval_batch_size)

  def epoch_of(self, step: int) -> int:
    """The 0-based epoch that global step `step` (the next one to run) belongs to."""
    return step // self.steps_per_epoch

  def next_stop(self, step: int) -> int:
    """The step at which the chunk starting at `step` ends."""
    spe = self.steps_per_epoch
    epoch_start = step // spe * spe
    stops = [epoch_start + spe]
    if self.chunk_steps:
      stops.append(epoch_start + ((step - epoch_start) // self.chunk_steps + 1) * self.chunk_steps)
    if self.checkpoint_every_steps:
      every = self.checkpoint_every_steps
      stops.append((step // every + 1) * every)
    return min(stops)

  def checkpoint_due(self, step: int) -> bool:
    """Whether a checkpoint is saved after `step` steps (epoch ends are saved separately)."""
    return bool(self.checkpoint_every_steps) and step % self.checkpoint_every_steps == 0

  def position(self, step: int) -> str:
    """'epoch E, step S of N' for `step` completed steps."""
    spe = self.steps_per_epoch
    return f'epoch {step // spe + 1}, step {step % spe} of {spe}'
