"""A workdir that cannot be turned against itself (#23): links, wrong kinds of files, a full disk,
a lock held by a stranger, a folder that is not a run, and sizes or numbers that cannot train.

Each case is refused in one line before anything is written, and nothing outside the workdir (nor,
mostly, inside it) is created, changed or deleted. Most tests call the functions directly; the
command-line ones check what a user sees: exit 2, one line, no traceback.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from fmnist_jax import config as config_lib
from fmnist_jax.run import workdir as workdir_lib
from fmnist_jax.errors import UserError
from fmnist_jax.run.workdir import WorkdirError
from tests.conftest import ROOT, initial_state, load_test_config, run_cli, wait_for_lock_record


# Helpers -----------------------------------------------------------------------------------------


def _remove(path) -> None:
  """Deletes a file or a whole folder (what a test then replaces with something hostile)."""
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  elif path.exists() or path.is_symlink():
    path.unlink()


def _snapshot(folder) -> dict:
  """Every entry under `folder` (links not followed): kind, and content or link target."""
  found = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs + files:
      entry = os.path.join(root, name)
      st = os.lstat(entry)
      if stat.S_ISLNK(st.st_mode):
        found[entry] = ('link', os.readlink(entry))
      elif stat.S_ISREG(st.st_mode):
        with open(entry, 'rb') as f:
          found[entry] = ('file', hashlib.sha256(f.read()).hexdigest())
      else:
        found[entry] = (workdir_lib.kind(st.st_mode), None)
  return found


@contextlib.contextmanager
def _within(seconds: int):
  """Fails the test instead of hanging when the block blocks (a fifo opened, say)."""
  def timeout(signum, frame):  # pylint: disable=unused-argument
    raise AssertionError(f'blocked for more than {seconds} s')
  old = signal.signal(signal.SIGALRM, timeout)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _refused(call, *expected: str) -> str:
  """Runs `call`, which must raise a one-line WorkdirError holding each `expected` text."""
  with _within(10), pytest.raises(WorkdirError) as raised:
    call()
  message = str(raised.value)
  assert '\n' not in message, message
  for text in expected:
    assert text in message, message
  return message


def _run(workdir, tmp_path) -> dict:
  """A run's files as a finished run leaves them (checkpoints 800 and 938), without training."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text('{"seed": 0}\n')
  (workdir / 'metrics.jsonl').write_text('{"epoch": 1}\n')
  (workdir / 'summary.json').write_text('{"steps": 938}\n')
  for step in (800, 938):
    (workdir / 'checkpoints' / str(step) / 'state').mkdir(parents=True)
    (workdir / 'checkpoints' / str(step) / 'state' / 'data').write_bytes(b'\x01' * 100)
  return _snapshot(tmp_path)


def _train(workdir, *extra, data_dir='/nonexistent/fmnist_jax_data'):
  """The train command; without a real data dir it fails at the data, so a refusal that should
  have come earlier shows as the wrong message, not as a run."""
  return run_cli('fmnist_jax.train', '--config', 'configs/test.py',
                 f'--config.data.data_dir={data_dir}', '--config.data.download=False',
                 f'--config.data.manual_dir={data_dir}', f'--workdir={workdir}', *extra,
                 timeout=300)


def _one_line_error(result, *expected: str) -> str:
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  for text in expected:
    assert text in lines[0], lines[0]
  return lines[0]


# A. Links: nothing is written or deleted through one ---------------------------------------------


@pytest.mark.parametrize('fresh', [False, True])
def test_linked_checkpoints_folder_is_refused(fresh, tmp_path):
  workdir = tmp_path / 'run'
  _run(workdir, tmp_path)
  outside = tmp_path / 'x'
  outside.mkdir()
  os.rename(workdir / 'checkpoints', outside / 'ck')
  os.symlink(outside / 'ck', workdir / 'checkpoints')
  before = _snapshot(tmp_path)
  _refused(lambda: workdir_lib.prepare(str(workdir), fresh=fresh),
           f'{workdir}/checkpoints is a symbolic link (to {outside}/ck)',
           f'mv {outside}/ck {workdir}/checkpoints')
  assert _snapshot(tmp_path) == before


