"""The workdir's files: their names, safe writes, validated reads, and the one-writer lock.

    <workdir>/config.json          the run's config (for predict, explore and people)
    <workdir>/metrics.jsonl        one JSON line per finished epoch
    <workdir>/summary.json         the result of a finished run
    <workdir>/checkpoints/         orbax checkpoints (checkpoint.py)
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
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
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


def path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


# The workdir's own names and what each must be -------------------------------------------------

FILES = (CONFIG, METRICS, SUMMARY, LOCK)
FOLDERS = (CHECKPOINTS, DAMAGED, FIGURES, TENSORBOARD)
_ROLES = {CONFIG: 'config', METRICS: 'metrics', SUMMARY: 'summary', LOCK: 'lock file',
          CHECKPOINTS: 'checkpoints', DAMAGED: 'damaged checkpoints', FIGURES: 'figures',
          TENSORBOARD: 'TensorBoard files'}
# Folders whose content the training (or orbax) deletes or moves: no link or special file inside.
_DELETED_IN = (CHECKPOINTS, DAMAGED, TENSORBOARD)
# Files always replaced by a rename, so a link planted there is replaced, never written through.
_REPLACED = (CONFIG, METRICS, SUMMARY)
# Temporary files of an interrupted write_atomic (and of earlier versions: `<name>.tmp`).
_LEFTOVER = re.compile(r'\.?(config\.json|metrics\.jsonl|summary\.json)(\..*)?\.tmp')


def kind(mode: int) -> str:
  """'file', 'folder', 'symbolic link', 'fifo', ... for an st_mode."""
  for test, name in ((stat.S_ISREG, 'file'), (stat.S_ISDIR, 'folder'),
                     (stat.S_ISLNK, 'symbolic link'), (stat.S_ISFIFO, 'fifo'),
                     (stat.S_ISSOCK, 'socket'), (stat.S_ISCHR, 'character device'),
                     (stat.S_ISBLK, 'block device')):
    if test(mode):
      return name
  return 'special file'


def _lstat(file: str) -> os.stat_result | None:
  """os.lstat, None when absent; other failures are one line."""
  try:
    return os.lstat(file)
  except FileNotFoundError:
    return None
  except OSError as e:
    raise WorkdirError(f'{file} cannot be examined ({e.strerror}); fix its permissions or use '
                       'another --workdir.') from None


def _wrong_kind(file: str, found: str, expected: str, role: str) -> WorkdirError:
  return WorkdirError(f'{file} is a {found}, not a {expected}; this project keeps its {role} '
                      'there: move it out of the workdir (or use another --workdir) and run the '
                      'same command again.')


def _check_name(workdir: str, name: str) -> os.stat_result | None:
  """The lstat of a project name; refuses a link (but at a replaced file) or the wrong kind."""
  file = path(workdir, name)
  st = _lstat(file)
  if st is None:
    return None
  expected = 'folder' if name in FOLDERS else 'file'
  if stat.S_ISLNK(st.st_mode):
    if name in _REPLACED:
      return st  # Replaced by a rename at the next write, never read or written through.
    target = os.path.normpath(os.path.join(workdir, os.readlink(file)))
    fix = (f'put the folder itself there (rm {file} && mv {target} {file}) or use another '
           '--workdir' if name in FOLDERS else f'remove it (the {_ROLES[name]} is created by the '
           'training itself)')
    raise WorkdirError(f'{file} is a symbolic link (to {target}); the training writes and '
                       f'deletes only inside its workdir: {fix}.')
  if kind(st.st_mode) != expected:
    raise _wrong_kind(file, kind(st.st_mode), expected, _ROLES[name])
  return st


def _check_inside(folder: str) -> None:
  """Refuses a link or special file anywhere under `folder` (whose content the training deletes
  or moves, and reads: a fifo would block it), without following links."""
  try:
    entries = list(os.scandir(folder))
  except OSError as e:
    raise WorkdirError(f'{folder} cannot be read ({e.strerror}); fix its permissions or use '
                       'another --workdir.') from None
  for entry in entries:
    if entry.is_symlink():
      raise WorkdirError(f'{entry.path} is a symbolic link; the training deletes old files under '
                         f'{folder} and never follows a link out of the workdir: replace it with '
                         'a copy of what it points to (or remove it) and run the same command '
                         'again.')
    if entry.is_dir(follow_symlinks=False):
      _check_inside(entry.path)
    elif not entry.is_file(follow_symlinks=False):
      found = kind(entry.stat(follow_symlinks=False).st_mode)
      raise WorkdirError(f'{entry.path} is a {found}, not a file of this project; move it out '
                         'of the workdir and run the same command again.')


def _refuse_shared_folders(folder: str) -> None:
  """The filesystem root and the home folder are never a run's folder, even with --fresh."""
  real = os.path.realpath(folder)
  if real == os.sep:
    raise WorkdirError(f'--workdir {folder} is the filesystem root; give a run a folder of its '
                       'own, e.g. --workdir workdirs/base.')
  home = os.path.expanduser('~')
  if home != '~' and real == os.path.realpath(home):
    raise WorkdirError(f'--workdir {folder} is your home folder; give a run a folder of its own, '
                       f'e.g. --workdir {os.path.join(home, "workdirs", "base")}.')


