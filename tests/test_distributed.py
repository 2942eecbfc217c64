"""Several devices and processes on the CPU, bf16, and many models at once."""

import json
import socket

import numpy as np
import pytest


from fmnist_jax import trainer
from tests.conftest import load_test_config, restore_state, run_cli


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _train_args(data_dir, workdir, *extra):
  return ('fmnist_jax.train', '--config', 'configs/test.py', f'--config.data.data_dir={data_dir}',
          f'--workdir={workdir}', *extra)


@pytest.fixture(scope='module')
def one_device(tmp_path_factory, data_dir):
  config = load_test_config()
  config.data.data_dir = data_dir
  return trainer.train_and_evaluate(config, str(tmp_path_factory.mktemp('one')))


def _assert_same_run(a, b):
  """Equal up to floating-point reassociation (the global batch is summed in another order)."""
  assert a['steps'] == b['steps']
  assert a['test_loss'] == pytest.approx(b['test_loss'], rel=2e-3)
  assert a['train_loss'] == pytest.approx(b['train_loss'], rel=2e-3)
  assert abs(a['test_accuracy'] - b['test_accuracy']) <= 0.005


def test_eight_devices_match_one(one_device, data_dir, tmp_path):
  result = run_cli(*_train_args(data_dir, tmp_path),
                   env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['devices'] == 8 and summary['processes'] == 1
  _assert_same_run(summary, one_device)


def test_eight_devices_tfds_mode(one_device, data_dir, tmp_path):
  result = run_cli(*_train_args(data_dir, tmp_path, '--config.input_mode=tfds'),
                   env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['devices'] == 8 and summary['test_accuracy'] >= 0.80


def test_batch_must_divide_over_devices(data_dir, tmp_path):
  result = run_cli(*_train_args(data_dir, tmp_path, '--config.batch_size=60'),
                   env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert ('error: batch_size=60 does not divide over 8 devices; use a multiple of 8, e.g. '
          '--config.batch_size=56 or 64.') in result.stderr


def test_two_processes_train_together(one_device, data_dir, tmp_path):
  import os
  import subprocess
  import sys
  port = _free_port()
  procs = []
  for rank in range(2):
    args = _train_args(data_dir, tmp_path, f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                       '--config.distributed.num_processes=2',
                       f'--config.distributed.process_id={rank}', '--config.progress=True')
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
               TF_CPP_MIN_LOG_LEVEL='3')
    procs.append(subprocess.Popen([sys.executable, '-m', *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env))
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['devices'] == 4 and summary['processes'] == 2
  _assert_same_run(summary, one_device)
  # Only process 0 reports (and writes summaries, metrics and figures).
  assert 'Test accuracy' in outputs[0][0] and 'Test accuracy' not in outputs[1][0]


def test_bfloat16_stays_within_a_point(one_device, config, tmp_path):
  config.compute_dtype = 'bfloat16'
  summary = trainer.train_and_evaluate(config, str(tmp_path))
  assert summary['compute_dtype'] == 'bfloat16'
  assert abs(summary['test_accuracy'] - one_device['test_accuracy']) <= 0.01
  state, _ = restore_state(config, tmp_path)
  import jax
  assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))} == {
      np.dtype('float32'), np.dtype('int32')}  # f32 parameters and Adam moments (int count).


def test_many_models_at_once(one_device, config, tmp_path):
  config.num_models = 3
  config.learning_rates = (1e-3, 2e-3, 5e-4)
  summary = trainer.train_and_evaluate(config, str(tmp_path))
  models = summary['models']
  assert summary['num_models'] == 3 and models['seeds'] == [0, 1, 2]
  assert models['learning_rates'] == [1e-3, 2e-3, 5e-4]
  per_model = json.loads((tmp_path / 'metrics.jsonl').read_text())['per_model']['test_accuracy']
  assert len(per_model) == 3 and len(set(per_model)) == 3  # Independent models.
  assert models['test_accuracy_min'] == min(per_model)
  assert models['test_accuracy_max'] == max(per_model)
  assert models['test_accuracy_mean'] == pytest.approx(np.mean(per_model))
  assert models['test_accuracy_std'] == pytest.approx(np.std(per_model))
  assert models['ensemble_test_accuracy'] >= models['test_accuracy_min']
  assert summary['param_count'] == one_device['param_count']
  # Model 0 has the single-model run's seed and learning rate: the same training, vmapped.
  assert per_model[0] == pytest.approx(one_device['test_accuracy'], abs=0.005)