@pytest.mark.parametrize('name', ['checkpoints_damaged', 'tensorboard', 'figures', '.lock'])
def test_links_at_the_other_folders_and_the_lock_are_refused(name, tmp_path):
  workdir = tmp_path / 'run'
  _run(workdir, tmp_path)
  target = tmp_path / 'elsewhere'
  target.mkdir()
  os.symlink(target, workdir / name)
  before = _snapshot(tmp_path)
  _refused(lambda: workdir_lib.prepare(str(workdir), fresh=True),
           f'{workdir}/{name} is a symbolic link')
  assert _snapshot(tmp_path) == before


@pytest.mark.parametrize('where', ['checkpoints/938', 'checkpoints/938/state/data',
                                   'tensorboard/events.out.tfevents.1'])
def test_a_link_inside_a_folder_the_training_deletes_from_is_refused(where, tmp_path):
  """orbax deletes old steps (rmtree on a link is a traceback); nothing below is followed."""
  workdir = tmp_path / 'run'
  _run(workdir, tmp_path)
  victim = tmp_path / 'victim'
  victim.mkdir()
  (victim / 'precious').write_text('precious')
  path = workdir / where
  path.parent.mkdir(parents=True, exist_ok=True)
  _remove(path)
  os.symlink(victim, path)
  before = _snapshot(tmp_path)
  _refused(lambda: workdir_lib.prepare(str(workdir)), f'{path} is a symbolic link')
  assert _snapshot(tmp_path) == before


def test_links_at_replaced_files_are_replaced_never_followed(tmp_path):
  """config.json, metrics.jsonl and summary.json are only ever replaced by a rename: a link
  there is accepted, never read through (summary.json), and --fresh deletes the link alone."""
  workdir = tmp_path / 'run'
  _run(workdir, tmp_path)
  outside = tmp_path / 'outside.json'
  outside.write_text('{"test_accuracy": 1.0, "steps": 938}\n')
  (workdir / 'summary.json').unlink()
  os.symlink(outside, workdir / 'summary.json')
  assert workdir_lib.prepare(str(workdir)) == str(workdir)
  _refused(lambda: workdir_lib.read_json(str(workdir / 'summary.json'), 'rewriting it'),
           'summary.json is a symbolic link, not a file; rewriting it')
  workdir_lib.remove_for_fresh(str(workdir))
  assert not os.path.lexists(workdir / 'summary.json')
  assert outside.read_text() == '{"test_accuracy": 1.0, "steps": 938}\n'


def test_figures_are_never_drawn_through_a_link(tmp_path, capsys):
  """predict and explore draw into <workdir>/figures: a link there means no figures, a note."""
  workdir = tmp_path / 'run'
  _run(workdir, tmp_path)
  (tmp_path / 'elsewhere').mkdir()
  os.symlink(tmp_path / 'elsewhere', workdir / 'figures')
  assert workdir_lib.figures_folder(str(workdir), '') is None
  assert f'note: no figures written: {workdir}/figures is a symbolic link' in (
      capsys.readouterr().err)
  chosen = tmp_path / 'chosen'  # A folder given with --figures_dir is the user's choice.
  assert workdir_lib.figures_folder(str(workdir), str(chosen)) == str(chosen)


@pytest.mark.parametrize('flags', [(), ('--fresh',)])
def test_cli_refuses_a_linked_checkpoints_folder(flags, tmp_path):
  """Neither a resume nor --fresh writes through (or deletes through) a linked checkpoints/."""
  workdir = tmp_path / 'run'
  _run(workdir, tmp_path)
  os.rename(workdir / 'checkpoints', tmp_path / 'ck')
  os.symlink(tmp_path / 'ck', workdir / 'checkpoints')
  before = _snapshot(tmp_path)
  _one_line_error(_train(workdir, *flags), 'checkpoints is a symbolic link')
  assert _snapshot(tmp_path) == before  # Not even a .lock.


