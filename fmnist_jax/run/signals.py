"""Ctrl-C (SIGINT) and SIGTERM, honoured from a command's first instruction to its exit.

`install()` runs first in every command, `arm()` once its error handling is in place. Until
training starts a signal stops the command at once (when control returns from native code: a
compile, a read), with one line and exit 130, since nothing is yet to be saved. While the training
loop runs (`deferred()`), a signal only sets a flag; the processes agree at the next check point
(plan.py) to end there, after saving a checkpoint. A second signal acts at once, as usual.
"""

import contextlib
import signal
import sys
import threading

from fmnist_jax.errors import Interrupted

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {'received': None, 'deferred': False, 'installed': False, 'armed': False, 'before': {}}


def _handle(signum, frame):  # pylint: disable=unused-argument
  if _state['received'] is not None:  # The second one: what it does by default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.raise_signal(signum)
    return
  _state['received'] = signal.Signals(signum).name
  if _state['armed'] and not _state['deferred']:
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


def take_back() -> None:
  """Puts the handlers back after a library installed its own at the C level (jax.distributed's
  preemption notifier takes SIGTERM), which Python's signal module neither sees nor undoes."""
  if _state['installed']:
    for s in _SIGNALS:
      signal.signal(s, _handle)


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
  return Interrupted(f'{received()} received: stopped before anything was saved; run the same '
                     'command again to start over.')


def check() -> None:
  """Raises the stop if a signal came (a safe point outside the training loop)."""
  if received():
    raise stopped()


@contextlib.contextmanager
def deferred():
  """Signals only set the flag inside (the training loop, which acts on them at its stops);
  installs the handlers if the command did not (a notebook or a test calling the loop)."""
  owner = not _state['installed']
  if owner:
    install()
  check()
  _state['deferred'] = True
  try:
    yield
  finally:
    _state['deferred'] = False
    if owner and _state['installed']:  # Leave the caller's process as it was.
      for s, handler in _state['before'].items():
        signal.signal(s, handler)
      _state.update(installed=False, received=None)


def error(step: int, steps_per_epoch: int, checkpoints: str) -> Interrupted:
  """The error that ends a run stopped by a signal, after its checkpoint at `step`."""
  return Interrupted(f'{received() or "a stop signal on another process"} received: stopped at '
                     f'step {step} (epoch {(step - 1) // steps_per_epoch + 1}) and saved a '
                     f'checkpoint in {checkpoints}; run the same command again to resume.')
