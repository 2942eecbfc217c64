"""Several devices and processes on the CPU, bf16, and many models at once."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax

import numpy as np
import pytest


from fmnist_jax import loop
from tests.conftest import ROOT, load_test_config, restore_state, run_cli


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# Batch 256 (235 steps an epoch) in this module: a step across processes or eight simulated
# devices costs far more than its arithmetic on this CPU, and what is compared needs no more.
BATCH = 256
STEPS = -(-60_000 // BATCH)


def _train_args(data_dir, workdir, *extra):
  return ('fmnist_jax.train', '--config', 'configs/test.py', f'--config.data.data_dir={data_dir}',
          f'--workdir={workdir}', f'--config.batch_size={BATCH}', *extra)


@pytest.fixture
def config(config):  # pylint: disable=redefined-outer-name
  config.batch_size = BATCH
  return config


@pytest.fixture(scope='module')
def one_device(tmp_path_factory, data_dir):
  """The one-device run (batch 256) the others are compared with: its summary, and 'workdir'."""
  config = load_test_config()
  config.data.data_dir = data_dir
  config.batch_size = BATCH
  workdir = tmp_path_factory.mktemp('one')
  return {**loop.train_and_evaluate(config, str(workdir)), 'workdir': workdir}


def _assert_same_run(a, b):
  """Equal up to floating-point reassociation (the global batch is summed in another order; 235
  steps amplify that to about 0.2% in the test loss, a real mis-wiring to far more)."""
  assert a['steps'] == b['steps']
  assert a['test_loss'] == pytest.approx(b['test_loss'], rel=5e-3)
  assert a['train_loss'] == pytest.approx(b['train_loss'], rel=2e-3)
  assert abs(a['test_accuracy'] - b['test_accuracy']) <= 0.005


def test_eight_devices_match_one(one_device, data_dir, tmp_path):
  result = run_cli(*_train_args(data_dir, tmp_path),
                   env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['devices'] == 8 and summary['processes'] == 1
  _assert_same_run(summary, one_device)


def test_eight_devices_tfds_mode(data_dir, tmp_path):
  """The tfds mode's batches split over 8 devices: the same run as on one device."""
  config = load_test_config()
  config.data.data_dir = data_dir
  config.batch_size = BATCH
  config.input_mode = 'tfds'
  one = loop.train_and_evaluate(config, str(tmp_path / 'one'))
  result = run_cli(*_train_args(data_dir, tmp_path / 'eight', '--config.input_mode=tfds'),
                   env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((tmp_path / 'eight' / 'summary.json').read_text())
  assert summary['devices'] == 8 and summary['input_mode'] == one['input_mode'] == 'tfds'
  _assert_same_run(summary, one)


def test_batch_must_divide_over_devices(data_dir, tmp_path):
  result = run_cli(*_train_args(data_dir, tmp_path, '--config.batch_size=60'),
                   env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert ('error: batch_size=60 does not divide over 8 devices; use a multiple of 8, e.g. '
          '--config.batch_size=56 or 64.') in result.stderr


def _start_two_processes(data_dir, workdir, *extra):
  port = _free_port()
  procs = []
  for rank in range(2):
    args = _train_args(data_dir, workdir,
                       f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                       '--config.distributed.num_processes=2',
                       f'--config.distributed.process_id={rank}', '--config.progress=True', *extra)
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
               TF_CPP_MIN_LOG_LEVEL='3')
    procs.append(subprocess.Popen([sys.executable, '-m', *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
  return procs


EVERY = 50  # Chunk length (and checkpoint interval) of the two-process runs.


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory, data_dir):
  """An uninterrupted two-process run: (workdir, stdouts)."""
  workdir = tmp_path_factory.mktemp('two')
  procs = _start_two_processes(data_dir, workdir, f'--config.checkpoint_every_steps={EVERY}')
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return workdir, [out for out, _ in outputs]


def test_two_processes_train_together(one_device, two_processes):
  workdir, stdouts = two_processes
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['devices'] == 4 and summary['processes'] == 2
  _assert_same_run(summary, one_device)
  # Only process 0 reports (and writes summaries, metrics and figures).
  assert 'Test accuracy' in stdouts[0] and 'Test accuracy' not in stdouts[1]


def _finish_two_processes(data_dir, workdir, *extra):
  for p in _start_two_processes(data_dir, workdir, f'--config.checkpoint_every_steps={EVERY}',
                                *extra):
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]


def test_sigterm_to_one_process_stops_both_at_the_same_step(data_dir, two_processes, tmp_path):
  """Only process 1 is signalled: both agree at the next chunk boundary, save the same step and
  exit 130; the resumed run is bitwise identical to the uninterrupted one. The signalled run is
  asked for 100 epochs (the epoch count may change on resume), so the signal lands mid-run however
  fast the machine; the resume asks for the epochs that hold the stop, and is compared with an
  uninterrupted run as long (the module's one-epoch run when the stop is in epoch 1)."""
  reference, _ = two_processes
  workdir = tmp_path / 'run'
  procs = _start_two_processes(data_dir, workdir, f'--config.checkpoint_every_steps={EVERY}',
                               '--config.num_epochs=100')
  folder = workdir / 'checkpoints'
  deadline = time.time() + 300  # A hang guard, not a measure of speed.
  while not (folder.exists() and any(n.isdigit() for n in os.listdir(folder))):
    assert time.time() < deadline and all(p.poll() is None for p in procs), 'no checkpoint'
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300) for p in procs]
  stopped = []
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 130, err[-3000:]
    assert 'Traceback' not in err
    stopped.append(int(re.search(r'stopped at step (\d+)', err).group(1)))
  assert stopped[0] == stopped[1] < 100 * STEPS
  assert 'SIGTERM received' in outputs[1][1]
  config = load_test_config()
  state, _ = restore_state(config, workdir)
  assert int(state.step) == stopped[0]
  epochs = -(-stopped[0] // STEPS)
  if epochs > 1:
    reference = tmp_path / 'reference'
    _finish_two_processes(data_dir, reference, f'--config.num_epochs={epochs}')
  _finish_two_processes(data_dir, workdir, f'--config.num_epochs={epochs}')
  a, _ = restore_state(config, workdir)
  b, _ = restore_state(config, reference)
  assert int(a.step) == int(b.step) == epochs * STEPS
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bfloat16_stays_within_a_point(one_device, config, tmp_path):
  config.compute_dtype = 'bfloat16'
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary['compute_dtype'] == 'bfloat16'
  assert abs(summary['test_accuracy'] - one_device['test_accuracy']) <= 0.01
  state, _ = restore_state(config, tmp_path)
  assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))} == {
      np.dtype('float32'), np.dtype('int32')}  # f32 parameters and Adam moments (int count).


