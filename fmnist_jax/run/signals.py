"""Ctrl-C (SIGINT) and SIGTERM, honoured from a command's first instruction to its exit.

`install()` runs first in every command, `arm()` once its error handling is in place. Before the
run's checkpoints are opened a signal stops the command at once (as soon as native code returns),
with one line and exit 130: nothing is saved yet. From there (`deferred()`) it only sets a flag,
acted on before training (nothing written) or at the training's next check point (a checkpoint
saved); processes of a multi-process run (`collective()`) always decide together. A second signal
acts at once, as usual.
"""

import contextlib
import signal
import sys
import threading

from fmnist_jax.errors import Interrupted

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {'received': None, 'deferred': False, 'installed': False, 'armed': False,
          'collective': False, 'before': {}}


def _handle(signum, frame):  # pylint: disable=unused-argument
  if _state['received'] is not None:  # The second one: what it does by default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.raise_signal(signum)
    return
  _state['received'] = signal.Signals(signum).name
  if _state['armed'] and not (_state['deferred'] or _state['collective']):
    raise stopped()


def _ignore_our_unraisable(unraisable, previous=sys.unraisablehook) -> None:
  """A stop raised where Python cannot pass it on (a __del__) is not reported: its flag stays set,
  and the next check stops the command."""
  if not isinstance(unraisable.exc_value, Interrupted):
    previous(unraisable)


def install() -> None:
  """Catches SIGINT and SIGTERM for the rest of the process (main thread only: a notebook kernel's
  worker thread keeps its own handling)."""
  if _state['installed'] or threading.current_thread() is not threading.main_thread():
    return
  _state['before'] = {s: signal.signal(s, _handle) for s in _SIGNALS}
  sys.unraisablehook = _ignore_our_unraisable
  _state['installed'] = True


def collective() -> None:
  """For a multi-process run, after jax.distributed.initialize: a signal only sets the flag, and
  the processes decide together (distributed.any_process), never one alone. The handlers are put
  back: jax.distributed's preemption notifier takes SIGTERM at the C level, which Python's signal
  module neither sees nor undoes."""
  _state['collective'] = True
  if _state['installed']:
    for s in _SIGNALS:
      signal.signal(s, _handle)


def settle() -> None:
  """The command is ending (its work done or its error told): a signal only sets the flag."""
  _state['deferred'] = True


def arm() -> None:
  """From here (the command's error handling is in place) a signal outside the training loop
  stops the command at once; before, it is acted on by the first check()."""
  _state['armed'] = True
  check()


def received() -> str | None:
  """The name of the first stop signal received, or None."""
  return _state['received']


def stopped() -> Interrupted:
  """The error of a command stopped before it saved anything."""
  return Interrupted(f'{received() or "a stop signal on another process"} received: stopped '
                     'before anything was saved; run the same command again to start over.')


def check() -> None:
  """Raises the stop if a signal came, at a safe point before training (one process alone; the
  processes of a multi-process run decide together, in the loop)."""
  if received() and not _state['collective']:
    raise stopped()


@contextlib.contextmanager
def deferred():
  """From here on a signal only sets the flag (a command stays so to its end); installs the
  handlers for the block if the command did not (a notebook or a test calling the loop)."""
  owner = not _state['installed']
  if owner:
    install()
  check()
  _state['deferred'] = True
  try:
    yield
  finally:
    if owner and _state['installed']:  # Leave the caller's process as it was.
      for s, handler in _state['before'].items():
        signal.signal(s, handler)
      _state.update(installed=False, received=None, deferred=False)


def error(step: int, steps_per_epoch: int, checkpoints: str) -> Interrupted:
  """The error that ends a run stopped by a signal, after its checkpoint at `step`."""
  return Interrupted(f'{received() or "a stop signal on another process"} received: stopped at '
                     f'step {step} (epoch {(step - 1) // steps_per_epoch + 1}) and saved a '
                     f'checkpoint in {checkpoints}; run the same command again to resume.')
