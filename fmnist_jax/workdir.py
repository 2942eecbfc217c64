"""The workdir's files: their names, safe writes, validated reads, and the one-writer lock.

    <workdir>/config.json          the run's config (for predict, explore and people)
    <workdir>/metrics.jsonl        one JSON line per finished epoch
    <workdir>/summary.json         the result of a finished run
    <workdir>/checkpoints/         orbax checkpoints (fmnist_jax/checkpoint.py)
    <workdir>/checkpoints_damaged/ checkpoints that failed to restore, kept for inspection
    <workdir>/figures/             PNG figures written by predict and explore
    <workdir>/tensorboard/         TensorBoard event files
    <workdir>/.lock                held by the training that writes here

Every write goes through a new temporary file created exclusively in the target's folder, is
flushed to disk and renamed over the target, so a crash leaves the old file or the new one, and a
link planted at any name never redirects a write. Workdirs are local or shared (NFS) folders:
cloud URLs such as gs://bucket/run are refused with a one-line error.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
from typing import Any, Iterable

from fmnist_jax.errors import UserError

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
SUMMARY = 'summary.json'
CHECKPOINTS = 'checkpoints'
DAMAGED = 'checkpoints_damaged'
FIGURES = 'figures'
TENSORBOARD = 'tensorboard'
LOCK = '.lock'

# Errors that mean "the storage refuses more data", not "the program is wrong".
STORAGE_ERRNOS = {errno.ENOSPC: 'no space left on', errno.EDQUOT: 'disk quota exceeded on',
                  errno.EROFS: 'read-only filesystem on'}


class WorkdirError(UserError):
  """The workdir cannot be used, or one of its files is damaged."""


def check_local(path: str, option: str = '--workdir') -> None:
  """Refuses cloud URLs: every file here is written through the local filesystem."""
  if '://' in path:
    raise WorkdirError(f'{option} {path}: cloud storage URLs are not supported; use a local or '
                       'shared (NFS, Filestore, gcsfuse-mounted) folder path.')


def check_writable(folder: str, what: str, fix: str, error=None) -> str:
  """Creates `folder` if needed; a file, an uncreatable or an unwritable folder raises `error`
  (a UserError class, default WorkdirError) naming `what` and the `fix`."""
  error = error or WorkdirError
  folder = os.path.abspath(folder)
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise error(f'{what} {folder} is a file, not a folder; {fix}.')
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise error(f'{what} {folder} cannot be created ({e.strerror}); {fix}.') from None
  if not os.access(folder, os.W_OK | os.X_OK):
    raise error(f'{what} {folder} is not writable; {fix}.')
  return folder


def prepare(workdir: str) -> str:
  """The absolute workdir, created and checked writable."""
  check_local(workdir)
  return check_writable(workdir, 'workdir', 'choose another --workdir')


def path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def default_for_config(config_path: str, config, devices: int, processes: int) -> str:
  """The default workdir of a training: workdirs/<config file name>[,<field=value>...][,<N>devices]
  [,<P>processes], naming each field that shapes the result where the final config differs from
  the config file's own values (fmnist_jax/fields.py): equal configs share a folder."""
  from fmnist_jax import config_files, fields  # pylint: disable=g-import-not-at-top
  parts = [os.path.splitext(os.path.basename(config_path))[0]]
  parts += fields.name_parts(config, config_files.load(config_path))
  if devices != 1:
    parts.append(f'{devices}devices')
  if processes != 1:
    parts.append(f'{processes}processes')
  return os.path.join('workdirs', ','.join(parts))


# Writes ------------------------------------------------------------------------------------------


def storage_error(error: BaseException, folder: str) -> UserError | None:
  """A one-line UserError when `error` (or its cause) is a full, over-quota or read-only disk."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    code = error.errno if isinstance(error, OSError) else None
    if code not in STORAGE_ERRNOS:  # orbax / TensorStore report it inside a message.
      text = str(error)
      code = next((c for c in STORAGE_ERRNOS
                   if f"os_error_code='{c}'" in text or os.strerror(c) in text), None)
    if code in STORAGE_ERRNOS:
      return UserError(f'{STORAGE_ERRNOS[code]} the device holding {folder}: free some space '
                       '(or fix the mount) and run the same command again to resume; what was '
                       'saved before is intact.')
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def storage_errors(folder: str):
  """Turns ENOSPC / EDQUOT / EROFS raised inside the block into the one-line UserError."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    user_error = storage_error(e, folder)
    if user_error is None:
      raise
    raise user_error from None


