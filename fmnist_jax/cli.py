"""Shared command-line plumbing: absl flag parsing whose mistakes become one-line errors."""

import contextlib
import logging as pylogging
import os
import re
import sys
import tempfile
from typing import Callable, Sequence

from absl import app
from absl import logging
from absl import flags

from fmnist_jax.errors import UserError, exit_on_user_error


def _describe(error: Exception, argv: Sequence[str]) -> str:
  """Rewrites flag and config-file errors (often multi-line) as one actionable sentence."""
  text = ' '.join(str(error).split())
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
  """Parses flags; turns every flag or config error into a UserError."""
  try:
    rest = flags.FLAGS(argv)
    for name in config_flags_to_load:
      value = flags.FLAGS[name].value
      if value is None:
        raise UserError(f'--{name} is required, e.g. --{name} configs/base.py.')
      value.to_dict()  # A config file that failed to load raises only when first used.
    return rest
  except UserError:
    raise
  except (flags.Error, AttributeError, OSError, ImportError, SyntaxError, ValueError,
          TypeError, KeyError) as e:
    raise UserError(_describe(e, argv)) from None


def verbose() -> bool:
  """Whether absl's --verbosity asks for INFO or more: then libraries' own messages are shown."""
  return logging.get_verbosity() >= logging.INFO


class _QuietFrameworks(pylogging.Filter):
  """Unless --verbosity asks for INFO or more, drops tfds's warnings about its own internals (e.g.
  "Variant folder ... has no dataset_info.json" while preparing) and orbax's log lines: an orbax
  failure also reaches the caller as an exception (a full disk, say), told once, in one line."""

  def filter(self, record):
    if verbose():
      return True
    if f'{os.sep}orbax{os.sep}' in record.pathname:
      return False
    return not (f'{os.sep}tensorflow_datasets{os.sep}' in record.pathname
                and record.levelno < pylogging.ERROR)


def run(main: Callable[[list[str]], None], config_flags_to_load: Sequence[str] = ()) -> None:
  """absl's app.run with one-line errors (UserError) instead of tracebacks, quiet frameworks,
  and a prompt exit."""
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file operation at INFO.
  logging.get_absl_handler().addFilter(_QuietFrameworks())
  try:
    with exit_on_user_error():
      app.run(main, argv=sys.argv,
              flags_parser=lambda argv: parse_flags(argv, config_flags_to_load))
  except SystemExit as e:
    exit_promptly(0 if e.code is None else e.code if isinstance(e.code, int) else 1)
    raise


def exit_promptly(code: int) -> None:
  """Ends a single-process program now: the interpreter's teardown of JAX, TensorFlow and orbax
  thread pools takes most of a second, has nothing left to do, and after a failed save (a full
  disk) prints tracebacks from orbax's threads under the one-line error."""
  jax = sys.modules.get('jax')
  if jax is not None and jax.distributed.is_initialized():
    return  # jax.distributed's own shutdown must run: it syncs with the other processes.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


@contextlib.contextmanager
def held_stderr(show_on_failure: bool = True):
  """Sends file descriptor 2 (where C++ libraries such as libtpu print, before any log setting of
  theirs applies) to a temporary file for the block; the bytearray yielded then holds what was
  written there. If the block fails, it is shown at once (unless `show_on_failure` is False: the
  caller's one-line error says it all)."""
  held = bytearray()
  sys.stderr.flush()
  saved = os.dup(2)
  file = tempfile.TemporaryFile()
  os.dup2(file.fileno(), 2)
  failed = True
  try:
    yield held
    failed = False
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    file.seek(0)
    held.extend(file.read())
    file.close()
    if failed and show_on_failure:
      os.write(2, held)
