"""The command line: overrides, one-line errors with non-zero exits, no tracebacks."""

import json
import os

import pytest

from fmnist_jax import config as config_lib
from fmnist_jax.errors import UserError
from tests.conftest import ROOT, run_cli


def _assert_one_line_error(result, pattern, code=2):
  assert result.returncode == code, result.stderr
  assert 'Traceback' not in result.stderr
  lines = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, result.stderr
  assert pattern in lines[0], lines[0]


def test_overrides_reach_the_run(data_dir, tmp_path):
  result = run_cli('fmnist_jax.train', '--config', 'configs/test.py',
                   f'--config.data.data_dir={data_dir}', '--config.batch_size=120',
                   '--config.hidden_sizes=(40,)', '--config.progress=True',
                   f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['batch_size'] == 120 and summary['steps'] == 500
  assert summary['param_count'] == 784 * 40 + 40 + 40 * 10 + 10
  assert 'Epoch 1/1 500/500' in result.stdout and 'test_accuracy:' in result.stdout
  assert 'Test accuracy: 0.8' in result.stdout


@pytest.mark.parametrize('args, message', [
    (['--config.num_epoch=3'], 'unknown config field \'num_epoch\' in a --config.* override; '
                               'Did you mean "num_epochs" instead of "num_epoch"?'),
    (['--config.data.data_di=x'], 'unknown config field \'data_di\' in a --config.* override; '
                                  'Did you mean "data_dir" instead of "data_di"?'),
    (['--config.batch_size=0'], 'batch_size=0 must be a positive number'),
    (['--config.num_epochs=-1'], 'num_epochs=-1 must be a positive number'),
    (['--config.learning_rate=0'], 'learning_rate=0'),
    (['--config.batch_size=70000'], 'larger than the training set'),
    (['--config.input_mode=streaming'], "unknown input_mode 'streaming'"),
    (['--config.model=cnn'], "unknown model 'cnn'"),
    (['--config.num_epochs=abc'], 'flag --config.num_epochs=abc'),
    (['--config.seed=100000000000000000000000'], 'seed=100000000000000000000000 must be'),
    (['--config.learning_rate=nan'], 'learning_rate=nan must be a finite number above 0'),
    (['--config.learning_rate=inf'], 'learning_rate=inf must be a finite number above 0'),
    (['--config.b1=nan'], 'b1=nan must be a number from 0 up to (not including) 1'),
    (['--config.eps=0'], 'eps=0.0 must be a finite number above 0'),
])
def test_bad_config_is_one_line(args, message, tmp_path):
  result = run_cli('fmnist_jax.train', '--config', 'configs/base.py', *args,
                   f'--workdir={tmp_path / "w"}')
  _assert_one_line_error(result, message)
  assert not (tmp_path / 'w').exists()  # Rejected before anything was written.


def test_missing_and_broken_config_files(tmp_path):
  _assert_one_line_error(run_cli('fmnist_jax.train', '--config', 'configs/nope.py'),
                         'config file not found')
  broken = tmp_path / 'broken.py'
  broken.write_text('x = 1\n')
  _assert_one_line_error(run_cli('fmnist_jax.train', '--config', str(broken)),
                         'has no get_config()')
  _assert_one_line_error(run_cli('fmnist_jax.train'), '--config is required')


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / 'file'
  path.write_text('keep me')
  result = run_cli('fmnist_jax.train', '--config', 'configs/test.py', f'--workdir={path}')
  _assert_one_line_error(result, 'is a file, not a folder')
  assert path.read_text() == 'keep me'



def test_missing_data_says_how_to_get_it(tmp_path):
  result = run_cli('fmnist_jax.train', '--config', 'configs/test.py',
                   f'--config.data.data_dir={tmp_path / "tfds"}',
                   f'--config.data.manual_dir={tmp_path}', f'--workdir={tmp_path / "w"}')
  _assert_one_line_error(result, 'does not hold the four Fashion-MNIST IDX .gz files')


def test_divergence_exit_code(data_dir, tmp_path):
  result = run_cli('fmnist_jax.train', '--config', 'configs/test.py',
                   f'--config.data.data_dir={data_dir}', '--config.learning_rate=1e30',
                   f'--workdir={tmp_path}')
  _assert_one_line_error(result, 'non-finite loss or parameters at epoch 1', code=3)


@pytest.mark.parametrize('field, value, message', [
    ('hidden_sizes', (0,), 'hidden_sizes=(0,) must be positive integers'),
    ('num_classes', 5, 'Fashion-MNIST has 10 classes'),
    ('compute_dtype', 'float16', "unknown compute_dtype 'float16'"),
    ('check_every_steps', -1, 'check_every_steps=-1 must be 0'),
    ('profile_steps', -1, 'profile_steps=-1 must be 0'),
    ('checkpoint_every_steps', True, 'checkpoint_every_steps=True must be 0'),
    ('eval_batch_size', 0, 'eval_batch_size=0'),
])
def test_validate_config(field, value, message):
  config = config_lib.base()
  config[field] = value
  with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')):
    config_lib.validate_config(config)


def test_learning_rates_must_match_num_models():
  config = config_lib.base()
  config.num_models = 3
  config.learning_rates = (1e-3, 2e-3)
  with pytest.raises(UserError, match='learning_rates has 2 values for num_models=3'):
    config_lib.validate_config(config)
  config.learning_rates = (1e-3, 2e-3, 3e-3)
  config_lib.validate_config(config)


def _broken_manual_dir(folder, source_dir, problem):
  """The real IDX files with one problem injected into the small test split."""
  import gzip
  import shutil
  import numpy as np
  from fmnist_jax.data import idx
  shutil.copytree(source_dir, folder)
  images_name, labels_name, _ = idx.FILES['test']
  images, labels = idx.load_split(source_dir, 'test')
  if problem == 'wrong magic':
    idx.write(str(folder / labels_name), images)  # An images file where labels belong.
  elif problem == 'counts disagree':
    idx.write(str(folder / labels_name), labels[:-1].astype(np.uint8))
  elif problem == 'label out of range':
    bad = labels.astype(np.uint8)
    bad[7] = 11
    idx.write(str(folder / labels_name), bad)
  elif problem == 'truncated':
    data = (folder / images_name).read_bytes()
    (folder / images_name).write_bytes(data[:len(data) // 2])
  elif problem == 'not gzip':
    (folder / images_name).write_bytes(gzip.decompress((folder / images_name).read_bytes()))
  return folder


@pytest.mark.parametrize('problem, message', [
    ('wrong magic', 't10k-labels-idx1-ubyte.gz: wrong IDX magic number'),
    ('counts disagree', 'test split has 10000 images but 9999 labels'),
    ('label out of range', 't10k-labels-idx1-ubyte.gz: label 11 outside 0-9'),
    ('truncated', 't10k-images-idx3-ubyte.gz: truncated or corrupt gzip'),
])
def test_bad_data_files_are_one_line(problem, message, source_dir, tmp_path):
  manual = _broken_manual_dir(tmp_path / 'manual', source_dir, problem)
  result = run_cli('fmnist_jax.train', '--config', 'configs/test.py',
                   f'--config.data.data_dir={tmp_path / "tfds"}',
                   f'--config.data.manual_dir={manual}', f'--workdir={tmp_path / "w"}')
  _assert_one_line_error(result, message)
  assert not (tmp_path / 'tfds' / 'fashion_mnist' / '3.0.1').exists()  # Nothing half-prepared.


def test_default_workdir_names_what_differs_from_the_config_file():
  config = config_lib.base()
  config.input_mode = 'tfds'
  config.hidden_sizes = (256, 128)
  config.num_epochs = 4
  config.progress = False  # Display, data places and host settings never name a folder.
  config.data.data_dir = '/x'
  config.checkpoint_every_steps = 100
  assert config_lib.default_workdir('configs/base.py', config, 1, 1) == (
      'workdirs/base,hidden_sizes=256_128,input_mode=tfds,num_epochs=4')
  same = config_lib.base()
  same.learning_rate = float('1e-3')  # Equal to the file's 0.001, however it is spelt.
  assert config_lib.default_workdir('configs/base.py', same, 1, 1) == 'workdirs/base'
  assert config_lib.default_workdir('configs/test.py', config_lib.load(
      'configs/test.py'), 8, 2) == 'workdirs/test,8devices,2processes'


def test_every_config_field_has_a_role():
  from fmnist_jax import config as config_lib
  assert set(config_lib.flat(config_lib.base())) == set(config_lib.ROLES)


def test_equal_overrides_share_one_workdir(data_dir, tmp_path):
  """1e-3, 0.001 and an override equal to the file's value all land in workdirs/test."""
  base = ['fmnist_jax.train', '--config', f'{ROOT}/configs/test.py',
          f'--config.data.data_dir={data_dir}']
  outputs = []
  for override in ('--config.learning_rate=1e-3', '--config.learning_rate=0.001',
                   '--config.num_epochs=1'):
    result = run_cli(*base, override, cwd=str(tmp_path), env={'PYTHONPATH': ROOT})
    assert result.returncode == 0, result.stderr[-2000:]
    outputs.append(result.stdout)
  assert os.listdir(tmp_path / 'workdirs') == ['test']
  # configs/test.py turns progress off: no epoch lines, but the result line all the same.
  assert outputs[0].startswith('Test accuracy: 0.8') and 'Epoch' not in outputs[0]
  assert 'holds a finished run' in outputs[1] and 'Test accuracy: 0.8' in outputs[1]


def test_a_run_in_one_place_and_quiet(data_dir, tmp_path):
  """Without --workdir: the derived folder; the rerun says first that it holds a finished run;
  another device count cannot resume it; nothing but the run's own lines is printed, TensorFlow
  imported (tfds mode) or not."""
  args = ['fmnist_jax.train', '--config', f'{ROOT}/configs/test.py',
          f'--config.data.data_dir={data_dir}', '--config.progress=True',
          '--config.input_mode=tfds']
  env = {'PYTHONPATH': ROOT}
  two_devices = {**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  first = run_cli(*args, cwd=str(tmp_path), env=env)
  assert first.returncode == 0, first.stderr[-2000:]
  assert first.stderr == ''  # No TensorFlow, absl or oneDNN start-up lines.
  workdir = tmp_path / 'workdirs' / 'test,input_mode=tfds'
  assert (workdir / 'summary.json').exists()
  again = run_cli(*args, cwd=str(tmp_path), env=env)
  assert again.returncode == 0 and again.stderr == ''
  assert again.stdout.startswith(f'{workdir} holds a finished run of 938 steps on 1 cpu '
                                 'device(s); not retraining')
  moved = run_cli(*args, f'--workdir={workdir}', cwd=str(tmp_path), env=two_devices)
  _assert_one_line_error(moved, 'devices (checkpoint 1, now 2)')
