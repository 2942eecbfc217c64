"""The benchmark pipeline: a tiny interleaved run writes a well-formed report and leaves the
committed reports alone; the per-round ratio arithmetic; --quick's scratch folder."""

import json
import os
import statistics
import subprocess

import pytest

from benchmarks import report, run
from tests.conftest import ROOT, run_cli

REPORTS = os.path.join(ROOT, 'benchmarks', 'reports')


def _committed_reports():
  """git's view of benchmarks/reports plus each committed file's size and mtime."""
  status = subprocess.run(['git', 'status', '--porcelain', '--', REPORTS], capture_output=True,
                          text=True, cwd=ROOT, check=True).stdout
  files = {}
  for name in sorted(os.listdir(REPORTS)):
    path = os.path.join(REPORTS, name)
    if os.path.isfile(path):
      files[name] = (os.stat(path).st_size, os.stat(path).st_mtime_ns)
  return status, files


def _ratio_cell(value):
  return f'{value:.2f}x'


def test_tiny_interleaved_run_writes_a_consistent_report(data_dir, tmp_path):
  before = _committed_reports()
  # One torch thread: this checks structure, not speed, and torch's default threads slow down
  # many times over when other processes share the cores.
  result = run_cli('benchmarks.run', '--quick', '--out', str(tmp_path),
                   '--peers', 'fmnist_jax-device,torch-eager', '--rounds', '2', '--epochs', '1',
                   '--batch-sizes', '', '--num-models', '',
                   env={'TFDS_DATA_DIR': data_dir, 'OMP_NUM_THREADS': '1'})
  assert result.returncode == 0, result.stderr[-3000:]
  assert _committed_reports() == before  # Neither content (git) nor mtimes changed.

  files = sorted(os.listdir(tmp_path))
  stem = [f[:-3] for f in files if f.endswith('.md')][0]
  assert {f'{stem}.json', f'{stem}-speedup.png'} <= set(files)
  for name in (f'{stem}.md', f'{stem}.json'):  # The run says where it wrote.
    assert f'wrote {tmp_path / name}' in result.stdout
  results = json.loads((tmp_path / f'{stem}.json').read_text())
  md = (tmp_path / f'{stem}.md').read_text()

  # Rounds: every entry once per round, the order rotated.
  assert results['rounds'] == 2 and len(results['round_orders']) == 2
  orders = results['round_orders']
  assert sorted(orders[0]) == sorted(orders[1]) == ['fmnist_jax-device', 'torch-eager']
  assert orders[0] != orders[1]
  assert [len(load) for load in results['round_load']] == [2, 2]  # Load at each round's ends.
  tutorial = results['tutorial']
  assert set(tutorial) | set(results['skipped']) == {'fmnist_jax-device', 'torch-eager'}
  device = tutorial['fmnist_jax-device']
  for i, r in enumerate(device['rounds']):
    assert r['round'] == i + 1 and orders[i][r['position'] - 1] == 'fmnist_jax-device'
    assert len(r['raw']['epochs']) == 1 and r['test_accuracy'] >= 0.8
    # fmnist_jax's whole command is the user's command, in a new workdir.
    assert r['whole_command'].startswith(
        'python -m fmnist_jax.train --config configs/base.py --workdir <new dir>')
    assert r['raw']['summary']['epochs'] == 1
    # With a compilation cache, a first run fills it and every round is a warm second run.
    cache_field = results['environment']['compile_cache_field']
    assert r['compile_cache'] == ('warm' if cache_field else 'none')
  if results['environment']['compile_cache_field']:
    assert results['first_runs']['fmnist_jax-device']['compile_cache'] == 'cold'
    assert '| fmnist_jax-device |' in md.split('First run, empty cache:', 1)[1]
  else:
    assert results['first_runs'] == {}

  # Ratios: per round, from the raw times of that round; then min <= median <= max of those.
  for peer, t in tutorial.items():
    for metric in run.RATIO_METRICS:
      stat = results['ratios'][peer][metric]
      expected = [r[metric] / b[metric] for r, b in zip(t['rounds'], device['rounds'])]
      assert stat['per_round'] == pytest.approx(expected)
      assert stat['min'] <= stat['median'] <= stat['max']
      assert (stat['min'], stat['median'], stat['max']) == pytest.approx(
          (min(expected), statistics.median(expected), max(expected)))
      if peer == 'fmnist_jax-device':
        assert expected == pytest.approx([1.0, 1.0])
      # The markdown's round-by-round table shows the same numbers.
      table = md.split(f'{report.RATIO_NAMES[metric].capitalize()}:\n', 1)[1]
      row = next(l for l in table.splitlines() if l.startswith(f'| {peer} |'))
      cells = [_ratio_cell(v) for v in expected + [stat['min'], stat['median'], stat['max']]]
      assert row == f'| {peer} | ' + ' | '.join(cells) + ' |'

  assert md.startswith('# fmnist_jax benchmark: cpu')
  assert '2 interleaved rounds' in md and 'python -m benchmarks.run --quick' in md
  assert 'jax 0.' in md and 'cores' in md and '- Date: ' in md
  assert '| peer | training s | x fmnist_jax (training) |' in md
  assert data_dir not in md and data_dir not in json.dumps(results)  # No local paths.


