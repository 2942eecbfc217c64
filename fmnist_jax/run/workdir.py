"""The workdir: the names a run owns (one table), the one checker of what is found at a name, safe
writes, validated reads, and the one-writer lock.

A write goes to a new temporary file in the target's folder, flushed and renamed over the target: a
crash leaves the old file or the new one, and a link planted at a name never redirects a write.
Kinds are checked with lstat before anything is opened, so a fifo or a device never blocks or acts.
"""

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from typing import Any, Iterable

from fmnist_jax.errors import UserError

CONFIG, METRICS, SUMMARY, LOCK = 'config.json', 'metrics.jsonl', 'summary.json', '.lock'
CHECKPOINTS, DAMAGED = 'checkpoints', 'checkpoints_damaged'
FIGURES, TENSORBOARD = 'figures', 'tensorboard'


@dataclasses.dataclass(frozen=True)
class Owned:
  """What one of the workdir's names must be."""
  kind: str  # 'file' or 'folder'.
  role: str  # What the project keeps there (for messages).
  replaced: bool = False  # Only ever replaced by a rename: a link there is replaced, not followed.
  emptied: bool = False  # The training deletes or moves what is inside: no link or special file.


NAMES = {
    CONFIG: Owned('file', 'config', replaced=True),  # The run's config, for predict and people.
    METRICS: Owned('file', 'metrics', replaced=True),  # One JSON line per finished epoch.
    SUMMARY: Owned('file', 'summary', replaced=True),  # The result of a finished run.
    LOCK: Owned('file', 'lock file'),  # Held by the training that writes here.
    CHECKPOINTS: Owned('folder', 'checkpoints', emptied=True),  # orbax's, run/checkpoint.py.
    DAMAGED: Owned('folder', 'damaged checkpoints', emptied=True),  # Kept for inspection.
    FIGURES: Owned('folder', 'figures'),  # PNGs written by predict and explore.
    TENSORBOARD: Owned('folder', 'TensorBoard files', emptied=True),
}
# Temporary files of an interrupted write_atomic at a replaced name (and earlier `<name>.tmp`).
_REPLACED = '|'.join(re.escape(name) for name, owned in NAMES.items() if owned.replaced)
_LEFTOVER = re.compile(rf'\.?({_REPLACED})(\..*)?\.tmp')
_KINDS = {stat.S_IFREG: 'file', stat.S_IFDIR: 'folder', stat.S_IFLNK: 'symbolic link',
          stat.S_IFIFO: 'fifo', stat.S_IFSOCK: 'socket', stat.S_IFCHR: 'character device',
          stat.S_IFBLK: 'block device'}
# Errors that mean "the storage refuses more data", not "the program is wrong".
STORAGE_ERRNOS = {errno.ENOSPC: 'no space left on', errno.EDQUOT: 'disk quota exceeded on',
                  errno.EROFS: 'read-only filesystem on'}


class WorkdirError(UserError):
  """The workdir cannot be used, or one of its files is damaged."""


def path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def kind(mode: int) -> str:
  """'file', 'folder', 'symbolic link', 'fifo', ... for an st_mode."""
  return _KINDS.get(stat.S_IFMT(mode), 'special file')


def check_kind(file: str, expected: str, fix: str, error=None, show_target: bool = False,
               follow: bool = False, label: str | None = None) -> os.stat_result | None:
  """The one checker of what is found at a path, without opening it (nor following a link, unless
  `follow`): its stat, or None when absent.

  Raises:
    error (a UserError class, default WorkdirError): it is not a `expected` ('file' or 'folder'),
      in one line, '<label> is a <kind>, not a <expected>; <fix>.' (`label` defaults to `file`).
  """
  error, label = error or WorkdirError, label or file
  try:
    st = os.stat(file) if follow else os.lstat(file)
  except (FileNotFoundError, NotADirectoryError):  # Nothing there (or a file on the way).
    return None
  except OSError as e:
    raise error(f'{label} cannot be examined ({e.strerror}); {fix}.') from None
  found = kind(st.st_mode)
  if found != expected:
    if show_target and found == 'symbolic link':
      found += f' (to {os.path.normpath(os.path.join(os.path.dirname(file), os.readlink(file)))})'
    raise error(f'{label} is a {found}, not a {expected}; {fix}.')
  return st


