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
import signal
import sys
import time
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections

from fmnist_jax.errors import UserError, exit_on_user_error
from fmnist_jax.run import signals

# Lines the frameworks print for themselves: C++ log lines ('W1206 05:12:33.1 123 file.cc:45] ';
# severity F, a crash, passes), absl's note before its logging starts, libtpu's warning that this
# machine has no TPU (written before its log settings apply, with a source trace), Gloo's "[Gloo]
# Rank N is connected to M peer ranks" (two such lines may interleave), and tfds's banners.
NOISE = re.compile(rb'^[IWE]\d{4} [^\]]*\] |^WARNING: All log messages before absl::Initialize'
                   rb'|^WARNING: Logging before InitGoogle|^Failed to find host bounds for accel'
                   rb'|^=== Source Location Trace: ===|^learning/\S+\.cc:\d+$'
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


def _copy(sources: dict[int, int], hold: float = 0.05) -> None:
  """Copies each source pipe to its target file descriptor, less the lines matching NOISE, until
  every pipe is closed. An unfinished line is passed on after `hold` seconds (a progress bar
  rewritten with '\\r' still moves)."""
  pending = dict.fromkeys(sources, b'')
  while sources:
    ready, _, _ = select.select(list(sources), [], [], hold)
    for source in ready or list(sources):
      if not ready:  # Quiet for a while: what is there is a line left unfinished.
        data, pending[source] = pending[source], b''
        _write(sources[source], b'' if NOISE.search(data) else data)
        continue
      data = os.read(source, 65536)
      if not data:  # Every writer is gone: the command has ended.
        _write(sources.pop(source), b'' if NOISE.search(pending[source]) else pending[source])
        continue
      *lines, pending[source] = (pending[source] + data).split(b'\n')
      _write(sources[source], b''.join(l + b'\n' for l in lines if not NOISE.search(l)))


def _write(fd: int, data: bytes) -> None:
  try:
    while data:
      data = data[os.write(fd, data):]
  except OSError:
    pass  # The reader is gone (`| head`): the rest is dropped, and the command never waits.


_copier = []  # The copier's pid.
_terminal = {}  # fd -> whether it was a terminal before the copier took it.


def quiet_frameworks() -> None:
  """Keeps the frameworks' own messages off the terminal for the rest of the process. Standard
  output and error go through a copier, a process of its own, so that what a crash writes last
  (a fatal line, a fault's stack) still gets out."""
  if _copier:
    return
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file operation at INFO.
  logging.get_absl_handler().addFilter(_QuietLogs())
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  targets = {fd: os.dup(fd) for fd in (1, 2)}
  pipes = {fd: os.pipe() for fd in (1, 2)}
  pid = os.fork()
  if pid == 0:  # The copier: a Ctrl-C reaches it too, yet it reads until the command is gone.
    for s in (signal.SIGINT, signal.SIGTERM):
      signal.signal(s, signal.SIG_IGN)
    try:
      for _, write_end in pipes.values():
        os.close(write_end)
      _copy({read_end: targets[fd] for fd, (read_end, _) in pipes.items()})
    finally:
      os._exit(0)  # pylint: disable=protected-access
  for fd, (read_end, write_end) in pipes.items():
    _terminal[fd] = os.isatty(fd)
    os.dup2(write_end, fd)
    os.close(write_end)
    os.close(read_end)
  for target in targets.values():
    os.close(target)
  _copier.append(pid)
  atexit.register(_close_filters)


def _close_filters() -> None:
  """Lets the copier pass on the last lines before the command exits (waiting at most a few
  seconds: a child process of the command may still hold the pipes)."""
  if not _copier:
    return
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  null = os.open(os.devnull, os.O_WRONLY)
  for fd in (1, 2):
    os.dup2(null, fd)  # Closes the pipes' write ends: the copier sees their end.
  os.close(null)
  pid = _copier.pop()
  for _ in range(1000):
    if os.waitpid(pid, os.WNOHANG)[0]:
      return
    time.sleep(0.005)


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
    signals.settle()  # Ending: a signal now must not turn the exit into a traceback.
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