def write_atomic(target: str, data: bytes | str) -> None:
  """Replaces `target` with `data`: exclusive temporary file, fsync, rename (never follows links)."""
  folder = os.path.dirname(os.path.abspath(target))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(target)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)  # Replaces a link planted at `target` itself, not what it points to.
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def write_json(target: str, obj: Any) -> None:
  write_atomic(target, json.dumps(obj, indent=2) + '\n')


def write_json_lines(target: str, objs: Iterable[Any]) -> None:
  write_atomic(target, ''.join(json.dumps(o) + '\n' for o in objs))


def append_json_line(target: str, obj: Any) -> None:
  """Appends one JSON line; refuses to follow a link planted at `target`."""
  try:
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
  except OSError as e:
    if e.errno != errno.ELOOP:
      raise
    raise WorkdirError(f'{target} is a symbolic link; remove it and run the same command again '
                       '(it is rewritten from the checkpoint).') from None
  with os.fdopen(fd, 'a') as f:
    f.write(json.dumps(obj) + '\n')
    f.flush()
    os.fsync(f.fileno())


# Reads -------------------------------------------------------------------------------------------


def _damaged(file: str, detail: str, fix: str) -> WorkdirError:
  return WorkdirError(f'{file} is damaged ({detail}); {fix}.')


def read_json(file: str, fix: str, required: Iterable[str] = ()) -> dict:
  """A JSON object with the `required` keys; WorkdirError naming the file and `fix` if not."""
  try:
    with open(file, encoding='utf-8') as f:
      obj = json.load(f)
  except OSError as e:
    raise WorkdirError(f'{file} cannot be read ({e.strerror}); {fix}.') from None
  except (ValueError, UnicodeDecodeError) as e:
    raise _damaged(file, f'not valid JSON: {e}', fix) from None
  if not isinstance(obj, dict):
    raise _damaged(file, 'not a JSON object', fix)
  missing = [k for k in required if k not in obj]
  if missing:
    raise _damaged(file, f'missing {", ".join(missing)}', fix)
  return obj


def read_metrics(file: str, fix: str) -> list[dict]:
  """The epochs of metrics.jsonl, each validated; [] when the file does not exist."""
  if not os.path.exists(file):
    return []
  history = []
  try:
    with open(file, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise _damaged(file, str(e), fix) from None
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      entry = json.loads(line)
    except ValueError:
      raise _damaged(file, f'line {number} is not valid JSON', fix) from None
    if not (isinstance(entry, dict) and isinstance(entry.get('epoch'), int) and all(
        isinstance(entry.get(k), (int, float)) for k in ('train_loss', 'test_accuracy'))):
      raise _damaged(file, f'line {number} is not an epoch record', fix)
    history.append(entry)
  return history


def figures_folder(workdir: str, figures_dir: str | None) -> str | None:
  """The absolute folder for figures ('' = <workdir>/figures), or None (with a note on stderr)
  when off or not writable: predictions never fail for want of a place to draw."""
  if figures_dir is None:
    return None
  folder = os.path.abspath(figures_dir or path(workdir, FIGURES))
  try:
    return check_writable(folder, 'figures folder', 'pass --figures_dir')
  except UserError as e:
    print(f'note: no figures written: {e}', file=sys.stderr, flush=True)
    return None


# The one-writer lock -----------------------------------------------------------------------------


class Lock:
  """An exclusive lock on <workdir>/.lock for the life of a training.

  `fcntl.flock` is released by the kernel when the holder dies (SIGKILL, crash), so a stale lock
  never blocks the next run. The file records who holds it, for the error message.
  """

  def __init__(self, workdir: str):
    self._path = path(workdir, LOCK)
    self._fd = None

  def acquire(self) -> None:
    try:
      fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
      if e.errno != errno.ELOOP:
        raise
      raise WorkdirError(f'{self._path} is a symbolic link; remove it (the lock file is '
                         'created by the training itself).') from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        os.close(fd)
        raise
      holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'another process'
      os.close(fd)
      raise WorkdirError(f'another training ({holder}) is writing to '
                         f'{os.path.dirname(self._path)}; wait for it to finish, stop it, or use '
                         'another --workdir.') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}\n'.encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Closing releases the flock; the file stays, harmlessly.
      self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