def _foreign(names: Iterable[str]) -> list[str]:
  """The names in a workdir that are not this project's."""
  return sorted(n for n in names if n not in FILES + FOLDERS and not _LEFTOVER.fullmatch(n))


def prepare(workdir: str, fresh: bool = False) -> str:
  """Checks `workdir` and returns it absolute, creating it (the only write) when it is new.

  Every check comes before anything is created or written: the workdir is neither the root nor
  the home folder; an existing one is a writable folder; each name this project uses there is
  absent or of its kind (a file, or a folder) and no link that a write or a deletion would
  follow; nothing under checkpoints/, checkpoints_damaged/ or tensorboard/ is a link or special
  file; and a folder holding other files but no run of this project (no config.json) is used
  only with `fresh`, which even then touches only this project's names (remove_for_fresh).

  Raises:
    WorkdirError: one line naming the problem and the fix.
  """
  check_local(workdir)
  folder = os.path.abspath(workdir)
  _refuse_shared_folders(folder)
  try:
    st = os.stat(folder)  # A link at the workdir itself is the user's choice: followed.
  except FileNotFoundError:
    return check_writable(folder, 'workdir', 'choose another --workdir')
  except OSError as e:
    raise WorkdirError(f'workdir {folder} cannot be examined ({e.strerror}); choose another '
                       '--workdir.') from None
  if not stat.S_ISDIR(st.st_mode):
    raise WorkdirError(f'workdir {folder} is a {kind(st.st_mode)}, not a folder; choose another '
                       '--workdir.')
  if not os.access(folder, os.W_OK | os.X_OK):
    raise WorkdirError(f'workdir {folder} is not writable; choose another --workdir.')
  try:
    names = os.listdir(folder)
  except OSError as e:
    raise WorkdirError(f'workdir {folder} cannot be read ({e.strerror}); choose another '
                       '--workdir.') from None
  found = {name: _check_name(folder, name) for name in FILES + FOLDERS}
  for name in _DELETED_IN:
    if found[name] is not None:
      _check_inside(path(folder, name))
  others = _foreign(names)
  if others and found[CONFIG] is None and not fresh:
    shown = ', '.join(others[:3]) + (f' and {len(others) - 3} more' if len(others) > 3 else '')
    raise WorkdirError(f'workdir {folder} holds other files ({shown}) and no run of this project '
                       f'(no {CONFIG}); choose a new or empty --workdir, or add --fresh to train '
                       "there anyway (only this project's own files and folders are touched).")
  return folder