# B. A full disk ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _full_tmpfs(path):
  """A 600 KB tmpfs at `path`, filled to the last byte by a file of its own."""
  path.mkdir(parents=True)
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=600k', 'tmpfs', str(path)],
                           capture_output=True)
  if mounted.returncode:
    pytest.skip('needs permission to mount a small tmpfs')
  try:
    fd = os.open(path / 'filler', os.O_WRONLY | os.O_CREAT, 0o644)
    try:
      for chunk in (65536, 4096, 1):
        try:
          while True:
            os.write(fd, b'\0' * chunk)
        except OSError as e:
          assert e.errno == errno.ENOSPC
    finally:
      os.close(fd)
    fd = os.open(path / 'probe', os.O_WRONLY | os.O_CREAT, 0o644)
    try:
      with pytest.raises(OSError, match='No space left'):  # Not one more byte.
        os.write(fd, b'x')
    finally:
      os.close(fd)
      os.unlink(path / 'probe')
    yield path
  finally:
    subprocess.run(['umount', str(path)], check=False)


def test_lock_on_a_full_disk_is_one_line(tmp_path):
  with _full_tmpfs(tmp_path / 'small') as small:
    workdir = small / 'run'
    workdir.mkdir()
    lock = workdir_lib.Lock(str(workdir))
    with pytest.raises(UserError, match=f'no space left on the device holding {workdir}:') as e:
      lock.acquire()
    assert '\n' not in str(e.value)
    lock.release()  # Nothing held: harmless.
    with open(workdir / '.lock', 'rb') as f:  # And the lock is free again.
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_cli_on_a_full_disk_is_one_line(tmp_path):
  with _full_tmpfs(tmp_path / 'small') as small:
    workdir = small / 'run'
    workdir.mkdir()
    _one_line_error(_train(workdir), f'no space left on the device holding {workdir}')
    assert set(os.listdir(small)) == {'filler', 'run'}


# C. Names taken by the wrong kind of file --------------------------------------------------------


def _make(path, what):
  if what == 'folder':
    path.mkdir()
    (path / 'inside').write_text('keep')
  elif what == 'file':
    path.write_text('keep')
  elif what == 'fifo':
    os.mkfifo(path)
  elif what == 'socket':
    cwd = os.getcwd()
    os.chdir(path.parent)  # A relative name: socket paths are limited to 107 bytes.
    try:
      with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path.name)
    finally:
      os.chdir(cwd)
  elif what == 'character device':
    try:
      os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # Like /dev/null.
    except PermissionError:
      pytest.skip('needs root to make a device node')


@pytest.mark.parametrize('name, what', [
    ('summary.json', 'folder'), ('config.json', 'folder'), ('metrics.jsonl', 'folder'),
    ('checkpoints', 'file'), ('checkpoints_damaged', 'file'), ('tensorboard', 'fifo'),
    ('.lock', 'folder'), ('.lock', 'fifo'), ('config.json', 'fifo'), ('summary.json', 'socket'),
    ('metrics.jsonl', 'character device'), ('checkpoints/938/state/data', 'fifo'),
])
@pytest.mark.parametrize('fresh', [False, True])
def test_a_name_of_the_wrong_kind_is_one_line_and_nothing_changes(name, what, fresh, tmp_path):
  workdir = tmp_path / 'run'
  _run(workdir, tmp_path)
  path = workdir / name
  _remove(path)
  _make(path, what)
  before = _snapshot(tmp_path)
  _refused(lambda: workdir_lib.prepare(str(workdir), fresh=fresh), f'{path} is a {what}, not a')
  assert _snapshot(tmp_path) == before