def _open_regular(file: str, flags: int, fix: str, error=WorkdirError) -> int:
  """os.open without blocking on a fifo; refuses what is not a regular file once open (a name
  replaced since check_kind looked at it, or a link planted there when `flags` has O_NOFOLLOW)."""
  try:
    fd = os.open(file, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP and flags & os.O_NOFOLLOW:
      raise error(f'{file} is a symbolic link; {fix}.') from None
    raise
  mode = os.fstat(fd).st_mode
  if not stat.S_ISREG(mode):
    os.close(fd)
    raise error(f'{file} is a {kind(mode)}, not a file; {fix}.')
  return fd


def _check_owned(workdir: str, name: str) -> os.stat_result | None:
  """check_kind for a name of the table, with its own fix; a link at a replaced file is fine."""
  owned, file = NAMES[name], path(workdir, name)
  if os.path.islink(file):
    if owned.replaced:  # Replaced by a rename at the next write, never read or written through.
      return os.lstat(file)
    target = os.path.normpath(os.path.join(workdir, os.readlink(file)))
    fix = ('the training writes and deletes only inside its workdir: ' + (
        f'put the folder itself there (rm {file} && mv {target} {file}) or use another --workdir'
        if owned.kind == 'folder' else
        f'remove it (the {owned.role} is created by the training itself)'))
  else:
    fix = (f'this project keeps its {owned.role} there: move it out of the workdir (or use '
           'another --workdir) and run the same command again')
  return check_kind(file, owned.kind, fix, show_target=True)


def _check_inside(folder: str) -> None:
  """Refuses a link or special file anywhere under `folder`, whose content the training deletes,
  moves and reads (a fifo would block it)."""
  try:
    entries = list(os.scandir(folder))
  except OSError as e:
    raise WorkdirError(f'{folder} cannot be read ({e.strerror}); fix its permissions or use '
                       'another --workdir.') from None
  for entry in entries:
    expected = 'folder' if entry.is_dir(follow_symlinks=False) else 'file'
    check_kind(entry.path, expected, f'the training deletes old files under {folder} and never '
               'follows a link out of the workdir: move it out of the workdir (or replace a link '
               'with a copy of what it points to) and run the same command again')
    if expected == 'folder':
      _check_inside(entry.path)


def check_local(workdir: str) -> None:
  """Refuses cloud URLs: every file here is written through the local filesystem."""
  if '://' in workdir:
    raise WorkdirError(f'--workdir {workdir}: cloud storage URLs are not supported; use a local or '
                       'shared (NFS, Filestore, gcsfuse-mounted) folder path.')


def check_writable(folder: str, what: str, fix: str, error=None) -> str:
  """Creates `folder` if needed (a link to a folder is followed: the user's choice); not a folder,
  uncreatable or unwritable raises `error` (default WorkdirError) naming `what` and the `fix`."""
  error = error or WorkdirError
  folder = os.path.abspath(folder)
  check_kind(folder, 'folder', fix, error, follow=True, label=f'{what} {folder}')
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise error(f'{what} {folder} cannot be created ({e.strerror}); {fix}.') from None
  if not os.access(folder, os.W_OK | os.X_OK):
    raise error(f'{what} {folder} is not writable; {fix}.')
  return folder


def prepare(workdir: str, fresh: bool = False) -> str:
  """Checks `workdir` before anything is written (docs/reliability.md, 'A workdir that cannot be
  turned against itself') and returns it absolute, creating it (the only write) when it is new.

  Raises:
    WorkdirError: one line naming the problem and the fix.
  """
  check_local(workdir)
  folder = os.path.abspath(workdir)
  real, home = os.path.realpath(folder), os.path.expanduser('~')
  if real == os.sep:
    raise WorkdirError(f'--workdir {folder} is the filesystem root; give a run a folder of its '
                       'own, e.g. --workdir workdirs/base.')
  if home != '~' and real == os.path.realpath(home):
    raise WorkdirError(f'--workdir {folder} is your home folder; give a run a folder of its own, '
                       f'e.g. --workdir {os.path.join(home, "workdirs", "base")}.')
  check_writable(folder, 'workdir', 'choose another --workdir')  # Creates it when new.
  try:
    names = os.listdir(folder)
  except OSError as e:
    raise WorkdirError(f'workdir {folder} cannot be read ({e.strerror}); choose another '
                       '--workdir.') from None
  found = {name: _check_owned(folder, name) for name in NAMES}
  for name, owned in NAMES.items():
    if owned.emptied and found[name] is not None:
      _check_inside(path(folder, name))
  others = sorted(n for n in names if n not in NAMES and not _LEFTOVER.fullmatch(n))
  if others and found[CONFIG] is None and not fresh:
    shown = ', '.join(others[:3]) + (f' and {len(others) - 3} more' if len(others) > 3 else '')
    raise WorkdirError(f'workdir {folder} holds other files ({shown}) and no run of this project '
                       f'(no {CONFIG}); choose a new or empty --workdir, or add --fresh to train '
                       "there anyway (only this project's own files and folders are touched).")
  return folder


def remove_for_fresh(workdir: str) -> None:
  """Deletes the previous run for --fresh, holding the lock, after prepare(workdir, fresh=True):
  this project's names only (not the held .lock), a link itself, never what it points to.
  summary.json goes first (no longer finished), config.json last (still a run until the end).

  Raises:
    WorkdirError: one line naming what could not be deleted (an immutable or read-only file).
  """
  for name in (SUMMARY, CHECKPOINTS, DAMAGED, TENSORBOARD, FIGURES, METRICS, CONFIG):
    target = path(workdir, name)
    if not os.path.lexists(target):
      continue
    failed = []
    try:
      if stat.S_ISDIR(os.lstat(target).st_mode):  # Not a link; rmtree never follows links inside.
        shutil.rmtree(target, onerror=lambda _, where, info: failed.append((where, info[1])))
      else:
        os.unlink(target)
    except OSError as e:
      failed.append((target, e))
    if failed:
      where, e = failed[0]
      raise storage_error(e, workdir) or WorkdirError(
          f'--fresh could not delete {where} ({getattr(e, "strerror", None) or e}); remove it '
          'yourself (chattr -i if it is immutable) and run the same command again.') from None


def move_aside(workdir: str, source: str, label: str) -> str:
  """Moves `source` (a damaged checkpoint) into checkpoints_damaged/ by one rename, as
  `label`-<unix time>[-n], and returns the new path.

  Raises:
    WorkdirError: one line when it cannot be moved; `source` is then left as it was.
  """
  aside = path(workdir, DAMAGED)
  created = _check_owned(workdir, DAMAGED) is None
  try:
    if created:
      os.mkdir(aside, 0o755)
  except OSError as e:
    raise storage_error(e, workdir) or WorkdirError(
        f'{aside} cannot be created ({e.strerror}); fix the permissions of {workdir} and run the '
        'same command again.') from None
  base = os.path.join(aside, f'{label}-{int(time.time())}')
  target, n = base, 0
  while os.path.lexists(target):  # rename() would silently replace an empty folder there.
    n += 1
    target = f'{base}-{n}'
  try:
    os.rename(source, target)
  except OSError as e:
    if created:  # An empty checkpoints_damaged/ would say that something was set aside.
      with contextlib.suppress(OSError):
        os.rmdir(aside)
    raise storage_error(e, workdir) or WorkdirError(
        f'damaged checkpoint {source} cannot be moved to {aside} ({e.strerror}); it is kept '
        f'where it is: make it movable (chattr -R -i {source}, or fix its permissions) or move '
        'it out of the workdir yourself, and run the same command again.') from None
  return target


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
  """Replaces `target` with `data`: a new temporary file, fsync, rename (never follows links)."""
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
  """Appends one JSON line to the regular file at `target`, never through a link planted there."""
  fix = 'remove it and run the same command again (it is rewritten from the checkpoint)'
  fd = _open_regular(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, fix)
  with os.fdopen(fd, 'a') as f:
    f.write(json.dumps(obj) + '\n')
    f.flush()
    os.fsync(f.fileno())


# Reads -------------------------------------------------------------------------------------------


def _damaged(file: str, detail: str, fix: str) -> WorkdirError:
  return WorkdirError(f'{file} is damaged ({detail}); {fix}.')


def read_regular(file: str, fix: str, error=None, follow: bool = False) -> bytes:
  """The bytes of the regular file at `file` (or where its link leads, with `follow`); a fifo, a
  socket or a device is never opened. `error` (default WorkdirError) names `fix` otherwise."""
  error = error or WorkdirError
  check_kind(file, 'file', fix, error, follow=follow)
  try:  # Absent: the open's own error, 'cannot be read (No such file or directory)'.
    flags = os.O_RDONLY | (0 if follow else os.O_NOFOLLOW)
    with os.fdopen(_open_regular(file, flags, fix, error), 'rb') as f:
      return f.read()
  except OSError as e:
    raise error(f'{file} cannot be read ({e.strerror}); {fix}.') from None


def read_json(file: str, fix: str, required: Iterable[str] = ()) -> dict:
  """A JSON object with the `required` keys; WorkdirError naming the file and `fix` if not."""
  try:
    obj = json.loads(read_regular(file, fix).decode('utf-8'))
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
  if not os.path.lexists(file):
    return []
  history = []
  try:
    lines = read_regular(file, fix).decode('utf-8').splitlines()
  except UnicodeDecodeError as e:
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
    if not figures_dir:  # The workdir's own figures/: never a link out of it, nor a file.
      _check_owned(os.path.abspath(workdir), FIGURES)
    return check_writable(folder, 'figures folder', 'pass --figures_dir')
  except UserError as e:
    print(f'note: no figures written: {e}', file=sys.stderr, flush=True)
    return None


# The one-writer lock -----------------------------------------------------------------------------


def _flock_holders(st: os.stat_result) -> list[int] | None:
  """Pids holding a flock on the file of `st`, from /proc/locks (Linux); None when unknown."""
  try:
    with open('/proc/locks', encoding='ascii', errors='replace') as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  pids = []
  for line in lines:
    fields = line.split()
    # '1: FLOCK  ADVISORY  WRITE 4759 fe:00:2146800 0 EOF'; waiters have '->' after the number.
    if len(fields) < 6 or fields[1] != 'FLOCK':
      continue
    # The inode alone: overlay filesystems report another device in /proc/locks than in stat.
    if fields[5].rsplit(':', 1)[-1] == str(st.st_ino) and fields[4].isdigit():
      pids.append(int(fields[4]))
  return pids or None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True  # Exists, owned by another user.
  return True


def _command(pid: int) -> str:
  try:
    with open(f'/proc/{pid}/comm', encoding='utf-8', errors='replace') as f:
      return f.read().strip()
  except OSError:
    return ''


class Lock:
  """An exclusive flock on <workdir>/.lock for the life of a training, naming its holder only
  when checked against the live one (docs/reliability.md, 'One writer per workdir')."""

  def __init__(self, workdir: str):
    self._workdir = workdir
    self._path = path(workdir, LOCK)
    self._fd = None

  def _error(self, e: OSError, doing: str) -> UserError:
    return storage_error(e, self._workdir) or WorkdirError(
        f'{self._path} cannot be {doing} ({e.strerror}); fix its permissions or use another '
        '--workdir.')

  def _open(self) -> int:
    """The lock file's descriptor: a regular file in the workdir, checked before it is opened."""
    _check_owned(self._workdir, LOCK)
    fix = ('the lock file is created by the training itself: remove it and run the same command '
           'again')
    try:
      return _open_regular(self._path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, fix)
    except OSError as e:
      raise self._error(e, 'created') from None

  def acquire(self) -> None:
    fd = self._open()
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        message = self._busy(fd)
        os.close(fd)
        raise WorkdirError(message) from None
      os.close(fd)
      raise self._error(e, 'locked') from None
    try:  # Only now, holding the lock: the name in the file is the holder's.
      os.ftruncate(fd, 0)
      record = f'pid {os.getpid()} on {socket.gethostname()}\n'.encode()
      if os.pwrite(fd, record, 0) != len(record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      os.fsync(fd)
    except OSError as e:
      os.close(fd)
      raise self._error(e, 'written') from None
    self._fd = fd

  def _busy(self, fd: int) -> str:
    """The refusal, naming the holder's record once checked against the live holder (a new holder
    may be writing it: read a few times)."""
    st = os.fstat(fd)
    for attempt in range(5):
      if attempt:
        time.sleep(0.05)
      text = os.pread(fd, 200, 0).decode(errors='replace').strip()
      match = re.fullmatch(r'pid (\d+) on (\S+)', text)
      holders = _flock_holders(st)
      if match:
        pid, host = int(match.group(1)), match.group(2)
        if host != socket.gethostname():  # Another machine (a shared folder): cannot be checked.
          break
        if (pid in holders) if holders else _alive(pid):
          break
    else:
      who = ''.join(f'pid {p} ({_command(p) or "?"}); ' for p in holders or () if _alive(p))
      return (f'{self._path} is held by a process that did not record its name ({who}not a '
              'training of this project?); wait for it to end or stop it, or use another '
              '--workdir.')
    return (f'another training ({text}) is writing to {self._workdir}; wait for it to finish, '
            'stop it, or use another --workdir.')

  def release(self) -> None:
    if self._fd is not None:
      with contextlib.suppress(OSError):
        os.ftruncate(self._fd, 0)  # No name left behind for a later holder's refusals.
      os.close(self._fd)  # Closing releases the flock; the file stays, harmlessly.
      self._fd = None
