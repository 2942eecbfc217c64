"""Preemption and resume: SIGKILL, SIGTERM, SIGINT, damaged checkpoints; failed runs harm
nothing."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest


from fmnist_jax import loop
from fmnist_jax.errors import UserError
from tests.conftest import (initial_state, load_test_config, ROOT, restore_state, run_cli,
                            wait_for_lock_record)

EVERY = 50  # Checkpoint interval of these tests: many mid-epoch checkpoints.
TIMED = {'seconds', 'steps_per_second'}


def _config(data_dir, input_mode='device'):
  config = load_test_config()
  config.data.data_dir = data_dir
  config.num_epochs = 2
  config.checkpoint_every_steps = EVERY
  config.input_mode = input_mode
  return config


def _args(data_dir, workdir, input_mode='device'):
  return ['--config', 'configs/test.py', f'--config.data.data_dir={data_dir}',
          '--config.num_epochs=2', f'--config.checkpoint_every_steps={EVERY}',
          f'--config.input_mode={input_mode}', f'--workdir={workdir}']


def _untimed(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if k not in TIMED} for l in lines]


def _assert_bitwise_same_run(config, workdir, reference):
  a, _ = restore_state(config, workdir)
  b, _ = restore_state(config, reference)
  assert int(a.step) == int(b.step) == 2 * 938
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert _untimed(workdir) == _untimed(reference)
  sa = json.loads((workdir / 'summary.json').read_text())
  sb = json.loads((reference / 'summary.json').read_text())
  for key in ('test_accuracy', 'test_loss', 'train_accuracy', 'train_loss', 'steps'):
    assert sa[key] == sb[key]


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir):
  """The uninterrupted run every interrupted one must reproduce exactly."""
  workdir = tmp_path_factory.mktemp('reference')
  loop.train_and_evaluate(_config(data_dir), str(workdir))
  return workdir


def _start(data_dir, workdir, input_mode='device'):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen([sys.executable, '-m', 'fmnist_jax.train',
                           *_args(data_dir, workdir, input_mode)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _data_files(step_dir):
  """The files of a checkpoint's array data (orbax's OCDBT data files), largest first."""
  found = [os.path.join(root, name) for root, _, files in os.walk(step_dir / 'state')
           for name in files]
  return sorted(found, key=os.path.getsize, reverse=True)


@pytest.mark.parametrize('damage', ['truncate', 'flip'])
def test_damaged_latest_checkpoint_falls_back(damage, data_dir, reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  (workdir / 'summary.json').unlink()  # As if it died right after the last checkpoint.
  latest = max(int(n) for n in os.listdir(workdir / 'checkpoints') if n.isdigit())
  if damage == 'truncate':
    for path in _data_files(workdir / 'checkpoints' / str(latest)):
      with open(path, 'r+b') as f:
        f.truncate(3)
  else:  # Three flipped bytes in the middle of the data: restores "fine" without a checksum.
    path = _data_files(workdir / 'checkpoints' / str(latest))[0]
    with open(path, 'r+b') as f:
      size = f.seek(0, 2)
      for offset in (size // 2, size // 2 + 1000, size // 2 + 2000):
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))
  result = run_cli('fmnist_jax.train', *_args(data_dir, workdir))
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'checkpoint {latest} in' in result.stderr and 'damaged' in result.stderr
  assert os.listdir(workdir / 'checkpoints_damaged')  # Set aside, not deleted.
  _assert_bitwise_same_run(_config(data_dir), workdir, reference)


def test_fresh_starts_over(data_dir, reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  config = _config(data_dir)
  config.num_epochs = 1
  config.learning_rate = 2e-3  # Incompatible with the saved run: fine with fresh.
  summary = loop.train_and_evaluate(config, str(workdir), fresh=True)
  assert summary['steps'] == summary['steps_run'] == 938
  assert len(_untimed(workdir)) == 1


def _tree_digest(folder):
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(folder)):
    dirs.sort()
    for name in sorted(files):
      if name == '.lock':
        continue  # Lock metadata (who holds it), not data.
      path = os.path.join(root, name)
      digest.update(path.encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def test_failed_runs_damage_nothing(data_dir, reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  before = _tree_digest(workdir)
  data_before = _tree_digest(data_dir)
  failures = [
      ['--config.hidden_sizes=(32,)'],  # Incompatible with the checkpoint.
      ['--config.batch_size=-4'],  # Invalid.
      [f'--config.data.data_dir={tmp_path / "nodata"}', f'--config.data.manual_dir={tmp_path}'],
  ]
  for extra in failures:
    result = run_cli('fmnist_jax.train', *_args(data_dir, workdir), *extra)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert _tree_digest(workdir) == before
  assert _tree_digest(data_dir) == data_before


def test_unwritable_workdir_and_data_dir(data_dir, tmp_path):
  """Paths under /proc refuse writes even to root, whatever the checkout's permissions."""
  cases = [
      ([f'--config.data.data_dir={data_dir}', '--workdir=/proc/fmnist_jax_test/run'],
       'workdir /proc/fmnist_jax_test/run cannot be created (No such file or directory)'),
      ([f'--config.data.data_dir={data_dir}', '--workdir=/proc/self'],
       'workdir /proc/self is not writable'),
      (['--config.data.data_dir=/proc/fmnist_jax_test/tfds', f'--workdir={tmp_path / "w"}'],
       'data dir /proc/fmnist_jax_test/tfds/fashion_mnist cannot be created'),
      ([f'--config.data.data_dir={data_dir}', '--workdir=gs://bucket/run'],
       'cloud storage URLs are not supported'),
  ]
  for args, expected in cases:
    result = run_cli('fmnist_jax.train', '--config', 'configs/test.py', *args)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_one_training_per_workdir(data_dir, reference, tmp_path):
  """A second training in a busy workdir stops at once naming the first, and changes nothing
  there; a killed one's lock is no obstacle. The first is frozen (SIGSTOP) once it holds the lock,
  so it is still running when the second starts, however fast the machine."""
  first = _start(data_dir, tmp_path)
  try:
    wait_for_lock_record(first, tmp_path)
    first.send_signal(signal.SIGSTOP)
    before = _tree_digest(tmp_path)
    second = run_cli('fmnist_jax.train', *_args(data_dir, tmp_path), timeout=120)
    assert second.returncode == 2 and 'Traceback' not in second.stderr, second.stderr[-2000:]
    assert second.stderr.startswith(f'error: another training (pid {first.pid} on '
                                    f'{socket.gethostname()}) is writing to {tmp_path}')
    assert len(second.stderr.splitlines()) == 1
    assert _tree_digest(tmp_path) == before
  finally:
    first.send_signal(signal.SIGKILL)  # Leaves .lock behind, unlocked, with its name in it.
    first.communicate()
  assert (tmp_path / '.lock').read_text() == f'pid {first.pid} on {socket.gethostname()}\n'
  result = run_cli('fmnist_jax.train', *_args(data_dir, tmp_path))
  assert result.returncode == 0, result.stderr[-2000:]
  _assert_bitwise_same_run(_config(data_dir), tmp_path, reference)