@pytest.mark.parametrize('what', ['folder', 'fifo', 'socket'])
def test_the_lock_never_opens_a_wrong_kind(what, tmp_path):
  _make(tmp_path / '.lock', what)
  before = _snapshot(tmp_path)
  _refused(lambda: workdir_lib.Lock(str(tmp_path)).acquire(),
           f'{tmp_path}/.lock is a {what}, not a file')
  assert _snapshot(tmp_path) == before


@pytest.mark.parametrize('what', ['folder', 'fifo', 'character device'])
def test_reads_never_block_or_follow(what, tmp_path):
  _make(tmp_path / 'config.json', what)
  _refused(lambda: workdir_lib.read_json(str(tmp_path / 'config.json'), 'retrain'),
           f'config.json is a {what}, not a file; retrain')
  _make(tmp_path / 'metrics.jsonl', what)
  _refused(lambda: workdir_lib.read_metrics(str(tmp_path / 'metrics.jsonl'), 'retrain'),
           f'metrics.jsonl is a {what}, not a file')


def test_cli_summary_folder_and_lock_fifo_are_one_line(tmp_path):
  workdir = tmp_path / 'run'
  _run(workdir, tmp_path)
  (workdir / 'summary.json').unlink()
  (workdir / 'summary.json').mkdir()
  before = _snapshot(tmp_path)
  _one_line_error(_train(workdir), f'{workdir}/summary.json is a folder, not a file')
  assert _snapshot(tmp_path) == before
  (workdir / 'summary.json').rmdir()
  os.mkfifo(workdir / '.lock')
  before = _snapshot(tmp_path)
  _one_line_error(_train(workdir), f'{workdir}/.lock is a fifo, not a file')
  assert _snapshot(tmp_path) == before


# 4. An immutable checkpoint: set aside by one rename, or refused ---------------------------------


@contextlib.contextmanager
def _immutable(path):
  made = subprocess.run(['chattr', '+i', str(path)], capture_output=True)
  if made.returncode:
    pytest.skip(f'chattr +i is not possible here: {made.stderr.decode().strip()}')
  try:
    yield
  finally:
    subprocess.run(['chattr', '-i', str(path)], check=False)


def test_move_aside_moves_by_one_rename(tmp_path):
  workdir = tmp_path / 'run'
  _run(workdir, tmp_path)
  inode = os.stat(workdir / 'checkpoints' / '938').st_ino
  first = workdir_lib.move_aside(str(workdir), str(workdir / 'checkpoints' / '938'), '938')
  assert os.path.dirname(first) == str(workdir / 'checkpoints_damaged')
  assert os.stat(first).st_ino == inode and not (workdir / 'checkpoints' / '938').exists()
  # The same label in the same second: a new name, never onto the first.
  (workdir / 'checkpoints' / '938').mkdir()
  second = workdir_lib.move_aside(str(workdir), str(workdir / 'checkpoints' / '938'), '938')
  assert second != first and os.path.isdir(first) and os.path.isdir(second)


def test_move_aside_of_an_immutable_checkpoint_is_one_line(tmp_path):
  workdir = tmp_path / 'run'
  _run(workdir, tmp_path)
  step = workdir / 'checkpoints' / '938'
  with _immutable(step):
    before = _snapshot(workdir / 'checkpoints')
    _refused(lambda: workdir_lib.move_aside(str(workdir), str(step), '938'),
             f'damaged checkpoint {step} cannot be moved', 'chattr -R -i')
    assert _snapshot(workdir / 'checkpoints') == before


def test_move_aside_into_a_file_is_one_line(tmp_path):
  workdir = tmp_path / 'run'
  _run(workdir, tmp_path)
  (workdir / 'checkpoints_damaged').write_text('not a folder')
  before = _snapshot(tmp_path)
  _refused(lambda: workdir_lib.move_aside(str(workdir), str(workdir / 'checkpoints' / '938'),
                                          '938'), 'checkpoints_damaged is a file, not a folder')
  assert _snapshot(tmp_path) == before