def remove_for_fresh(workdir: str) -> None:
  """Deletes the previous run for --fresh: this project's names only (never .lock, which the
  caller holds, nor anything else in the folder); a link itself, never what it points to.

  Call it holding the lock, after prepare(workdir, fresh=True). summary.json goes first (the
  run is no longer finished), config.json last (the folder holds a run until the end).

  Raises:
    WorkdirError: one line naming what could not be deleted (an immutable or read-only file).
  """
  for name in (SUMMARY, CHECKPOINTS, DAMAGED, TENSORBOARD, FIGURES, METRICS, CONFIG):
    target = path(workdir, name)
    st = _lstat(target)
    if st is None:
      continue
    failed = []
    try:
      if stat.S_ISDIR(st.st_mode):  # lstat: not a link. rmtree never follows links inside.
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
  """Moves `source` (a damaged checkpoint's folder) into <workdir>/checkpoints_damaged/ by one
  rename, as `label`-<unix time>[-n]; returns the new path. Nothing is copied or deleted.

  Raises:
    WorkdirError: one line when it cannot be moved (immutable, read-only, no permission, or
      checkpoints_damaged is not a folder); `source` is then left as it was.
  """
  aside = path(workdir, DAMAGED)
  created = False
  try:
    os.mkdir(aside, 0o755)
    created = True
  except FileExistsError:
    pass
  except OSError as e:
    raise storage_error(e, workdir) or WorkdirError(
        f'{aside} cannot be created ({e.strerror}); fix the permissions of {workdir} and run the '
        'same command again.') from None
  _check_name(workdir, DAMAGED)
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


def default_for_config(config_path: str, config, devices: int, processes: int) -> str:
  """The default workdir of a training: workdirs/<config file name>[,<field=value>...][,<N>devices]
  [,<P>processes], naming each field that shapes the result where the final config differs from
  the config file's own values (fmnist_jax/config.py): equal configs share a folder."""
  from fmnist_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  parts = [os.path.splitext(os.path.basename(config_path))[0]]
  parts += config_lib.name_parts(config, config_lib.load(config_path))
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


def _read_regular(file: str, fix: str) -> bytes:
  """The bytes of the regular file at `file` itself: never read through a link, and a fifo or a
  device (which could block or act) is never opened. WorkdirError naming `fix` otherwise."""
  st = _lstat(file)
  if st is None:
    raise WorkdirError(f'{file} cannot be read ({os.strerror(errno.ENOENT)}); {fix}.')
  if not stat.S_ISREG(st.st_mode):
    raise WorkdirError(f'{file} is a {kind(st.st_mode)}, not a file; {fix}.')
  try:
    fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, 'rb') as f:
      mode = os.fstat(f.fileno()).st_mode
      if not stat.S_ISREG(mode):  # Replaced since the lstat.
        raise WorkdirError(f'{file} is a {kind(mode)}, not a file; {fix}.')
      return f.read()
  except OSError as e:
    raise WorkdirError(f'{file} cannot be read ({e.strerror}); {fix}.') from None


def read_json(file: str, fix: str, required: Iterable[str] = ()) -> dict:
  """A JSON object with the `required` keys; WorkdirError naming the file and `fix` if not."""
  try:
    obj = json.loads(_read_regular(file, fix).decode('utf-8'))
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
    lines = _read_regular(file, fix).decode('utf-8').splitlines()
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
      _check_name(os.path.abspath(workdir), FIGURES)
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
  """An exclusive lock on <workdir>/.lock for the life of a training.

  `fcntl.flock` is released by the kernel when the holder dies (SIGKILL, crash), so a stale lock
  never blocks the next run. The holder records its pid and host in the file once it holds the
  lock, and clears them on release; a refused run names the record only when it is the live
  holder's (a killed run's record stays behind, and a process that is not a training of this
  project may hold the lock without writing one).
  """

  def __init__(self, workdir: str):
    self._workdir = workdir
    self._path = path(workdir, LOCK)
    self._fd = None

  def _error(self, e: OSError, doing: str) -> UserError:
    return storage_error(e, self._workdir) or WorkdirError(
        f'{self._path} cannot be {doing} ({e.strerror}); fix its permissions or use another '
        '--workdir.')

  def _open(self) -> int:
    """The lock file's descriptor: a regular file in the workdir, never a link, fifo or device
    (checked before opening: opening those may block or act)."""
    _check_name(self._workdir, LOCK)
    try:
      fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                   | os.O_CLOEXEC, 0o644)
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise WorkdirError(f'{self._path} is a symbolic link; remove it (the lock file is '
                           'created by the training itself).') from None
      raise self._error(e, 'created') from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # Replaced between the check and the open.
      os.close(fd)
      raise _wrong_kind(self._path, kind(mode), 'file', _ROLES[LOCK])
    return fd

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
    """The refusal, naming the live holder: its record, once checked against the process that
    holds the lock (a new holder may be writing it: looked at a few times)."""
    st = os.fstat(fd)
    holders = None
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

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
