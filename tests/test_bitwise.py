"""Bitwise by construction: however a run is cut (checks, checkpoints, profiling, host chunks, a
SIGKILL or a SIGTERM and a rerun), its losses and every array of its final state are the bits of
the same run in whole epochs."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fmnist_jax import loop
from tests.conftest import load_test_config, restore_state, ROOT, run_cli

EPOCHS = 2
TIMED = {'seconds', 'steps_per_second'}


def _config(data_dir, input_mode='device', **overrides):
  config = load_test_config()
  config.data.data_dir = data_dir
  config.num_epochs = EPOCHS
  config.input_mode = input_mode
  for name, value in overrides.items():
    config[name] = value
  return config


def _untimed(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if k not in TIMED} for l in lines]


def assert_same_bits(workdir, whole, input_mode='device'):
  """The run in `workdir` ended with the bits of the whole-epoch run in `whole`."""
  config = _config('', input_mode)
  a, _ = restore_state(config, workdir)
  b, _ = restore_state(config, whole)
  assert int(a.step) == int(b.step) == EPOCHS * 938
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  assert _untimed(workdir) == _untimed(whole)
  sa = json.loads((workdir / 'summary.json').read_text())
  sb = json.loads((whole / 'summary.json').read_text())
  for key in ('train_loss', 'test_loss', 'train_accuracy', 'test_accuracy', 'steps'):
    assert sa[key] == sb[key], key


@pytest.fixture(scope='module')
def whole(tmp_path_factory, data_dir):
  """Uninterrupted runs in whole epochs (device mode: one compiled call per epoch; stream mode:
  the default host chunks), by input mode."""
  runs = {}
  for mode in ('device', 'stream'):
    runs[mode] = tmp_path_factory.mktemp(f'whole_{mode}')
    loop.train_and_evaluate(_config(data_dir, mode), str(runs[mode]))
  return runs


@pytest.mark.parametrize('input_mode, overrides', [
    ('device', {'check_every_steps': 1}),
    ('device', {'check_every_steps': 37}),
    ('device', {'check_every_steps': 100}),
    ('device', {'checkpoint_every_steps': 37}),
    ('device', {'checkpoint_every_steps': 300}),
    ('device', {'checkpoint_every_steps': 1000, 'check_every_steps': 7}),
    ('device', {'profile_steps': 50}),
    ('stream', {'check_every_steps': 37}),
    ('stream', {'stream_chunk_steps': 100, 'checkpoint_every_steps': 300}),
    ('stream', {'stream_chunk_steps': 1}),
], ids=lambda v: v if isinstance(v, str) else ','.join(f'{k}={x}' for k, x in v.items()))
def test_cut_runs_are_the_whole_run_bitwise(input_mode, overrides, whole, data_dir, tmp_path):
  loop.train_and_evaluate(_config(data_dir, input_mode, **overrides), str(tmp_path))
  assert_same_bits(tmp_path, whole[input_mode], input_mode)


def _args(data_dir, workdir, input_mode, epochs=EPOCHS):
  return ['--config', 'configs/test.py', f'--config.data.data_dir={data_dir}',
          f'--config.num_epochs={epochs}', '--config.checkpoint_every_steps=50',
          f'--config.input_mode={input_mode}', f'--workdir={workdir}']


def _stop_after_a_checkpoint(proc, workdir, sig, at_least=150):
  """Freezes the process (SIGSTOP) once a checkpoint of step >= at_least is on disk (orbax
  renames it into place whole), then sends `sig` and lets it go on to act on it."""
  folder = workdir / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline:
    done = [int(n) for n in (os.listdir(folder) if folder.exists() else []) if n.isdigit()]
    if done and max(done) >= at_least:
      proc.send_signal(signal.SIGSTOP)
      proc.send_signal(sig)
      proc.send_signal(signal.SIGCONT)
      return proc.communicate(timeout=120)[1]
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.005)
  raise AssertionError('no checkpoint appeared')


@pytest.mark.parametrize('sig, input_mode', [
    (signal.SIGKILL, 'device'), (signal.SIGKILL, 'stream'), (signal.SIGTERM, 'device'),
    (signal.SIGTERM, 'stream'), (signal.SIGINT, 'device')], ids=lambda v: getattr(v, 'name', v))
def test_stopped_and_rerun_is_the_whole_run_bitwise(sig, input_mode, whole, data_dir, tmp_path):
  """Stopped after a mid-epoch checkpoint (checkpoints every 50 steps: the rerun starts inside an
  epoch and inside a host chunk), then run again. The first run is asked for 100 epochs (the
  epoch count only says how long to train, and may change on resume), so the signal lands long
  before its end whatever the machine's speed; the rerun asks for the reference's 2. SIGTERM and
  SIGINT save a checkpoint where they stop and say so in one line."""
  proc = subprocess.Popen([sys.executable, '-m', 'fmnist_jax.train',
                           *_args(data_dir, tmp_path, input_mode, epochs=100)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  err = _stop_after_a_checkpoint(proc, tmp_path, sig)
  state, _ = restore_state(_config(data_dir, input_mode), tmp_path)
  assert 150 <= int(state.step) < EPOCHS * 938 and int(state.step) % 938
  if sig == signal.SIGKILL:
    assert proc.returncode == -signal.SIGKILL
  else:
    assert proc.returncode == 130 and 'Traceback' not in err, err[-2000:]
    (message,) = [l for l in err.splitlines() if l.startswith('error: ')]
    assert f'{sig.name} received: stopped at step {int(state.step)} ' in message
    assert message.endswith('run the same command again to resume.')
  result = run_cli('fmnist_jax.train', *_args(data_dir, tmp_path, input_mode),
                   '--config.progress=True')
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'Resuming from the checkpoint at step {int(state.step)}' in result.stdout
  assert_same_bits(tmp_path, whole[input_mode], input_mode)
