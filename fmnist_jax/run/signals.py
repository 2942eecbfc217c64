"""Stop signals: SIGTERM / SIGINT set a flag; the processes agree at the next stop to end there."""

import contextlib
import signal

from fmnist_jax import distributed
from fmnist_jax.errors import Interrupted


class StopSignals:
  """Catches SIGTERM and SIGINT while installed; a second signal acts at once, as usual."""

  def __init__(self):
    self.received = None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = signal.Signals(signum).name
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

  def agreed(self) -> bool:
    """Whether any process received a signal: the same answer on all of them (a collective)."""
    return distributed.any_process(self.received is not None)

  @contextlib.contextmanager
  def installed(self):
    try:
      old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # Not the main thread (e.g. a notebook worker): no handlers.
      yield self
      return
    try:
      yield self
    finally:
      for s, handler in old.items():
        signal.signal(s, handler)

  def error(self, step: int, steps_per_epoch: int, checkpoints: str) -> Interrupted:
    """The error that ends a run stopped by a signal, after its checkpoint at `step`."""
    return Interrupted(f'{self.received or "a stop signal on another process"} received: stopped '
                       f'at step {step} (epoch {(step - 1) // steps_per_epoch + 1}) and saved a '
                       f'checkpoint in {checkpoints}; run the same command again to resume.')