def test_fresh_on_an_immutable_file_is_one_line(tmp_path):
  workdir = tmp_path / 'run'
  _run(workdir, tmp_path)
  data = workdir / 'checkpoints' / '938' / 'state' / 'data'
  with _immutable(data):
    _refused(lambda: workdir_lib.remove_for_fresh(str(workdir)),
             f'--fresh could not delete {data}', 'chattr -i')
    assert data.read_bytes() == b'\x01' * 100


def _error_line(result, *expected: str) -> str:
  """Exit 2, no traceback, one error line (warnings before it allowed) holding `expected`."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, result.stderr[-3000:]
  for text in expected:
    assert text in errors[0], errors[0]
  return errors[0]


def test_cli_immutable_damaged_checkpoint_is_one_line(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  every = '--config.checkpoint_every_steps=800'  # Checkpoints 800 and 938.
  result = _train(workdir, every, data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  (workdir / 'summary.json').unlink()  # As if killed after the last checkpoint.
  latest = workdir / 'checkpoints' / '938'
  for root, _, files in os.walk(latest / 'state'):
    for name in files:
      os.truncate(os.path.join(root, name), 3)
  with _immutable(latest):
    before = _snapshot(workdir / 'checkpoints')
    _error_line(_train(workdir, every, data_dir=data_dir),
                f'damaged checkpoint {latest} cannot be moved', 'chattr -R -i')
    assert _snapshot(workdir / 'checkpoints') == before
    assert not (workdir / 'checkpoints_damaged').exists()


# F. The lock names its live holder ---------------------------------------------------------------


def _dead_pid() -> int:
  proc = subprocess.Popen(['true'])
  proc.wait()
  return proc.pid


def _wait_until_held(workdir) -> None:
  """Returns once another process holds <workdir>/.lock (tried without writing to the file)."""
  deadline = time.time() + 60
  while time.time() < deadline:
    if os.path.exists(workdir / '.lock'):
      with open(workdir / '.lock', 'rb') as f:
        try:
          fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          return
    time.sleep(0.05)
  raise AssertionError('the lock was never taken')


def test_lock_held_by_a_stranger_says_so_not_a_dead_runs_name(tmp_path):
  dead = _dead_pid()
  (tmp_path / '.lock').write_text(f'pid {dead} on {socket.gethostname()}\n')
  holder = subprocess.Popen(['flock', str(tmp_path / '.lock'), 'sleep', '30'],
                            start_new_session=True)
  try:
    _wait_until_held(tmp_path)
    message = _refused(workdir_lib.Lock(str(tmp_path)).acquire)
  finally:
    os.killpg(holder.pid, signal.SIGKILL)  # flock and its sleep, which holds the lock too.
    holder.wait()
  assert 'held by a process that did not record its name' in message
  assert f'pid {holder.pid} (flock)' in message and 'not a training of this project?' in message
  assert f'pid {dead}' not in message and '\n' not in message


def test_lock_names_the_training_that_holds_it(tmp_path):
  """The holder takes the lock as a training does (workdir.Lock); its name in the file, written
  only once it holds the lock, says when (probing the lock could take it first)."""
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from fmnist_jax.run import workdir; '
       'workdir.Lock(sys.argv[1]).acquire(); time.sleep(300)', str(tmp_path)],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
  try:
    wait_for_lock_record(holder, tmp_path)
    message = _refused(workdir_lib.Lock(str(tmp_path)).acquire)
  finally:
    holder.kill()
    holder.wait()
  assert message.startswith(f'another training (pid {holder.pid} on {socket.gethostname()}) '
                            f'is writing to {tmp_path}')
  # Killed: its name stays in the file, the lock is free, and the next holder replaces the name.
  lock = workdir_lib.Lock(str(tmp_path))
  lock.acquire()
  assert (tmp_path / '.lock').read_text() == f'pid {os.getpid()} on {socket.gethostname()}\n'
  lock.release()
  assert (tmp_path / '.lock').read_text() == ''  # A clean exit leaves no name behind.


def test_cli_names_a_stranger_holding_the_lock(tmp_path):
  (tmp_path / '.lock').write_text(f'pid {_dead_pid()} on {socket.gethostname()}\n')
  holder = subprocess.Popen(['flock', str(tmp_path / '.lock'), 'sleep', '60'],
                            start_new_session=True)
  try:
    _wait_until_held(tmp_path)
    _one_line_error(_train(tmp_path), 'held by a process that did not record its name',
                    f'pid {holder.pid} (flock)')
  finally:
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()


# G. Folders that are not a run's -----------------------------------------------------------------


def test_root_and_home_are_refused_even_with_fresh(tmp_path):
  for fresh in (False, True):
    _refused(lambda: workdir_lib.prepare('/', fresh=fresh), '--workdir / is the filesystem root')
    _refused(lambda: workdir_lib.prepare('//', fresh=fresh), 'is the filesystem root')
    home = os.path.expanduser('~')
    _refused(lambda: workdir_lib.prepare(home, fresh=fresh), f'--workdir {home} is your home')
  link = tmp_path / 'root'
  os.symlink('/', link)
  _refused(lambda: workdir_lib.prepare(str(link)), 'is the filesystem root')


def test_cli_refuses_the_root(tmp_path):
  names = ('.lock', 'checkpoints', 'config.json', 'metrics.jsonl', 'summary.json')
  before = {n for n in names if os.path.lexists(os.path.join('/', n))}
  _one_line_error(_train('/'), '--workdir / is the filesystem root')
  assert {n for n in names if os.path.lexists(os.path.join('/', n))} == before


def test_a_folder_of_other_files_is_not_a_run(tmp_path):
  folder = tmp_path / 'photos'
  folder.mkdir()
  (folder / 'cat.png').write_bytes(b'\x89PNG')
  (folder / 'figures').mkdir()  # A name of ours among them does not make it a run.
  before = _snapshot(tmp_path)
  _refused(lambda: workdir_lib.prepare(str(folder)),
           f'workdir {folder} holds other files (cat.png)', 'no config.json', '--fresh')
  assert _snapshot(tmp_path) == before
  # With --fresh it may be used, and only this project's names are ever touched.
  assert workdir_lib.prepare(str(folder), fresh=True) == str(folder)
  (folder / 'summary.json').write_text('{}')
  workdir_lib.remove_for_fresh(str(folder))
  assert sorted(os.listdir(folder)) == ['cat.png']
  assert (folder / 'cat.png').read_bytes() == b'\x89PNG'


@pytest.mark.parametrize('names', [[], ['.lock'], ['checkpoints/'], ['config.json', 'notes.txt'],
                                   ['.summary.json.abc123.tmp', 'metrics.jsonl'],
                                   ['summary.json.tmp']])
def test_new_empty_and_project_folders_are_runs(names, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  for name in names:
    if name.endswith('/'):
      (workdir / name).mkdir()
    else:
      (workdir / name).write_text('{}')
  assert workdir_lib.prepare(str(workdir)) == str(workdir)
  new = tmp_path / 'new' / 'run'
  assert workdir_lib.prepare(str(new)) == str(new) and new.is_dir()


def test_cli_refuses_a_folder_of_other_files(tmp_path):
  (tmp_path / 'thesis.tex').write_text('years of work')
  before = _snapshot(tmp_path)
  _one_line_error(_train(tmp_path), 'holds other files (thesis.tex)', '--fresh')
  assert _snapshot(tmp_path) == before  # Not even a .lock.


def test_remove_for_fresh_deletes_only_the_projects_names(tmp_path):
  workdir = tmp_path / 'run'
  _run(workdir, tmp_path)
  for folder in ('checkpoints_damaged/938-1', 'tensorboard', 'figures'):
    (workdir / folder).mkdir(parents=True)
  (workdir / 'tensorboard' / 'events').write_text('e')
  (workdir / '.lock').write_text('')
  (workdir / 'notes.txt').write_text('mine')
  outside = tmp_path / 'outside'
  outside.mkdir()
  (outside / 'precious').write_text('precious')
  os.symlink(outside, workdir / 'checkpoints' / '938' / 'linked')  # Inside a deleted folder.
  os.unlink(workdir / 'config.json')
  os.symlink(outside / 'precious', workdir / 'config.json')
  workdir_lib.remove_for_fresh(str(workdir))
  assert sorted(os.listdir(workdir)) == ['.lock', 'notes.txt']
  assert (outside / 'precious').read_text() == 'precious'


def test_cli_fresh_trains_in_a_folder_of_other_files_and_keeps_them(data_dir, tmp_path):
  (tmp_path / 'thesis.tex').write_text('years of work')
  (tmp_path / 'summary.json').write_text('{"stale": true}')
  result = _train(tmp_path, '--fresh', data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / 'thesis.tex').read_text() == 'years of work'
  assert 'stale' not in (tmp_path / 'summary.json').read_text()


def test_cli_fresh_starts_over_and_clears_the_previous_run(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  result = _train(workdir, data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  (workdir / 'checkpoints_damaged' / '938-1').mkdir(parents=True)  # Set aside once.
  (workdir / 'notes.txt').write_text('mine')
  result = _train(workdir, '--fresh', data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((workdir / 'summary.json').read_text())['steps_run'] == 938  # Retrained.
  assert not (workdir / 'checkpoints_damaged').exists()
  assert (workdir / 'notes.txt').read_text() == 'mine'


# D. Seeds and optimizer numbers ------------------------------------------------------------------


@pytest.mark.parametrize('field, value, expected', [
    ('seed', 100000000000000000000000, 'seed=100000000000000000000000 must be an integer from 0'),
    ('seed', -1, 'seed=-1 must be an integer from 0'),
    ('seed', config_lib.SEED_LIMIT, f'seed={config_lib.SEED_LIMIT} must be'),
    ('learning_rate', float('nan'), 'learning_rate=nan must be a finite number above 0'),
    ('learning_rate', float('inf'), 'learning_rate=inf must be a finite number above 0'),
    ('learning_rate', -1e-3, 'learning_rate=-0.001 must be'),
    ('b1', float('nan'), 'b1=nan must be a number from 0 up to (not including) 1'),
    ('b1', 1.0, 'b1=1.0 must be a number from 0'),
    ('b2', -0.5, 'b2=-0.5 must be'),
    ('b2', float('inf'), 'b2=inf must be'),
    ('eps', 0.0, 'eps=0.0 must be a finite number above 0'),
    ('eps', float('nan'), 'eps=nan must be'),
])
def test_bad_seeds_and_optimizer_numbers_name_their_field(field, value, expected):
  config = config_lib.base()
  config[field] = value
  with pytest.raises(UserError) as raised:
    config_lib.validate_config(config)
  assert str(raised.value).startswith(expected), str(raised.value)
  assert f'--config.{field}={config_lib.base()[field]!r}' in str(raised.value)


def test_each_learning_rate_is_checked():
  config = config_lib.base()
  config.num_models = 3
  config.learning_rates = (1e-3, float('nan'), 2e-3)
  with pytest.raises(UserError, match=r'^learning_rates\[1\]=nan must be a finite number'):
    config_lib.validate_config(config)


def test_the_largest_seed_accepted_initialises_the_run():
  """The limit is JAX's: the largest seed validate accepts initialises the run."""
  config = load_test_config()
  config.seed = config_lib.SEED_LIMIT - config_lib.DATA_SEED_OFFSET
  config_lib.validate_config(config)
  initial_state(config)
  config.seed += 1
  with pytest.raises(UserError, match='must be an integer from 0 to'):
    config_lib.validate_config(config)


