"""End-to-end training on the real data (shrunk config), determinism, both input modes."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from fmnist_jax import loop, metrics, programs
from fmnist_jax.errors import DivergenceError, UserError
from tests.conftest import initial_state, load_test_config, restore_state, run_cli

SUMMARY_KEYS = {'test_accuracy', 'test_loss', 'train_accuracy', 'train_loss', 'epochs', 'steps',
                'batch_size', 'train_seconds', 'compile_seconds', 'data_seconds',
                'startup_seconds', 'total_seconds', 'compile_cache_hit', 'steps_per_second',
                'examples_per_second', 'backend', 'devices', 'seed'}


def assert_nested_times(summary):
  """The times are disjoint stretches of one process, in order: data loading inside the start-up,
  then compilation, then training, all inside the total. Relations only, never a speed."""
  assert 0 < summary['data_seconds'] <= summary['startup_seconds']
  assert summary['compile_seconds'] > 0 and summary['train_seconds'] > 0
  assert (summary['startup_seconds'] + summary['compile_seconds'] + summary['train_seconds']
          <= summary['total_seconds'])


@pytest.fixture(scope='module')
def device_run(tmp_path_factory, data_dir):
  config = load_test_config()
  config.data.data_dir = data_dir
  workdir = tmp_path_factory.mktemp('device_run')
  return config, workdir, loop.train_and_evaluate(config, str(workdir))


def test_one_epoch_on_real_data(device_run):
  config, workdir, summary = device_run
  assert summary['test_accuracy'] >= 0.80
  assert 0 < summary['test_loss'] < 0.6
  assert SUMMARY_KEYS <= set(summary)
  assert summary['steps'] == 938 == summary['steps_run']  # ceil(60000 / 64): nothing dropped.
  assert summary['batch_size'] == 64 and summary['epochs'] == 1
  assert summary['param_count'] == 784 * 96 + 96 + 96 * 10 + 10
  assert summary['devices'] == jax.device_count() and summary['backend'] == 'cpu'
  assert_nested_times(summary)
  assert summary['compile_cache_hit'] in (True, False)  # The session's cache is on.
  assert summary['steps_run'] == 938
  assert summary['steps_per_second'] == pytest.approx(938 / summary['train_seconds'])
  assert summary['examples_per_second'] == pytest.approx(64 * summary['steps_per_second'])
  with open(workdir / 'summary.json') as f:
    assert json.load(f) == summary
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) == 1 and json.loads(lines[0])['test_accuracy'] == summary['test_accuracy']
  assert json.loads((workdir / 'config.json').read_text())['hidden_sizes'] == [96]


def test_checkpoint_holds_the_trained_state(device_run):
  config, workdir, summary = device_run
  state, record = restore_state(config, workdir)
  assert int(state.step) == 938 and record['step'] == 938
  assert record['history'][-1]['test_accuracy'] == summary['test_accuracy']
  _, fresh = initial_state(config)
  assert not np.array_equal(state.params['out']['kernel'][...], fresh.params['out']['kernel'][...])


def test_finished_run_is_not_retrained(device_run, capsys):
  config, workdir, summary = device_run
  again = loop.train_and_evaluate(config, str(workdir))
  assert again == summary  # Same saved numbers, training seconds included: nothing re-ran.
  assert len((workdir / 'metrics.jsonl').read_text().splitlines()) == 1


def test_same_seed_is_bitwise_identical(device_run, tmp_path):
  config, workdir, summary = device_run
  config.tensorboard = False
  again = loop.train_and_evaluate(config, str(tmp_path))
  for key in ('test_accuracy', 'test_loss', 'train_accuracy', 'train_loss'):
    assert again[key] == summary[key]
  a, _ = restore_state(config, workdir)
  b, _ = restore_state(config, tmp_path)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_different_seed_differs(device_run, config, tmp_path):
  _, _, summary = device_run
  config.seed = 1
  other = loop.train_and_evaluate(config, str(tmp_path))
  assert other['seed'] == 1 and other['test_accuracy'] >= 0.80
  assert other['train_loss'] != summary['train_loss']
  assert other['test_loss'] != summary['test_loss']


@pytest.mark.parametrize('mode', ['stream', 'tfds'])
def test_streaming_modes_match_device_mode(mode, device_run, config, tmp_path, monkeypatch):
  """Host-fed chunks of 100 batches, a short last chunk, one compiled training program."""
  _, _, device_summary = device_run
  keys = _compiled_keys(monkeypatch)
  config.input_mode = mode
  config.stream_chunk_steps = 100
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary['input_mode'] == mode and summary['steps'] == 938
  assert summary['test_accuracy'] >= 0.80
  assert abs(summary['test_accuracy'] - device_summary['test_accuracy']) < 0.03
  assert keys.count('train_chunk') == 1


def _compiled_keys(monkeypatch) -> list:
  """Records the name of every program the trainer lowers (to compile it)."""
  keys = []
  compile_all = programs.compile_all

  def recording(progs, memory_limit=None):
    keys.extend(progs)
    return compile_all(progs, memory_limit)
  monkeypatch.setattr(programs, 'compile_all', recording)
  return keys


def test_any_checkpoint_interval_compiles_one_training_program(device_run, config, tmp_path,
                                                               monkeypatch):
  """Chunks of 300, 300, 300, 38, 262, ... steps all run one compiled program, bitwise the same
  as whole epochs."""
  config.num_epochs = 2
  keys = _compiled_keys(monkeypatch)
  config.checkpoint_every_steps = 300
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert keys.count('train_chunk') == 1
  config.checkpoint_every_steps = 0
  whole = loop.train_and_evaluate(config, str(tmp_path / 'whole'))
  assert summary['train_loss'] == whole['train_loss'] and summary['test_loss'] == whole['test_loss']


def test_divergence_stops_and_keeps_the_last_good_checkpoint(config, tmp_path, monkeypatch):
  first = loop.train_and_evaluate(config, str(tmp_path))
  metrics_before = (tmp_path / 'metrics.jsonl').read_text()
  config.num_epochs = 2  # Continue the same run for one more epoch ...
  monkeypatch.setattr(metrics, 'mean_loss', lambda *args: jnp.float32(jnp.nan))  # ... into NaN.
  with pytest.raises(DivergenceError, match=r'epoch 2, step 1 \(global step 939\).*last good '
                     r'checkpoint \(step 938\) is kept'):
    loop.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / 'metrics.jsonl').read_text() == metrics_before
  state, record = restore_state(config, tmp_path)
  assert int(state.step) == 938
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  assert record['history'][-1]['test_loss'] == first['test_loss']


def test_finite_loss_with_non_finite_parameters_stops_the_run(data_dir, tmp_path):
  """A learning rate beyond float32 (1e39 is inf there) makes the first step's update infinite
  while its loss, computed before the update, is finite: the parameter check after the chunk (one
  step here) stops the run at that step, exit 3, before any checkpoint."""
  result = run_cli('fmnist_jax.train', '--config', 'configs/test.py',
                   f'--config.data.data_dir={data_dir}', '--config.learning_rate=1e39',
                   '--config.check_every_steps=1', f'--workdir={tmp_path}')
  assert result.returncode == 3 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  (error,) = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert error.startswith('error: non-finite loss or parameters at epoch 1, step 1 (global step '
                          '1); training stopped and no checkpoint was written.'), error
  assert not (tmp_path / 'checkpoints').exists()  # Nothing saved, not even the folder.


def test_absurd_learning_rate_diverges_without_checkpoint(config, tmp_path):
  config.learning_rate = 1e30
  with pytest.raises(DivergenceError, match='no checkpoint was written'):
    loop.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()  # Nothing saved, not even the folder.


@pytest.mark.parametrize('field, value', [('seed', 5), ('learning_rate', 2e-3), ('b1', 0.8),
                                          ('b2', 0.99), ('eps', 1e-8)])
def test_resume_with_another_seed_or_optimizer_is_refused(field, value, device_run):
  """Seed and Adam's numbers shape the run: a resume with another is refused in one line naming
  the field and both values, and nothing in the workdir changes."""
  config, workdir, _ = device_run
  config = config.copy_and_resolve_references()
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob('*') if p.name != '.lock'}
  old = config[field]
  config[field] = value
  config.num_epochs = 2  # A resume: one more epoch.
  with pytest.raises(UserError, match=rf'{field} \(checkpoint {old!r}, now {value!r}\)'
                     r'.*--fresh') as raised:
    loop.train_and_evaluate(config, str(workdir))
  assert '\n' not in str(raised.value)
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob('*') if p.name != '.lock'} == before


def test_incompatible_checkpoint_names_the_fields(device_run, config):
  _, workdir, _ = device_run
  config.hidden_sizes = (32,)
  config.batch_size = 128
  with pytest.raises(UserError, match=r'batch_size \(checkpoint 64, now 128\); hidden_sizes '
                     r'\(checkpoint \[96\], now \[32\]\)\..*--fresh'):
    loop.train_and_evaluate(config, str(workdir))


def test_flops_per_step_near_the_analytic_count(device_run):
  """XLA's count of one step: about 4 x parameters x batch (forward 2, weight gradients 2; no
  gradient flows into the images) plus the optimizer, not the 6x rule of thumb."""
  _, _, summary = device_run
  analytic = 4 * summary['param_count'] * summary['batch_size']
  assert 0.8 * analytic < summary['flops_per_step'] < 1.2 * analytic
  assert summary['flops_per_second'] == pytest.approx(
      summary['flops_per_step'] * summary['steps_run'] / summary['train_seconds'])
  assert summary['peak_flops_per_second'] is None and summary['mfu'] is None  # A CPU.


def test_the_train_state_is_donated():
  """The device mode's chunk updates the train state in place: XLA aliases every one of its
  buffers to an output, so parameters and Adam state are never held twice."""
  import re
  config = load_test_config()
  from fmnist_jax import distributed
  from fmnist_jax import steps
  from fmnist_jax.plan import ModelSpec, OptimizerSpec, RunPlan
  plan = RunPlan.create(config, 60_000, 10_000, jax.device_count())
  model, optimizer = ModelSpec.from_config(config), OptimizerSpec.from_config(config)
  chunk = programs.build(model, optimizer, plan, distributed.make_mesh())['train_chunk']
  header = chunk.lower().compile().as_text().splitlines()[0]
  aliased = {int(i) for i in re.findall(r'\((\d+), \{\}, (?:may|must)-alias\)', header)}
  assert aliased == set(range(len(jax.tree.leaves(steps.abstract_state(model, optimizer)))))


def test_plain_orbax_reads_the_checkpoint_as_a_nested_tree(device_run):
  import orbax.checkpoint as ocp
  config, workdir, _ = device_run
  tree = ocp.StandardCheckpointer().restore(str(workdir / 'checkpoints' / '938' / 'state'))
  state, _ = restore_state(config, workdir)
  np.testing.assert_array_equal(tree['params']['hidden']['0']['kernel'],
                                state.params['hidden'][0]['kernel'][...])
  assert tree['opt_state']['mu']['out']['bias'].shape == (10,) and int(tree['step']) == 938


def test_profile_steps_writes_a_trace_and_changes_nothing(device_run, config, tmp_path):
  _, _, summary = device_run
  config.profile_steps = 50
  traced = loop.train_and_evaluate(config, str(tmp_path))
  traces = list((tmp_path / 'tensorboard' / 'plugins' / 'profile').rglob('*.xplane.pb'))
  assert traces and all(t.stat().st_size > 0 for t in traces)
  for key in ('test_loss', 'train_loss', 'test_accuracy'):
    assert traced[key] == summary[key]


def test_tfds_resume_with_another_shuffle_buffer_is_refused(config, tmp_path, device_run):
  """data.shuffle_buffer orders the tfds mode's data: another value cannot resume it (one line
  naming it); the device mode ignores the field, so any value resumes (here: reports) it."""
  config.input_mode = 'tfds'
  config.data.shuffle_buffer = 1000
  loop.train_and_evaluate(config, str(tmp_path))
  before = sorted(p.name for p in tmp_path.rglob('*'))
  config.data.shuffle_buffer = 60_000
  config.num_epochs = 2
  with pytest.raises(UserError, match=r'data\.shuffle_buffer \(checkpoint 1000, now 60000\)'):
    loop.train_and_evaluate(config, str(tmp_path))
  assert sorted(p.name for p in tmp_path.rglob('*')) == before
  device_config, workdir, summary = device_run
  device_config = device_config.copy_and_resolve_references()
  device_config.data.shuffle_buffer = 5
  assert loop.train_and_evaluate(device_config, str(workdir)) == summary


def test_max_checkpoints_to_keep(config, tmp_path):
  """Checkpoints every 200 steps (200, ..., 800, and 938 at the epoch's end), 3 kept: the newest."""
  config.checkpoint_every_steps = 200
  config.max_checkpoints_to_keep = 3
  loop.train_and_evaluate(config, str(tmp_path))
  assert sorted(int(n) for n in os.listdir(tmp_path / 'checkpoints')) == [600, 800, 938]


def _cli_summary(data_dir, workdir, *args, env=None) -> dict:
  """Trains configs/test.py by the command line; its summary, checked against the clock outside:
  the process starts after `start` and writes its summary before it ends (a clock tick of slack:
  the kernel counts the start in ticks)."""
  start = time.time()
  result = run_cli('fmnist_jax.train', '--config', 'configs/test.py',
                   f'--config.data.data_dir={data_dir}', f'--workdir={workdir}', *args, env=env)
  lifetime = time.time() - start
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert_nested_times(summary)
  assert summary['total_seconds'] <= lifetime + 1 / os.sysconf('SC_CLK_TCK')
  return summary


def test_compile_cache_can_be_moved_and_turned_off(data_dir, tmp_path):
  """JAX's cache is in $XDG_CACHE_HOME/fmnist_jax/jax by default; --config.compile_cache_dir=DIR
  moves it there (the first run fills it, the second is served from it) and '' turns it off;
  neither touches the default folder."""
  def listing(folder):
    return sorted(p.name for p in folder.rglob('*'))
  env = {'XDG_CACHE_HOME': str(tmp_path / 'xdg')}
  auto = _cli_summary(data_dir, tmp_path / 'a', env=env)
  default = listing(tmp_path / 'xdg' / 'fmnist_jax' / 'jax')
  assert auto['compile_cache_hit'] is False and default
  moved = tmp_path / 'moved'
  first = _cli_summary(data_dir, tmp_path / 'b', f'--config.compile_cache_dir={moved}', env=env)
  entries = listing(moved)
  assert first['compile_cache_hit'] is False and entries
  second = _cli_summary(data_dir, tmp_path / 'c', f'--config.compile_cache_dir={moved}', env=env)
  assert second['compile_cache_hit'] is True
  assert listing(moved) == entries  # Nothing compiled again.
  off = _cli_summary(data_dir, tmp_path / 'd', '--config.compile_cache_dir=', env=env)
  assert off['compile_cache_hit'] is None
  assert listing(moved) == entries
  assert listing(tmp_path / 'xdg' / 'fmnist_jax' / 'jax') == default
  assert auto['test_loss'] == first['test_loss'] == second['test_loss'] == off['test_loss']
