"""Stop signals: SIGTERM / SIGINT set a flag; the processes agree at the next stop to end there."""

import contextlib
import signal

from fmnist_jax import distributed


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