def _numpy_probs(params, images) -> np.ndarray:
  """Softmax of the MLP's logits in float64 numpy: [models, N, classes], from the checkpoint's
  parameters (a leading model axis) with none of the trainer's code."""
  x = images.reshape(len(images), -1).astype(np.float64) / 255
  layers = [params['hidden'][i] for i in range(len(params['hidden']))] + [params['out']]
  probs = []
  for k in range(np.asarray(layers[0]['kernel'][...]).shape[0]):
    h = x
    for i, layer in enumerate(layers):
      h = h @ np.asarray(layer['kernel'][...][k], np.float64) + np.asarray(layer['bias'][...][k])
      h = np.maximum(h, 0) if i < len(layers) - 1 else h
    e = np.exp(h - h.max(axis=1, keepdims=True))
    probs.append(e / e.sum(axis=1, keepdims=True))
  return np.stack(probs)


def test_many_models_at_once(one_device, config, arrays, tmp_path):
  """Three vmapped models: model 0 is the single-model run (same seed and learning rate) up to
  rounding, model 1 another run altogether; the reported accuracies, their spread and the ensemble
  (the mean of the models' probabilities) are those of the saved parameters, recomputed here."""
  config.num_models = 3
  config.learning_rates = (1e-3, 2e-3, 5e-4)
  summary = loop.train_and_evaluate(config, str(tmp_path / 'three'))
  models = summary['models']
  assert summary['num_models'] == 3 and models['seeds'] == [0, 1, 2]
  assert models['learning_rates'] == [1e-3, 2e-3, 5e-4]
  assert summary['param_count'] == one_device['param_count']
  per_model = json.loads((tmp_path / 'three' / 'metrics.jsonl').read_text())['per_model']
  # Model 0 is the same training, vmapped: its parameters differ from the single run's by rounding
  # (7e-7 measured), the next model's by 0.3.
  three, _ = restore_state(config, tmp_path / 'three')
  single_config = config.copy_and_resolve_references()
  single_config.num_models, single_config.learning_rates = 1, ()
  single, _ = restore_state(single_config, one_device['workdir'])
  for x, y in zip(jax.tree.leaves(single.params), jax.tree.leaves(three.params)):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(y[0], x, rtol=0, atol=1e-4)
    assert np.abs(y[1] - x).max() > 1e-2
  assert per_model['test_loss'][0] == pytest.approx(one_device['test_loss'], rel=1e-4)
  # Each model's accuracy and the ensemble's, from the saved parameters by numpy (float64):
  # within 2 of the 10,000 test images of what the run reported.
  test = arrays['test']
  probs = _numpy_probs(three.params, test['image'])
  accuracies = (probs.argmax(axis=2) == test['label']).mean(axis=1)
  np.testing.assert_allclose(per_model['test_accuracy'], accuracies, rtol=0, atol=2e-4)
  assert len(set(per_model['test_accuracy'])) == 3  # Independent models.
  for name, value in (('min', accuracies.min()), ('max', accuracies.max()),
                      ('mean', accuracies.mean()), ('std', accuracies.std())):
    assert models[f'test_accuracy_{name}'] == pytest.approx(value, abs=2e-4), name
  ensemble = (probs.mean(axis=0).argmax(axis=1) == test['label']).mean()
  assert models['ensemble_test_accuracy'] == pytest.approx(ensemble, abs=2e-4)


