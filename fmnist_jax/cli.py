"""What every command shares: flag errors as one line, frameworks kept quiet, a prompt exit.

`run(main)` parses the flags (a mistake is one `error:` line, exit 2) and, unless --verbosity asks
for INFO or more, keeps what the frameworks print to themselves (`quiet_frameworks`): their Python
log records, and the lines native code writes to the terminal (XLA, libtpu, TensorFlow, Gloo,
tfds's banners). A command's own lines and real failures pass through.
"""

import atexit
import logging as pylogging
import os
import re
import select
import sys
import threading
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections

from fmnist_jax.errors import UserError, exit_on_user_error
from fmnist_jax.run import signals

# Lines the frameworks print for themselves: C++ log lines ('W1206 05:12:33.1 123 file.cc:45] ';
# severity F, a crash, passes), absl's note before its logging starts, Gloo's "[Gloo] Rank N is
# connected to M peer ranks" (two such lines may interleave), and tfds's preparation banners.
NOISE = re.compile(rb'^[IWE]\d{4} [^\]]*\] |^WARNING: All log messages before absl::Initialize'
                   rb'|\[Gloo\]|connected peer ranks|^Downloading and preparing dataset '
                   rb'|^Dataset \S+ downloaded and prepared to ')


def _describe(error: Exception) -> str:
  """Rewrites flag and config-file errors (often multi-line) as one actionable sentence."""
  text = ' '.join(str(error).split())
  if isinstance(error, flags.Error) and 'Traceback (most recent call last)' in str(error):
    flag, _, _ = str(error).partition(':')  # 'flag --config=FILE'; the file's own error is last.
    return (f'{flag}: {str(error).strip().splitlines()[-1].strip().rstrip(".")}; fix the config '
            'file (start from configs/base.py).')
  if isinstance(error, flags.Error):
    return f'{text}. See --helpfull for the flags.'
  if isinstance(error, AttributeError) and 'get_config' in text:
    return 'the --config file has no get_config() function; start from configs/base.py.'
  if isinstance(error, AttributeError):  # ml_collections: unknown override key.
    match = re.search(r"[A-Za-z_][A-Za-z0-9_.]*", text)
    key = match.group(0) if match else text
    hint = text[text.find('Did you mean'):].rstrip("'\"") if 'Did you mean' in text else (
        'see configs/base.py for the fields.')
    return f'unknown config field {key!r} in a --config.* override; {hint}'
  if isinstance(error, OSError) and 'No such file' in text:
    return (f'config file not found ({text.split("Attempted")[-1].strip()}); pass an existing '
            'file, e.g. --config configs/base.py.')
  return f'could not load the --config file: {text}'


def parse_flags(argv: Sequence[str], config_flags_to_load: Sequence[str] = ()) -> list[str]:
  """Parses flags, then quiets the frameworks unless --verbosity asks for their messages; turns
  every flag or config error into a UserError."""
  try:
    rest = flags.FLAGS(argv)
    for name in config_flags_to_load:
      value = flags.FLAGS[name].value
      if value is None:
        raise UserError(f'--{name} is required, e.g. --{name} configs/base.py.')
      if not isinstance(value, ml_collections.ConfigDict):
        hasattr(value, 'to_dict')  # A file that failed to load raises its error on first use.
        raise UserError(f'the --{name} file\'s get_config() returned {type(value).__name__}, not '
                        'an ml_collections.ConfigDict; start from configs/base.py.')
  except UserError:
    raise
  except (flags.Error, AttributeError, OSError, ImportError, SyntaxError, ValueError,
          TypeError, KeyError) as e:
    raise UserError(_describe(e)) from None
  if logging.get_verbosity() < logging.INFO:
    quiet_frameworks()
  return rest


class _QuietLogs(pylogging.Filter):
  """Drops orbax's log records and tfds's below ERROR: what fails reaches the command as an
  exception (a full disk, say), told once, in one line."""

  def filter(self, record):
    if f'{os.sep}orbax{os.sep}' in record.pathname:
      return False
    return not (f'{os.sep}tensorflow_datasets{os.sep}' in record.pathname
                and record.levelno < pylogging.ERROR)


class _LineFilter:
  """Passes what is written to file descriptor `fd` on to where it went before, less the lines
  matching NOISE. A thread copies; an unfinished line is held at most `hold` seconds (a progress
  bar rewritten with '\\r' still moves)."""

  def __init__(self, fd: int, hold: float = 0.05):
    self._fd, self._hold = fd, hold
    self._target = os.dup(fd)
    self._source, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    self._thread = threading.Thread(target=self._copy, daemon=True)
    self._thread.start()

  def _copy(self) -> None:
    pending = b''
    while True:
      ready, _, _ = select.select([self._source], [], [], self._hold)
      if not ready:
        if not NOISE.search(pending):
          self._write(pending)  # A line left unfinished (a progress bar): pass on what there is.
        pending = b''
        continue
      data = os.read(self._source, 65536)
      if not data:  # Closed: the process is exiting.
        self._write(pending)
        return
      *lines, pending = (pending + data).split(b'\n')
      self._write(b''.join(line + b'\n' for line in lines if not NOISE.search(line)))

  def _write(self, data: bytes) -> None:
    while data:
      data = data[os.write(self._target, data):]

  def close(self) -> None:
    """Gives `fd` back its destination once what was written before has been passed on."""
    os.dup2(self._target, self._fd)  # Closes the pipe's last write end: the copier sees its end.
    self._thread.join(timeout=5)


_filters: list[_LineFilter] = []
_terminal = {}  # fd -> whether it was a terminal before a filter took it.


def quiet_frameworks() -> None:
  """Keeps the frameworks' own messages off the terminal for the rest of the process."""
  if _filters:
    return
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file operation at INFO.
  logging.get_absl_handler().addFilter(_QuietLogs())
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  for fd in (1, 2):
    _terminal[fd] = os.isatty(fd)
    _filters.append(_LineFilter(fd))
  atexit.register(_close_filters)


def _close_filters() -> None:
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  while _filters:
    _filters.pop().close()


def stdout_is_terminal() -> bool:
  """Whether standard output is a terminal (as it was before quiet_frameworks took it)."""
  return _terminal[1] if 1 in _terminal else sys.stdout.isatty()


def run(main: Callable[[list[str]], None], config_flags_to_load: Sequence[str] = ()) -> None:
  """absl's app.run with one-line errors (UserError) instead of tracebacks, quiet frameworks,
  and a prompt exit."""
  logging.set_verbosity(logging.WARNING)
  try:
    with exit_on_user_error():
      signals.arm()  # A signal since the command started stops it here, in one line.
      app.run(main, argv=sys.argv,
              flags_parser=lambda argv: parse_flags(argv, config_flags_to_load))
  except SystemExit as e:
    exit_promptly(0 if e.code is None else e.code if isinstance(e.code, int) else 1)
    raise


def exit_promptly(code: int) -> None:
  """Ends a single-process program now: the teardown of JAX's, TensorFlow's and orbax's threads
  takes most of a second for nothing, and prints orbax's tracebacks after a failed save."""
  jax = sys.modules.get('jax')
  if jax is not None and jax.distributed.is_initialized():
    return  # jax.distributed's own shutdown must run: it syncs with the other processes.
  _close_filters()
  os._exit(code)  # pylint: disable=protected-access