def test_examples_come_from_the_base_config(monkeypatch):
  """configs/base.py is the only home of defaults: a changed default shows in the messages."""
  base = config_lib.base()
  base.batch_size = 48
  monkeypatch.setattr(config_lib, '_base', lambda: base)
  config = config_lib.base()
  config.batch_size = 0
  with pytest.raises(UserError, match=r'e\.g\. --config\.batch_size=48\.$'):
    config_lib.validate_config(config)
  monkeypatch.setattr(config_lib, '_base', lambda: None)  # An install without configs/.
  with pytest.raises(UserError, match=r'^batch_size=0 must be a positive number\.$'):
    config_lib.validate_config(config)


def test_cli_huge_seed_is_one_line(tmp_path):
  _one_line_error(_train(tmp_path / 'w', '--config.seed=100000000000000000000000'),
                  'seed=100000000000000000000000 must be an integer from 0 to')
  assert not (tmp_path / 'w').exists()


# E. Sizes ----------------------------------------------------------------------------------------


def test_a_model_too_big_for_the_device_is_one_line_at_once():
  config = load_test_config()
  config.hidden_sizes = (1_000_000_000,)
  config_lib.validate_config(config)
  memory = config_lib.device_memory_bytes()
  assert memory and memory > 2**28  # Known on a CPU too: the host's memory.
  # Refused from the sizes alone: allocating 3.2 TB would be a MemoryError (or a hang: guarded).
  with _within(60), pytest.raises(UserError) as raised:
    config_lib.check_sizes(config, memory)
  message = str(raised.value)
  assert message.startswith('hidden_sizes=(1000000000,) needs ') and '\n' not in message
  assert '795,000,000,010 parameters' in message and 'memory of one device' in message


