"""Every moment and every value: Ctrl-C and SIGTERM from a command's first instruction, inputs that
are not files, and values bounded by what the run can hold.

Signals are sent at moments made certain, never raced: once the process shows (in /proc) that it
catches SIGTERM, or once a file it makes appears, the process is frozen with SIGSTOP, signalled,
and let go on (SIGCONT) from exactly there.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fmnist_jax import loop
from fmnist_jax import programs
from fmnist_jax.errors import UserError
from tests.conftest import ROOT, load_test_config, run_cli


def _catches_sigterm(pid: int) -> bool:
  """Whether the process has installed its own SIGTERM handler (its first instruction's)."""
  with open(f'/proc/{pid}/status') as f:
    caught = next(int(l.split()[1], 16) for l in f if l.startswith('SigCgt:'))
  return bool(caught & (1 << (signal.SIGTERM - 1)))


def _stop_when(proc, ready, sig, what: str, timeout: float = 300):
  """Freezes `proc` once `ready()`, sends `sig`, lets it go on; returns (stdout, stderr)."""
  deadline = time.monotonic() + timeout
  while not ready():
    assert proc.poll() is None, proc.communicate()
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.002)
  proc.send_signal(signal.SIGSTOP)
  proc.send_signal(sig)
  proc.send_signal(signal.SIGCONT)
  return proc.communicate(timeout=300)


def _start(*args, env=None):
  return subprocess.Popen([sys.executable, '-m', *args], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=dict(os.environ, **(env or {})))


def _assert_stopped(proc, err, sig):
  assert proc.returncode == 130, err[-3000:]
  assert 'Traceback' not in err and 'Fatal Python error' not in err, err[-3000:]
  (line,) = err.strip().splitlines()
  assert line == (f'error: {sig.name} received: stopped before anything was saved; run the same '
                  'command again to start over.'), line


def _run_files(workdir):
  return sorted(p.name for p in workdir.iterdir()) if workdir.exists() else []


def _train_args(data_dir, workdir, *extra):
  return ('fmnist_jax.train', '--config', 'configs/test.py', f'--config.data.data_dir={data_dir}',
          f'--workdir={workdir}', *extra)


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_start_up_stops_the_training_in_one_line(sig, data_dir, tmp_path):
  """Ctrl-C a moment after the command starts (imports still going): stopped, nothing written."""
  proc = _start(*_train_args(data_dir, tmp_path / 'w'))
  out, err = _stop_when(proc, lambda: _catches_sigterm(proc.pid), sig, 'the handlers')
  _assert_stopped(proc, err, sig)
  assert 'Epoch' not in out
  assert _run_files(tmp_path / 'w') in ([], ['.lock'])  # No config, metrics or checkpoint.


def test_a_signal_while_compiling_stops_before_anything_is_written(data_dir, tmp_path):
  """An empty compile cache of the test's own: once the train chunk, the first of the programs
  compiled together, lands in it, the others are still compiling when the signal comes. The
  compile returns, the command stops: no segmentation fault, nothing of the run written."""
  workdir, cache = tmp_path / 'w', tmp_path / 'cache'
  proc = _start(*_train_args(data_dir, workdir, f'--config.compile_cache_dir={cache}',
                             '--config.num_epochs=50'))
  compiling = lambda: cache.exists() and any(n.startswith('jit_train_chunk')
                                             for n in os.listdir(cache))
  _, err = _stop_when(proc, compiling, signal.SIGINT, 'the first compiled program')
  _assert_stopped(proc, err, signal.SIGINT)
  assert _run_files(workdir) == ['.lock']


def test_a_signal_while_preparing_the_data_leaves_nothing_half_made(source_dir, tmp_path):
  """Stopped while tfds prepares the dataset from the IDX files: one line, and the next run
  prepares it whole."""
  tfds_dir = tmp_path / 'tfds'
  args = ('fmnist_jax.explore', f'--workdir={tmp_path / "w"}', '--config', 'configs/test.py',
          f'--config.data.data_dir={tfds_dir}', f'--config.data.manual_dir={source_dir}')
  proc = _start(*args)
  preparing = lambda: any(n.startswith('incomplete') for n in (
      os.listdir(tfds_dir / 'fashion_mnist') if (tfds_dir / 'fashion_mnist').exists() else ()))
  _, err = _stop_when(proc, preparing, signal.SIGTERM, 'the preparation')
  _assert_stopped(proc, err, signal.SIGTERM)
  again = run_cli(*args, '--figures_dir', str(tmp_path / 'f'))
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'train_images.shape: (60000, 28, 28)' in again.stdout


