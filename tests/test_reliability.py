"""Preemption and resume: SIGKILL, SIGTERM, SIGINT, damaged checkpoints; failed runs harm nothing."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest


from fmnist_jax import trainer
from tests.conftest import load_test_config, ROOT, restore_state, run_cli

EVERY = 50  # Checkpoint interval of these tests: many mid-epoch checkpoints.
TIMED = {'seconds', 'steps_per_second'}


def _config(data_dir):
  config = load_test_config()
  config.data.data_dir = data_dir
  config.num_epochs = 2
  config.checkpoint_every_steps = EVERY
  return config


def _args(data_dir, workdir):
  return ['--config', 'configs/test.py', f'--config.data.data_dir={data_dir}',
          '--config.num_epochs=2', f'--config.checkpoint_every_steps={EVERY}',
          f'--workdir={workdir}']


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
  trainer.train_and_evaluate(_config(data_dir), str(workdir))
  return workdir


def _start(data_dir, workdir):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen([sys.executable, '-m', 'fmnist_jax.train', *_args(data_dir, workdir)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _wait_for_checkpoint(proc, workdir, at_least):
  """Polls until a finished checkpoint of step >= at_least exists; returns its step."""
  folder = workdir / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline:
    steps_done = [int(n) for n in (os.listdir(folder) if folder.exists() else []) if n.isdigit()]
    if steps_done and max(steps_done) >= at_least:
      return max(steps_done)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.005)
  raise AssertionError('no checkpoint appeared')


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(data_dir, reference, tmp_path):
  proc = _start(data_dir, tmp_path)
  seen = _wait_for_checkpoint(proc, tmp_path, 3 * EVERY)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  assert not (tmp_path / 'summary.json').exists()  # Killed before the end.
  state, _ = restore_state(_config(data_dir), tmp_path)
  assert seen <= int(state.step) < 2 * 938
  result = run_cli('fmnist_jax.train', *_args(data_dir, tmp_path), '--config.progress=True')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Resuming from the checkpoint at step' in result.stdout
  _assert_bitwise_same_run(_config(data_dir), tmp_path, reference)


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_and_resumes(sig, data_dir, reference, tmp_path):
  proc = _start(data_dir, tmp_path)
  _wait_for_checkpoint(proc, tmp_path, EVERY)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  if proc.returncode == 0:
    pytest.skip('the run finished before the signal arrived')
  assert proc.returncode == 130, err[-2000:]
  assert 'Traceback' not in err
  message = [l for l in err.splitlines() if l.startswith('error: ')]
  assert len(message) == 1 and f'{signal.Signals(sig).name} received: stopped at step' in message[0]
  assert 'run the same command again to resume' in message[0]
  stopped_at = int(message[0].split('stopped at step ')[1].split()[0])
  state, _ = restore_state(_config(data_dir), tmp_path)
  assert int(state.step) == stopped_at  # The checkpoint is the state it stopped in.
  result = run_cli('fmnist_jax.train', *_args(data_dir, tmp_path))
  assert result.returncode == 0, result.stderr[-2000:]
  _assert_bitwise_same_run(_config(data_dir), tmp_path, reference)


def test_damaged_latest_checkpoint_falls_back(data_dir, reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  (workdir / 'summary.json').unlink()  # As if it died right after the last checkpoint.
  latest = max(int(n) for n in os.listdir(workdir / 'checkpoints') if n.isdigit())
  for root, _, files in os.walk(workdir / 'checkpoints' / str(latest) / 'state'):
    for name in files:
      with open(os.path.join(root, name), 'r+b') as f:
        f.truncate(3)
  result = run_cli('fmnist_jax.train', *_args(data_dir, workdir))
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'checkpoint {latest} in' in result.stderr and 'damaged' in result.stderr
  assert os.listdir(workdir / 'checkpoints_damaged')  # Set aside, not deleted.
  _assert_bitwise_same_run(_config(data_dir), workdir, reference)


def test_fresh_starts_over(data_dir, reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  config = _config(data_dir)
  config.fresh = True
  config.num_epochs = 1
  config.learning_rate = 2e-3  # Incompatible with the saved run: fine with fresh.
  summary = trainer.train_and_evaluate(config, str(workdir))
  assert summary['steps'] == summary['steps_run'] == 938
  assert len(_untimed(workdir)) == 1


def _tree_digest(folder):
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(folder)):
    dirs.sort()
    for name in sorted(files):
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
  """Permissions: as root these cannot fail, so run as the unprivileged user 'nobody'."""
  if os.geteuid() != 0 or not shutil.which('setpriv'):
    pytest.skip('needs root and setpriv to switch to an unprivileged user')
  base = f'/tmp/fmnist_perm_{os.getpid()}'
  os.makedirs(f'{base}/locked', exist_ok=True)
  for writable in ('w', 'home'):
    os.makedirs(f'{base}/{writable}')
    os.chmod(f'{base}/{writable}', 0o777)
  os.chmod(base, 0o755)
  os.chmod(f'{base}/locked', 0o555)
  shutil.copytree(data_dir, f'{base}/data')
  os.chmod(f'{base}/data', 0o755)
  try:
    nobody = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', sys.executable,
              '-m', 'fmnist_jax.train', '--config', 'configs/test.py']
    env = dict(os.environ, HOME=f'{base}/home', TF_CPP_MIN_LOG_LEVEL='3')
    result = subprocess.run(nobody + [f'--workdir={base}/locked/run'], capture_output=True,
                            text=True, cwd=ROOT, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'cannot be created (Permission denied)' in result.stderr
    result = subprocess.run(nobody + [f'--workdir={base}/locked'], capture_output=True,
                            text=True, cwd=ROOT, env=env)
    assert 'workdir' in result.stderr and 'is not writable' in result.stderr
    result = subprocess.run(nobody + [f'--config.data.data_dir={base}/locked/tfds',
                                      f'--workdir={base}/w'], capture_output=True, text=True,
                            cwd=ROOT, env=env)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'cannot be created (Permission denied)' in result.stderr
  finally:
    shutil.rmtree(base, ignore_errors=True)


def test_signal_at_an_epoch_end_stops_after_its_checkpoint(data_dir, tmp_path, monkeypatch):
  from fmnist_jax.errors import Interrupted
  config = _config(data_dir)
  config.checkpoint_every_steps = 0  # Whole-epoch chunks: the signal lands at the epoch end.
  run_epoch_with_signal = trainer.device_epoch_runner

  def runner(run, state, train):
    run_epoch = run_epoch_with_signal(run, state, train)
    run.signals.received = 'SIGTERM'  # As if it arrived during the epoch's last chunk.
    return run_epoch

  monkeypatch.setattr(trainer, 'device_epoch_runner', runner)
  with pytest.raises(Interrupted, match='SIGTERM received: stopped at step 938 \\(epoch 1\\)'):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert len(_untimed(tmp_path)) == 1  # Not a step of epoch 2 ran.
  state, _ = restore_state(config, tmp_path)
  assert int(state.step) == 938