def test_signal_at_an_epoch_end_stops_after_its_checkpoint(data_dir, tmp_path, monkeypatch):
  from fmnist_jax.errors import Interrupted
  config = _config(data_dir)
  config.checkpoint_every_steps = 0  # Whole-epoch chunks: the signal lands at the epoch end.
  device_chunks = loop.device_chunks

  def chunks(run, train):
    source = device_chunks(run, train)
    os.kill(os.getpid(), signal.SIGTERM)  # Arrives while the epoch's only chunk runs.
    return source

  monkeypatch.setattr(loop, 'device_chunks', chunks)
  with pytest.raises(Interrupted, match='SIGTERM received: stopped at step 938 \\(epoch 1\\)'):
    loop.train_and_evaluate(config, str(tmp_path))
  assert len(_untimed(tmp_path)) == 1  # Not a step of epoch 2 ran.
  state, _ = restore_state(config, tmp_path)
  assert int(state.step) == 938


def _state_bytes(state):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(state)]


def test_random_bit_flips_never_change_the_restored_state(data_dir, reference, tmp_path):
  """Each flip in the newest checkpoint is either caught by its checksum (the previous one is
  restored) or has no effect on what is restored."""
  from fmnist_jax.run import checkpoint
  config = _config(data_dir)
  _, template = initial_state(config)
  ckpt_dir = reference / 'checkpoints'
  steps_saved = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  newest, previous = steps_saved[-1], steps_saved[-2]
  expected = {newest: _state_bytes(restore_state(config, reference)[0])}
  without_newest = tmp_path / 'previous'
  shutil.copytree(reference, without_newest)
  shutil.rmtree(without_newest / 'checkpoints' / str(newest))
  expected[previous] = _state_bytes(restore_state(config, without_newest)[0])
  files = [os.path.join(root, name) for root, _, names in os.walk(ckpt_dir / str(newest))
           for name in names]
  rng = np.random.default_rng(0)
  outcomes = {newest: 0, previous: 0}
  for trial in range(40):
    workdir = tmp_path / f'trial{trial}'
    os.makedirs(workdir)
    shutil.copytree(ckpt_dir, workdir / 'checkpoints')
    # Most flips land in the array data, the rest anywhere in the checkpoint's files.
    data = _data_files(ckpt_dir / str(newest))
    path = data[0] if trial % 4 else files[rng.integers(len(files))]
    path = str(workdir / os.path.relpath(path, reference))
    size = os.path.getsize(path)
    if not size:
      continue
    offset = int(rng.integers(size))
    with open(path, 'r+b') as f:
      f.seek(offset)
      byte = f.read(1)[0]
      f.seek(offset)
      f.write(bytes([byte ^ (1 << int(rng.integers(8)))]))
    ckpt = checkpoint.Checkpointer(str(workdir), 2)
    try:
      state, _ = ckpt.restore(template)
    finally:
      ckpt.close()
    step = int(state.step)
    assert _state_bytes(state) == expected[step], (trial, path, offset)
    outcomes[step] += 1
  assert outcomes[previous] >= 20  # Flips in the data are caught, not restored silently.