def test_quick_writes_to_an_ignored_scratch_folder():
  assert run.parse_args(['--quick']).out == run.SCRATCH
  assert run.parse_args(['--quick', '--out', 'elsewhere']).out == 'elsewhere'
  assert run.parse_args([]).out == REPORTS
  check = subprocess.run(['git', 'check-ignore', '-q', os.path.join(run.SCRATCH, 'cpu-2core.md')],
                         cwd=ROOT)
  assert check.returncode == 0  # git would not list a quick report.
  assert not subprocess.run(['git', 'check-ignore', '-q', os.path.join(REPORTS, 'cpu-2core.md')],
                            cwd=ROOT).returncode == 0


def test_rounds_rotate_every_position():
  entries = [f'p{i}' for i in range(8)]
  orders = [run.rotated(entries, r, 3) for r in range(3)]
  assert all(sorted(o) == entries for o in orders)
  assert len({o[0] for o in orders}) == 3  # A different peer goes first each round.
  assert run.rotated(['a', 'b'], 1, 2) == ['b', 'a']


def test_missing_framework_is_reported_as_skipped(monkeypatch):
  monkeypatch.setattr(run.importlib.util, 'find_spec',
                      lambda name: None if name == 'torch' else object())
  assert run.missing_modules('torch-eager') == ['torch']
  assert run.missing_modules('fmnist_jax-device') == []


def _record(train, whole, compile_s=None):
  result = {'epochs': [{'seconds': train / 2, 'test_accuracy': 0.84},
                       {'seconds': train / 2, 'test_accuracy': 0.86}],
            'test_accuracy': 0.86, 'wall_seconds': whole}
  if compile_s is not None:
    result['compile_seconds'] = compile_s
  return {**run.derive(result, 32), 'whole_seconds': whole, 'whole_command': 'cmd',
          'compile_cache': None}


def test_ratios_are_per_round_not_of_medians():
  base = [_record(1.0, 5.0, 0.5), _record(2.0, 6.0, 0.5), _record(1.0, 5.0, 0.5)]
  peer = [_record(4.0, 20.0), _record(4.0, 12.0), _record(3.0, 15.0)]
  tutorial = {'fmnist_jax-device': {'rounds': base}, 'keras-tf-tutorial': {'rounds': peer}}
  ratios = run.round_ratios(tutorial)
  train = ratios['keras-tf-tutorial']['train_seconds']
  assert train['per_round'] == pytest.approx([4.0, 2.0, 3.0])
  assert (train['min'], train['median'], train['max']) == pytest.approx((2.0, 3.0, 4.0))
  # The ratio of medians would be 4.0 / 1.0: drift between rounds would enter it.
  assert ratios['keras-tf-tutorial']['whole_seconds']['per_round'] == pytest.approx(
      [4.0, 2.0, 3.0])
  assert ratios['keras-tf-tutorial']['train_plus_compile_seconds']['per_round'] == pytest.approx(
      [4.0 / 1.5, 4.0 / 2.5, 3.0 / 1.5])
  # A round the peer missed has no ratio and does not count.
  tutorial['keras-tf-tutorial']['rounds'][1] = None
  missed = run.round_ratios(tutorial)['keras-tf-tutorial']['train_seconds']
  assert missed['per_round'][1] is None and missed['n'] == 2

  for t in tutorial.values():
    rounds = [r for r in t['rounds'] if r]
    t.update({k: run.summarize([r[k] for r in rounds]) for k in rounds[0] if k not in (
        'whole_command', 'compile_cache')})
  results = {
      'environment': {'date': 'd', 'command': 'c', 'platform': 'cpu', 'device_kind': 'cpu',
                      'device_count': 1, 'cpu': 'x', 'cpu_cores': 2, 'memory_gib': 4,
                      'python': '3', 'versions': {'jax': '0'}, 'quick': False,
                      'compile_cache_field': False},
      'tutorial': tutorial, 'ratios': ratios, 'rounds': 3,
      'round_orders': [['fmnist_jax-device', 'keras-tf-tutorial']] * 3,
      'throughput': {}, 'models': {}, 'skipped': {'torch-eager': 'not installed: torch'},
      'target_accuracy': 0.85, 'tutorial_epochs': 2, 'batch_sizes': [], 'throughput_epochs': 2,
      'descriptions': {'fmnist_jax-device': 'a', 'keras-tf-tutorial': 'b'}}
  md = report.markdown(results, [])
  row = [l for l in md.splitlines() if l.startswith('| keras-tf-tutorial |')][0]
  assert '| 3.0x (2.0-4.0) |' in row  # Training: median (min-max) of the per-round ratios.
  assert '- `torch-eager`: not installed: torch' in md
  assert 'no persistent compilation cache' in md
  assert report.slug({'platform': 'gpu', 'device_kind': 'NVIDIA H200', 'cpu_cores': 16}) == \
      'gpu-nvidia-h200'
