"""The benchmark pipeline: a --quick run writes a well-formed report; the report's arithmetic."""

import json
import os

import pytest

from benchmarks import report, run
from tests.conftest import run_cli


def test_quick_benchmark_writes_a_report(data_dir, tmp_path):
  result = run_cli('benchmarks.run', '--quick', '--out', str(tmp_path),
                   '--peers', 'fmnist_jax-device,torch-eager',
                   '--epochs', '2', env={'TFDS_DATA_DIR': data_dir})
  assert result.returncode == 0, result.stderr[-3000:]
  files = sorted(os.listdir(tmp_path))
  stem = [f[:-3] for f in files if f.endswith('.md')][0]
  assert {f'{stem}.json', f'{stem}-throughput.png'} <= set(files)
  results = json.loads((tmp_path / f'{stem}.json').read_text())
  device = results['tutorial']['fmnist_jax-device']
  assert device['test_accuracy']['median'] >= 0.8
  assert device['train_seconds']['median'] > 0 and device['compile_seconds']['median'] > 0
  assert len(device['runs'][0]['raw']['epochs']) == 2
  for peer in ('torch-eager',):
    # Installed peers are measured; missing ones are listed with the reason, never dropped.
    assert peer in results['tutorial'] or peer in results['skipped']
  assert results['throughput']['fmnist_jax-device']['8192']['steps_per_second'] > 0
  assert set(results['models']) == {'1', '4'}
  assert results['models']['4']['model_steps_per_second'] > 0
  md = (tmp_path / f'{stem}.md').read_text()
  assert md.startswith('# fmnist_jax benchmark: cpu')
  assert 'python -m benchmarks.run --quick' in md and 'jax 0.' in md
  assert '| fmnist_jax-device |' in md and '1.0x' in md


def test_missing_framework_is_reported_as_skipped(monkeypatch):
  monkeypatch.setattr(run.importlib.util, 'find_spec',
                      lambda name: None if name == 'torch' else object())
  assert run.missing_modules('torch-eager') == ['torch']
  assert run.missing_modules('fmnist_jax-device') == []


def test_derive_and_report_ratios():
  result = {'epochs': [{'seconds': 3.0, 'test_accuracy': 0.84},
                       {'seconds': 1.0, 'test_accuracy': 0.86},
                       {'seconds': 1.0, 'test_accuracy': 0.87}],
            'test_accuracy': 0.87, 'wall_seconds': 9.0}
  d = run.derive(result, 32)
  assert d['train_seconds'] == 5.0 and d['compile_seconds'] == 2.0  # First-epoch excess.
  assert d['time_to_target_seconds'] == 4.0  # Reached 0.85 after the second epoch.
  assert d['steady_steps_per_second'] == 1875.0
  fast = dict(result, compile_seconds=0.5,
              epochs=[dict(e, seconds=e['seconds'] / 4) for e in result['epochs']])
  df = run.derive(fast, 32)
  assert df['train_plus_compile_seconds'] == pytest.approx(1.25 + 0.5)
  results = {
      'environment': {'date': 'd', 'command': 'c', 'platform': 'cpu', 'device_kind': 'cpu',
                      'device_count': 1, 'cpu': 'x', 'cpu_cores': 2, 'memory_gib': 4,
                      'python': '3', 'versions': {'jax': '0'}, 'quick': False},
      'tutorial': {'fmnist_jax-device': {k: run.summarize([df[k]]) for k in df},
                   'keras-tf-tutorial': {k: run.summarize([d[k]]) for k in d}},
      'throughput': {}, 'models': {}, 'skipped': {'torch-eager': 'not installed: torch'},
      'target_accuracy': 0.85, 'tutorial_epochs': 3, 'batch_sizes': [32],
      'descriptions': {'fmnist_jax-device': 'a', 'keras-tf-tutorial': 'b'}}
  md = report.markdown(results, [])
  row = [l for l in md.splitlines() if l.startswith('| keras-tf-tutorial')][0]
  assert row.endswith('| 4.0x | 2.9x |')  # 5.0 / 1.25 and 5.0 / 1.75.
  assert '- `torch-eager`: not installed: torch' in md
  assert report.slug({'platform': 'gpu', 'device_kind': 'NVIDIA H200', 'cpu_cores': 16}) == \
      'gpu-nvidia-h200'