# Libraries' own messages, kept back by every command unless --verbosity asks for them.

_NOISY_COMMAND = """
import os, sys, time, types
from fmnist_jax import cli, distributed

def main(argv):
  import jax
  real = jax.default_backend
  def noisy():  # What libtpu prints from C++ on a machine without a TPU.
    os.write(2, b'E0000 common_lib.cc:554] unexpected worker hostname\\n')
    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to '
                b'STDERR\\n')
    return real()
  jax.default_backend = noisy
  distributed._ACCELERATOR_PACKAGES = (('json', 'TPU'),)  # An installed module stands in: libtpu.
  config = types.SimpleNamespace(coordinator_address='', num_processes=0, process_id=-1)
  distributed.initialize(config)
  distributed.initialize(config)  # train.py and the trainer both call it: one line all the same.
  print('before', flush=True)
  os.write(1, b'[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer '
              b'ranks is : 1\\n')
  for piece in (b'[Gloo] Rank ', b'[Gloo] Rank 3', b' is connected to 3 peer ranks. Expected '
                b'number of connected peer ranks is : 3\\n2', b' is connected to 3 peer ranks. '
                b'Expected number of connected peer ranks is : 3\\n'):
    os.write(2, piece)  # Two threads' unbuffered pieces, interleaved.
  print('Downloading and preparing dataset 29.45 MiB (download: 29.45 MiB) to /tmp/x...')
  os.write(2, b'W1206 05:12:33.123456 1234 cuda_dnn.cc:45] a native warning\\n')
  sys.stdout.write('progress 1\\r'); sys.stdout.flush(); time.sleep(0.2)
  print('progress 2')
  print(real())
  print('error: one line', file=sys.stderr)

cli.run(main)
"""


def _run(*args):
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  result = subprocess.run([sys.executable, '-c', *args], capture_output=True, env=env, cwd=ROOT,
                          check=True)
  result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()  # Keeps '\r'.
  return result


def test_frameworks_are_quiet_unless_verbose():
  """Every command keeps the frameworks' own lines back (libtpu's, Gloo's, even in pieces, XLA's,
  tfds's banners) and passes its own, a progress bar's '\\r' included; --verbosity=0 shows all."""
  quiet = _run(_NOISY_COMMAND)
  assert quiet.stdout == 'before\nprogress 1\rprogress 2\ncpu\n'
  assert quiet.stderr.splitlines() == [
      'warning: no TPU could be used; running on the CPU (--verbosity=0 shows why).',
      'error: one line']
  loud = _run(_NOISY_COMMAND, '--verbosity=0')
  for line in ('unexpected worker hostname', 'is connected to 3 peer ranks', 'a native warning',
               'warning: no TPU could be used'):
    assert line in loud.stderr
  assert 'Downloading and preparing dataset' in loud.stdout


def test_a_crash_still_says_its_last_words_and_a_closed_reader_holds_nothing_up():
  """The copier is a process of its own: a command that aborts right after a fatal line still
  shows it; a reader that stops early (`| head`) neither blocks the command nor prints a
  traceback."""
  crash = """
import os, sys
from fmnist_jax import cli
def main(argv):
  os.write(2, b'W1206 05:12:33.123456 1234 noise.cc:1] dropped\\n')
  os.write(2, b'F1206 05:12:33.123456 1234 check.cc:9] Check failed: the last words\\n')
  os.abort()
cli.run(main)
"""
  result = subprocess.run([sys.executable, '-c', crash], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
  assert result.returncode == -signal.SIGABRT
  assert 'Check failed: the last words' in result.stderr and 'dropped' not in result.stderr
  chatty = """
import sys
from fmnist_jax import cli
def main(argv):
  for i in range(100_000):
    print(f'line {i}')
cli.run(main)
"""
  head = subprocess.run(f'{sys.executable} -c "$CODE" | head -n 2', shell=True, cwd=ROOT,
                        capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, CODE=chatty))
  assert head.stdout == 'line 0\nline 1\n' and 'Traceback' not in head.stderr, head.stderr
