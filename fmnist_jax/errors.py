"""User-facing errors: one line naming the problem and the fix, a non-zero exit, no traceback."""

import contextlib
import sys


class UserError(Exception):
  """A mistake the user can fix (bad flag, missing data, unusable workdir): the commands print
  `error: <message>` on one line and exit with `exit_code`; other errors keep their tracebacks."""

  exit_code = 2


class DivergenceError(UserError):
  """Training produced a non-finite loss or gradient."""

  exit_code = 3


class Interrupted(BaseException):
  """SIGTERM or SIGINT arrived (run/signals.py). A BaseException, as KeyboardInterrupt is, so that
  no library's `except Exception` takes it for a failure of its own."""

  exit_code = 130


@contextlib.contextmanager
def exit_on_user_error():
  """Turns a UserError (or Interrupted) raised inside the block into one line and SystemExit."""
  try:
    yield
  except (UserError, Interrupted) as e:
    message = ' '.join(str(e).split())  # One line, whatever the message's layout.
    print(f'error: {message}', file=sys.stderr, flush=True)
    raise SystemExit(e.exit_code) from None