def test_every_checkpoint_damaged_stops_at_once(data_dir, reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  (workdir / 'summary.json').unlink()
  metrics_before = (workdir / 'metrics.jsonl').read_bytes()
  for step in [n for n in os.listdir(workdir / 'checkpoints') if n.isdigit()]:
    for path in _data_files(workdir / 'checkpoints' / step):
      with open(path, 'r+b') as f:
        f.truncate(3)
  result = run_cli('fmnist_jax.train', *_args(data_dir, workdir))
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and 'no checkpoint in' in errors[0] and '--fresh' in errors[0]
  assert result.stderr.splitlines() == errors  # Only its line: no warnings before it.
  assert 'checkpoints_damaged' in errors[0]
  assert len(os.listdir(workdir / 'checkpoints_damaged')) == 2  # Kept aside, not deleted.
  assert (workdir / 'metrics.jsonl').read_bytes() == metrics_before
  assert not (workdir / 'summary.json').exists()
  assert 'Epoch' not in result.stdout  # Nothing trained.
  again = run_cli('fmnist_jax.train', *_args(data_dir, workdir))  # Refused run after run ...
  assert again.returncode == 2 and again.stderr.startswith('error: no checkpoint in'), again.stderr
  assert len(again.stderr.splitlines()) == 1 and 'found damaged earlier' in again.stderr
  assert (workdir / 'metrics.jsonl').read_bytes() == metrics_before
  fresh = run_cli('fmnist_jax.train', *_args(data_dir, workdir), '--fresh')  # ... until --fresh.
  assert fresh.returncode == 0, fresh.stderr[-2000:]
  assert not (workdir / 'checkpoints_damaged').exists()


def test_planted_links_never_redirect_a_write(data_dir, tmp_path):
  """Links at every name the project writes in a workdir: the run replaces them, never writes
  through them; a link at the lock file is refused."""
  outside = tmp_path / 'outside'
  outside.mkdir()
  workdir = tmp_path / 'run'
  (workdir / 'figures').mkdir(parents=True)
  names = ['summary.json', 'config.json', 'metrics.jsonl', 'summary.json.tmp', 'config.json.tmp',
           'metrics.jsonl.tmp', 'figures/prediction_grid.png', 'figures/training_curves.png']
  for i, name in enumerate(names):
    (outside / f'victim{i}').write_text('precious')
    os.symlink(outside / f'victim{i}', workdir / name)
  os.symlink(outside / 'victim_lock', workdir / '.lock')
  (outside / 'victim_lock').write_text('precious')
  result = run_cli('fmnist_jax.train', '--config', 'configs/test.py',
                   f'--config.data.data_dir={data_dir}', f'--workdir={workdir}')
  assert result.returncode == 2 and '.lock is a symbolic link' in result.stderr
  (workdir / '.lock').unlink()
  result = run_cli('fmnist_jax.train', '--config', 'configs/test.py',
                   f'--config.data.data_dir={data_dir}', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-2000:]
  result = run_cli('fmnist_jax.predict', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-2000:]
  for name in ('summary.json', 'config.json', 'metrics.jsonl', 'figures/prediction_grid.png',
               'figures/training_curves.png'):
    assert not (workdir / name).is_symlink() and (workdir / name).stat().st_size > 8
  for victim in outside.iterdir():
    assert victim.read_text() == 'precious'
  assert json.loads((workdir / 'summary.json').read_text())['steps'] == 938


def test_damaged_small_files_are_one_line_or_repaired(data_dir, reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  summary = json.loads((workdir / 'summary.json').read_text())
  # A damaged summary.json of a finished run is rewritten from the final checkpoint.
  (workdir / 'summary.json').write_text('{"test_accuracy": 0.9')
  result = run_cli('fmnist_jax.train', *_args(data_dir, workdir))
  assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  repaired = json.loads((workdir / 'summary.json').read_text())
  assert repaired['test_accuracy'] == summary['test_accuracy'] and repaired['steps_run'] == 0
  # A truncated metrics.jsonl: predict and explore still work, with a note.
  text = (workdir / 'metrics.jsonl').read_text()
  (workdir / 'metrics.jsonl').write_text(text[:len(text) // 2 + 5])
  for module in ('fmnist_jax.predict', 'fmnist_jax.explore'):
    result = run_cli(module, f'--workdir={workdir}')
    assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert 'metrics.jsonl is damaged' in result.stderr
  # ... and the next training rewrites it from the checkpoint's record.
  result = run_cli('fmnist_jax.train', *_args(data_dir, workdir), '--config.num_epochs=3')
  assert result.returncode == 0, result.stderr[-2000:]
  assert [e['epoch'] for e in _untimed(workdir)] == [1, 2, 3]
  # A damaged or wrong-typed config.json: one line from predict and explore.
  for content in ('{"seed": ', json.dumps({**json.loads((workdir / 'config.json').read_text()),
                                           'batch_size': 'many', 'data': 7})):
    (workdir / 'config.json').write_text(content)
    for module in ('fmnist_jax.predict', 'fmnist_jax.explore'):
      result = run_cli(module, f'--workdir={workdir}')
      assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
      errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
      assert len(errors) == 1 and 'config.json' in errors[0]


def _tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True)
  if result.returncode:
    pytest.skip('needs root to mount a small tmpfs')


def test_disk_full_is_one_line_and_resumes(data_dir, reference, tmp_path):
  small = tmp_path / 'small'
  _tmpfs(small, '600k')  # Room for a checkpoint or two, not for the whole run.
  try:
    workdir = small / 'run'
    result = run_cli('fmnist_jax.train', *_args(data_dir, workdir))
    assert result.returncode == 2, result.stderr[-3000:]
    # One line and nothing else: no traceback of ours, none of TensorStore's late writes.
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f'error: no space left on the device holding {workdir}')
    leftovers = [p for p in workdir.rglob('*') if p.name.endswith('.tmp') or 'tmp' in p.name]
    assert not leftovers, leftovers
    saved = tmp_path / 'moved'
    shutil.copytree(workdir, saved)  # "Free some space": continue on a bigger disk.
  finally:
    subprocess.run(['umount', str(small)], check=False)
  result = run_cli('fmnist_jax.train', *_args(data_dir, saved))
  assert result.returncode == 0, result.stderr[-2000:]
  _assert_bitwise_same_run(_config(data_dir), saved, reference)


def _mount(*args) -> bool:
  return subprocess.run(['mount', *args], capture_output=True).returncode == 0


def test_read_only_filesystem_at_a_checkpoint_is_one_line_and_resumes(data_dir, reference,
                                                                      tmp_path):
  """checkpoints/ turns read-only under a running training (a bind mount remounted read-only while
  the training is frozen, from just after it wrote config.json: before, or between, its
  checkpoint saves): the next save is refused by the kernel with EROFS. One line, exit 2, nothing
  half written; once writable again the same command ends bitwise as the uninterrupted run."""
  workdir = tmp_path / 'run'
  folder = workdir / 'checkpoints'
  folder.mkdir(parents=True)
  if not _mount('--bind', str(folder), str(folder)):
    pytest.skip('needs root to make a read-only bind mount')
  proc = _start(data_dir, workdir)
  try:
    deadline = time.time() + 300  # A hang guard, not a measure of speed.
    while not (workdir / 'config.json').exists():
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
      time.sleep(0.01)
    while True:  # A save in progress holds files open for writing: the remount waits it out.
      proc.send_signal(signal.SIGSTOP)
      if _mount('-o', 'remount,bind,ro', str(folder)):
        break
      proc.send_signal(signal.SIGCONT)
      assert proc.poll() is None and time.time() < deadline, 'never remounted read-only'
      time.sleep(0.01)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert err.startswith(f'error: read-only filesystem on the device holding {workdir}: '
                          'free some space'), err[-3000:]
    assert len(err.splitlines()) == 1, err[-3000:]
    assert all(n.isdigit() for n in os.listdir(folder))  # Whole checkpoints only.
    assert _mount('-o', 'remount,bind,rw', str(folder))
    result = run_cli('fmnist_jax.train', *_args(data_dir, workdir))
    assert result.returncode == 0, result.stderr[-2000:]
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
    subprocess.run(['umount', str(folder)], check=False)
  _assert_bitwise_same_run(_config(data_dir), workdir, reference)


def _folder_bytes(folder) -> int:
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder)
             for name in names)