@pytest.mark.parametrize('command', ['predict', 'export'])
def test_predict_and_export_stop_in_one_line(command, trained_workdir, tmp_path):
  args = {'predict': ('fmnist_jax.predict', f'--workdir={trained_workdir}', '--nofigures'),
          'export': ('fmnist_jax.export', '--config', 'configs/test.py', '--platforms=cpu',
                     f'--out={tmp_path / "e"}')}[command]
  proc = _start(*args)
  _, err = _stop_when(proc, lambda: _catches_sigterm(proc.pid), signal.SIGINT, 'the handlers')
  _assert_stopped(proc, err, signal.SIGINT)


def test_a_photo_that_is_not_a_file_is_refused_and_the_others_classified(trained_workdir, arrays,
                                                                          tmp_path):
  from PIL import Image
  fifo = tmp_path / 'f.jpg'
  os.mkfifo(fifo)
  photo = tmp_path / 'other.png'
  Image.fromarray(255 - arrays['test']['image'][0]).resize((112, 112)).save(photo)
  result = run_cli('fmnist_jax.predict', f'--workdir={trained_workdir}', '--nofigures', str(fifo),
                   str(photo), timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.strip().splitlines() == [
      f'error: {fifo} is a fifo, not a file; pass an image file.']
  assert result.stdout.startswith(f'{photo}: ')


@pytest.mark.parametrize('what', ['--platforms=cpu', '--tpu=v5e:1x1'])
def test_export_to_an_existing_file_is_one_line(tmp_path, what):
  """Both the export and the compile check (refused before it looks for libtpu)."""
  taken = tmp_path / 'taken'
  taken.write_text('mine')
  result = run_cli('fmnist_jax.export', '--config', 'configs/test.py', what, f'--out={taken}')
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines() == [
      f'error: output folder {taken} is a file, not a folder; choose another --out.']
  assert taken.read_text() == 'mine'


# Values bounded by the run ----------------------------------------------------------------------


def test_an_eval_batch_above_the_test_split_is_clamped(config, tmp_path):
  from fmnist_jax.plan import RunPlan
  config.eval_batch_size = 10_000_000
  assert RunPlan.create(config, 60_000, 10_000, 1).eval_batch_size == 10_000
  assert RunPlan.create(config, 60_000, 10_000, 8).eval_batch_size == 10_000  # 8 x 1,250.
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary['test_accuracy'] > 0.8


def test_learning_rates_with_one_model_are_used(config, tmp_path):
  """A field a config sets is used: learning_rates=(0.01,) with one model trains at 0.01."""
  config.learning_rates = (0.01,)
  given = loop.train_and_evaluate(config, str(tmp_path / 'rates'))
  config.learning_rates = ()
  config.learning_rate = 0.01
  same = loop.train_and_evaluate(config, str(tmp_path / 'rate'))
  config.learning_rate = 1e-3
  default = loop.train_and_evaluate(config, str(tmp_path / 'default'))
  assert given['train_loss'] == same['train_loss'] != default['train_loss']


def test_a_program_larger_than_the_device_is_refused_before_anything_is_written(
    config, tmp_path, monkeypatch):
  """XLA's own memory analysis of the compiled programs, against the device's memory (here made
  smaller than the epoch's shuffled data, which the arithmetic check of the sizes lets pass)."""
  from fmnist_jax import config as config_lib
  monkeypatch.setattr(config_lib, 'device_memory_bytes', lambda: 80 * 2**20)
  with pytest.raises(UserError, match=r'^does not fit: .*shuffle on cpu needs 0\.\d+ GiB of 0\.08 '
                     r'GiB per device; use a smaller batch_size'):
    loop.train_and_evaluate(config, str(tmp_path))
  assert _run_files(tmp_path) == ['.lock']


def test_compile_all_names_every_program_too_large():
  import jax
  from fmnist_jax.plan import ModelSpec, OptimizerSpec, RunPlan
  config = load_test_config()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  progs = programs.build(ModelSpec.from_config(config), OptimizerSpec.from_config(config),
                         RunPlan.create(config, 60_000, 10_000, 1), mesh)
  with pytest.raises(UserError) as refused:
    programs.compile_all({k: progs[k] for k in ('train_chunk', 'finite')}, memory_limit=1000)
  assert str(refused.value).count(' needs ') == 2 and '\n' not in str(refused.value)


# Minor cases ------------------------------------------------------------------------------------


def _one_line(result, expected: str):
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  (line,) = result.stderr.strip().splitlines()
  assert expected in line, line


@pytest.mark.parametrize('body, expected', [
    ('  return 42', "the --config file's get_config() returned int, not an "
                    'ml_collections.ConfigDict'),
    ('  config = config_lib.base()\n  config.batch_size = "many"\n  return config',
     "TypeError: Could not override field 'batch_size'"),
])
def test_broken_config_files_are_one_plain_line(body, expected, tmp_path):
  path = tmp_path / 'broken.py'
  path.write_text(f'from fmnist_jax import config as config_lib\n\ndef get_config():\n{body}\n')
  result = run_cli('fmnist_jax.train', '--config', str(path), f'--workdir={tmp_path / "w"}')
  _one_line(result, expected)
  assert 'File "' not in result.stderr  # No traceback flattened into the line.


@pytest.mark.parametrize('field, zero', [('check_every_steps', 'once per epoch'),
                                         ('checkpoint_every_steps', 'at epoch ends only'),
                                         ('profile_steps', 'off')])
def test_each_zero_says_what_it_means(field, zero):
  from fmnist_jax import config as config_lib
  config = load_test_config()
  config[field] = -3
  with pytest.raises(UserError, match=rf'^{field}=-3 must be 0 \({zero}\) or a positive number'):
    config_lib.validate_config(config)


def test_noise_is_not_called_one_colour(tmp_path):
  from PIL import Image
  from fmnist_jax.photos import images
  noise = tmp_path / 'noise.tif'
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400), np.uint8)).save(noise)
  blank = tmp_path / 'blank.png'
  Image.new('RGB', (90, 60), (240, 240, 240)).save(blank)
  for path, why in ((noise, 'as noise or a texture does'), (blank, 'the picture is one colour')):
    with pytest.raises(images.ImageFileError, match=why):
      images.load(str(path))