def test_sizes_count_params_adam_state_and_resident_data():
  config = load_test_config()  # 784 -> 96 -> 10.
  params = 784 * 96 + 96 + 96 * 10 + 10
  assert config_lib.param_count(config) == params
  needed = 3 * 4 * params + 60_000 * (784 + 4)
  config_lib.check_sizes(config, needed)  # Exactly fits.
  with pytest.raises(UserError, match=r'^hidden_sizes=\(96,\) needs'):
    config_lib.check_sizes(config, needed - 1)
  config.input_mode = 'stream'  # The data stays on the host.
  config_lib.check_sizes(config, 3 * 4 * params)
  config.input_mode = 'device'
  config.num_models = 4
  with pytest.raises(UserError, match=r'^num_models=4 needs .* use at most --config.num_models=1'):
    config_lib.check_sizes(config, needed)
  with pytest.raises(UserError, match=r'^input_mode=device needs .*--config.input_mode=stream'):
    config_lib.check_sizes(config, 10**6)
  config_lib.check_sizes(config, None)  # Unknown memory: nothing refused.


def test_cli_huge_hidden_layer_is_one_line_at_once(tmp_path):
  """Refused before the workdir is made and before the data is looked for (_train's data dir does
  not exist: a later refusal would name the data instead)."""
  _one_line_error(_train(tmp_path / 'w', "--config.hidden_sizes=(1000000000,)"),
                  'hidden_sizes=(1000000000,) needs')
  assert not (tmp_path / 'w').exists()


def test_a_link_planted_after_the_check_is_refused_by_the_opener(tmp_path):
  """The opener itself (O_NOFOLLOW) refuses a link that appeared after check_kind looked, in one
  line naming it, and writes nothing through it: the metrics' append, and any open for writing."""
  victim = tmp_path / 'victim'
  victim.write_text('precious')
  link = tmp_path / 'metrics.jsonl'
  os.symlink(victim, link)
  with pytest.raises(WorkdirError, match=f'^{link} is a symbolic link; remove it'):
    workdir_lib.append_json_line(str(link), {'step': 1})
  with pytest.raises(WorkdirError, match=f'^{link} is a symbolic link; the fix.$'):
    # pylint: disable-next=protected-access
    workdir_lib._open_regular(str(link), os.O_RDWR | os.O_NOFOLLOW, 'the fix')
  assert victim.read_text() == 'precious'