def test_disk_full_while_preparing_data_is_one_line(data_dir, arrays, tmp_path):
  """A real full disk at the write of the decoded copy: the tfds data fits on the tmpfs, the
  copy (55 MB) does not. One line, no temporary file left, and once there is room the same call
  writes the copy."""
  from fmnist_jax import data
  room = _folder_bytes(os.path.join(data_dir, data.DATASET, data.TFDS_VERSION))
  small = tmp_path / 'small'
  _tmpfs(small, str(room + 16 * 2**20))  # The tfds files and 16 MB: less than the copy needs.
  try:
    root = small / 'tfds'
    shutil.copytree(data_dir, root, ignore=shutil.ignore_patterns('fmnist_jax-*'))
    free = shutil.disk_usage(small).free
    config = load_test_config()
    config.data.data_dir = str(root)
    with pytest.raises(UserError, match=f'^no space left on the device holding {root}:') as e:
      data.load(config.data)
    assert '\n' not in str(e.value)
    assert not [n for n in os.listdir(root / data.DATASET) if n.endswith('.tmp') or 'npz' in n]
    assert shutil.disk_usage(small).free == free  # What was written is gone again.
    subprocess.run(['mount', '-o', 'remount,size=200m', str(small)], check=True)
    loaded = data.load(config.data)
    assert (root / data.DATASET / f'fmnist_jax-{data.TFDS_VERSION}.npz').exists()
  finally:
    subprocess.run(['umount', str(small)], check=False)
  for split in ('train', 'test'):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(loaded[split][key], arrays[split][key])