def test_an_unfinished_run_is_named_by_predict_and_export(data_dir, tmp_path):
  """predict and export say which checkpoint of an unfinished run they use, export that the run
  had another config than --config; a damaged one says to train with --fresh, which they lack."""
  workdir = tmp_path / 'w'
  first = run_cli('fmnist_jax.train', *_train_args(data_dir, workdir)[1:],
                  '--config.checkpoint_every_steps=500', '--config.num_epochs=2')
  assert first.returncode == 0, first.stderr[-3000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  (workdir / 'summary.json').unlink()
  kept, *newer = sorted(int(n) for n in os.listdir(workdir / 'checkpoints') if n.isdigit())
  for step in newer:  # Only the oldest checkpoint stays: an unfinished run.
    os.rename(workdir / 'checkpoints' / str(step), tmp_path / str(step))
  predicted = run_cli('fmnist_jax.predict', f'--workdir={workdir}', '--nofigures', '--json')
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  assert (f'note: predicting with the checkpoint at step {kept} of {workdir} (unfinished: '
          f'{kept:,} of 1,876 steps).') in predicted.stderr
  exported = run_cli('fmnist_jax.export', '--config', 'configs/base.py', '--platforms=cpu',
                     f'--workdir={workdir}', f'--out={tmp_path / "e"}')
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert f'the checkpoint at step {kept}' in exported.stdout and 'unfinished' in exported.stdout
  assert 'was trained with another config than --config' in exported.stdout
  for path in (workdir / 'checkpoints' / str(kept) / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(b'x')
  damaged = run_cli('fmnist_jax.predict', f'--workdir={workdir}', '--nofigures')
  _one_line(damaged, 'train with --fresh to start over')
  assert summary['steps'] == 1876


def test_a_run_of_an_earlier_version_is_read_and_an_unknown_field_refused(trained_workdir,
                                                                          tmp_path):
  """config.json of a run made before loop_unroll was retired still serves predict and export;
  a field no version knows is one line naming it."""
  import shutil
  workdir = tmp_path / 'old'
  shutil.copytree(trained_workdir, workdir)
  saved = json.loads((workdir / 'config.json').read_text())
  (workdir / 'config.json').write_text(json.dumps({**saved, 'loop_unroll': 4}))
  for args in (('fmnist_jax.predict', f'--workdir={workdir}', '--nofigures', '--json'),
               ('fmnist_jax.export', '--config', 'configs/test.py', '--platforms=cpu',
                f'--workdir={workdir}', f'--out={tmp_path / "e"}')):
    result = run_cli(*args)
    assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  (workdir / 'config.json').write_text(json.dumps({**saved, 'warp_factor': 9}))
  _one_line(run_cli('fmnist_jax.predict', f'--workdir={workdir}', '--nofigures'),
            'config.json holds fields this version does not know (warp_factor)')