def test_fewer_epochs_than_a_finished_run_is_one_line(data_dir, reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  before = _tree_digest(workdir)
  result = run_cli('fmnist_jax.train', *_args(data_dir, workdir), '--config.num_epochs=1')
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert 'holds a run of 1876 steps, more than the 938 of num_epochs=1' in result.stderr
  assert _tree_digest(workdir) == before


# A full disk, a quota or a read-only filesystem at the small files' writes -----------------------

STORAGE = {'ENOSPC': 'no space left on', 'EDQUOT': 'disk quota exceeded on',
           'EROFS': 'read-only filesystem on'}
# The file each write flushes: the atomic writes' temporary files, the appended metrics.jsonl.
WRITES = {'metrics': r'\.metrics\.jsonl\..+\.tmp', 'summary': r'\.summary\.json\..+\.tmp',
          'metrics_append': r'metrics\.jsonl', 'figures': r'\..+\.png\..+\.tmp'}


def _failing(code, write, *args):
  """`python -m <args>` with `code` raised by the flush of WRITES[write] (tests/fail_writes.py)."""
  return run_cli('tests.fail_writes', code, WRITES[write], *args)


def _only_line(result, message, folder):
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.startswith(f'error: {message} the device holding {folder}: free some '
                                  'space'), result.stderr[-3000:]
  assert len(result.stderr.splitlines()) == 1, result.stderr[-3000:]


def _temporary_files(folder):
  return [p for p in folder.rglob('*') if p.name.endswith('.tmp')]


@pytest.mark.parametrize('code', STORAGE)
@pytest.mark.parametrize('write', ['metrics', 'summary'])
def test_storage_error_at_a_small_file_is_one_line(write, code, data_dir, reference, tmp_path):
  """A finished run whose summary.json is missing rewrites metrics.jsonl, then summary.json: the
  error at either is one line, and what was there stays as it was."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  (workdir / 'summary.json').unlink()
  metrics = (workdir / 'metrics.jsonl').read_bytes()
  _only_line(_failing(code, write, 'fmnist_jax.train', *_args(data_dir, workdir)), STORAGE[code],
             workdir)
  assert not _temporary_files(workdir)
  assert (workdir / 'metrics.jsonl').read_bytes() == metrics
  assert not (workdir / 'summary.json').exists()


@pytest.mark.parametrize('code', STORAGE)
def test_storage_error_at_an_epochs_metrics_line_is_one_line_and_resumes(code, data_dir,
                                                                         reference, tmp_path):
  """The epoch's line is appended after its checkpoint: the run stops in one line, and the next
  run writes metrics.jsonl again from the checkpoint, each epoch once."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  args = (*_args(data_dir, workdir), '--config.num_epochs=3')
  _only_line(_failing(code, 'metrics_append', 'fmnist_jax.train', *args), STORAGE[code], workdir)
  assert not _temporary_files(workdir)
  assert json.loads((workdir / 'summary.json').read_text())['steps'] == 2 * 938  # The old run's.
  result = run_cli('fmnist_jax.train', *args)
  assert result.returncode == 0, result.stderr[-2000:]
  assert [e['epoch'] for e in _untimed(workdir)] == [1, 2, 3]
  summary = json.loads((workdir / 'summary.json').read_text())  # Not the shorter run's.
  assert summary['steps'] == 3 * 938 and summary['steps_run'] == 0  # Not retrained.
  assert summary['test_accuracy'] == _untimed(workdir)[-1]['test_accuracy']


@pytest.mark.parametrize('code', STORAGE)
def test_storage_error_at_a_figure_is_one_line(code, reference, tmp_path):
  figures = tmp_path / 'figures'
  _only_line(_failing(code, 'figures', 'fmnist_jax.predict', f'--workdir={reference}',
                      f'--figures_dir={figures}'), STORAGE[code], figures)
  assert not list(figures.iterdir())


def test_full_disk_at_a_figure_is_one_line(reference, tmp_path):
  """A real full disk: a tmpfs of one page, where no figure fits."""
  figures = tmp_path / 'figures'
  _tmpfs(figures, '4k')
  try:
    result = run_cli('fmnist_jax.predict', f'--workdir={reference}', f'--figures_dir={figures}')
    _only_line(result, STORAGE['ENOSPC'], figures)
    assert not os.listdir(figures)
  finally:
    subprocess.run(['umount', str(figures)], check=False)
