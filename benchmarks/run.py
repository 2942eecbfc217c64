"""Measures fmnist_jax against its peers in one sitting and writes a report.

    python -m benchmarks.run                 # full run (about 10 minutes on a 2-core CPU)
    python -m benchmarks.run --quick         # seconds: a smoke test of the whole pipeline
    python -m benchmarks.run --peers fmnist_jax-device,keras-jax-tuned --repeats 5

Each peer runs in its own process (benchmarks/peers.py) on the same data, model and optimizer.
Three measurements:
  tutorial    5 epochs at batch 32, `--repeats` times: training time, compile / first-epoch
              overhead, end-to-end process time, time to 85% test accuracy, final accuracy;
  throughput  steady-state steps/s (the last of `--throughput-epochs` epochs) per batch size;
  models      fmnist_jax training K models at once with jax.vmap: models x steps per second.
Writes <out>/<platform>-<device>.md, .json (every raw figure) and PNG plots.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from benchmarks import peers as peers_lib
from benchmarks import report

TARGET_ACCURACY = 0.85
TRAIN_EXAMPLES = 60_000
FULL = {'peers': ','.join(peers_lib.PEERS), 'batch_sizes': '32,128,512,2048,8192', 'repeats': 3,
        'epochs': 5, 'throughput_epochs': 2, 'num_models': '1,8,64'}
QUICK = {'peers': 'fmnist_jax-device,torch-eager', 'batch_sizes': '8192', 'repeats': 1,
         'epochs': 1, 'throughput_epochs': 1, 'num_models': '1,4'}
FRAMEWORK_MODULES = {'jax': ('jax',), 'keras+tensorflow': ('keras', 'tensorflow'),
                     'keras+jax': ('keras', 'jax'), 'torch': ('torch',)}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true',
                      help='a smoke test (under a minute): fmnist_jax-device and torch-eager, 1 '
                      'epoch, 1 repeat, batch size 8192 only, K = 1, 4')
  parser.add_argument('--peers', default=None,
                      help='comma-separated peers (default: all; with --quick: fmnist_jax-device,'
                      'torch-eager): ' + ', '.join(peers_lib.PEERS))
  parser.add_argument('--batch-sizes', default=None,
                      help='throughput batch sizes (default 32,128,512,2048,8192)')
  parser.add_argument('--repeats', type=int, default=None, help='tutorial runs per peer (3)')
  parser.add_argument('--epochs', type=int, default=None, help='epochs of the tutorial run (5)')
  parser.add_argument('--throughput-epochs', type=int, default=None,
                      help='epochs per throughput run; the last one is measured (2)')
  parser.add_argument('--num-models', default=None, help='K values for the vmap run (1,8,64)')
  parser.add_argument('--timeout', type=int, default=900, help='seconds per peer process')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'reports'))
  args = parser.parse_args(argv)
  # --quick changes the defaults; options given explicitly still win.
  defaults = QUICK if args.quick else FULL
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  args.peers = [p for p in args.peers.split(',') if p]
  unknown = [p for p in args.peers if p not in peers_lib.PEERS]
  if unknown:
    parser.error(f'unknown peer(s) {", ".join(unknown)}; choose from {", ".join(peers_lib.PEERS)}')
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  args.num_models = [int(k) for k in args.num_models.split(',')]
  return args


def missing_modules(peer):
  framework = peers_lib.PEERS[peer][0]
  return [m for m in FRAMEWORK_MODULES[framework] if importlib.util.find_spec(m) is None]


def run_one(peer, batch_size, epochs, timeout, num_models=1):
  """Runs one peer process; returns its result dict (with wall_seconds) or an error dict."""
  cmd = [sys.executable, '-m', 'benchmarks.peers', peer, '--batch-size', str(batch_size),
         '--epochs', str(epochs), '--num-models', str(num_models)]
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=peers_lib.peer_env(peer))
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout} s'}
  wall = time.perf_counter() - start
  for line in proc.stdout.splitlines():
    if line.startswith('RESULT '):
      result = json.loads(line[len('RESULT '):])
      result['wall_seconds'] = wall
      return result
  tail = [l for l in proc.stderr.strip().splitlines() if l.strip()][-1:] or ['no output']
  return {'error': f'exit {proc.returncode}: {tail[0][:300]}'}


def derive(result, batch_size):
  """Training time, overhead, time to target and steady rate from per-epoch figures."""
  epochs = result['epochs']
  seconds = [e['seconds'] for e in epochs]
  steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
  steps = -(-TRAIN_EXAMPLES // batch_size)
  # Peers without a separate compile step pay it inside the first epoch.
  compile_s = result.get('compile_seconds', max(seconds[0] - steady, 0.0))
  elapsed, to_target = 0.0, None
  for e in epochs:
    elapsed += e['seconds']
    if to_target is None and e['test_accuracy'] >= TARGET_ACCURACY:
      to_target = elapsed
  train = sum(seconds)
  separate = 'compile_seconds' in result
  return {'train_seconds': train, 'compile_seconds': compile_s,
          'train_plus_compile_seconds': train + (compile_s if separate else 0.0),
          'time_to_target_seconds': to_target, 'test_accuracy': result['test_accuracy'],
          'wall_seconds': result['wall_seconds'], 'steady_steps_per_second': steps / steady,
          'steady_examples_per_second': steps * batch_size / steady}


def summarize(values):
  values = [v for v in values if v is not None]
  if not values:
    return None
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values),
          'n': len(values)}


def device_info() -> dict:
  """JAX's platform and devices, asked in a subprocess.

  A TPU opens in one process at a time and a GPU backend takes most of the GPU's memory, so the
  process that starts the peers must hold neither.
  """
  code = ('import jax, json; d = jax.devices(); print(json.dumps({"platform": '
          'jax.default_backend(), "device_kind": d[0].device_kind, "device_count": len(d)}))')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def environment(args, argv):
  versions = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-datasets',
               'keras', 'tensorflow-cpu', 'tensorflow', 'torch', 'numpy'):
    try:
      from importlib import metadata  # pylint: disable=g-import-not-at-top
      versions[name] = metadata.version(name)
    except Exception:  # pylint: disable=broad-except
      pass
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  try:
    memory_gib = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
  except (ValueError, OSError, AttributeError):
    memory_gib = None
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      'command': 'python -m benchmarks.run ' + ' '.join(argv),
      **device_info(), 'cpu': cpu, 'cpu_cores': os.cpu_count(),
      'memory_gib': memory_gib, 'python': platform.python_version(), 'versions': versions,
      'quick': args.quick}


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  env = environment(args, argv)
  results = {'environment': env, 'skipped': {}, 'tutorial': {}, 'throughput': {}, 'models': {},
             'target_accuracy': TARGET_ACCURACY, 'tutorial_epochs': args.epochs,
             'batch_sizes': args.batch_sizes, 'descriptions': {
                 p: peers_lib.PEERS[p][1] for p in args.peers}}
  active = []
  for peer in args.peers:
    missing = missing_modules(peer)
    if missing:
      results['skipped'][peer] = f'not installed: {", ".join(missing)} (pip install -e .[bench])'
    else:
      active.append(peer)

  def log(message):
    print(message, flush=True)

  for peer in list(active):
    runs = []
    for repeat in range(args.repeats):
      result = run_one(peer, 32, args.epochs, args.timeout)
      if 'error' in result:
        results['skipped'][peer] = result['error']
        log(f'tutorial  {peer:18s} skipped: {result["error"]}')
        break
      runs.append({'raw': result, **derive(result, 32)})
      log(f'tutorial  {peer:18s} run {repeat + 1}: train {runs[-1]["train_seconds"]:.2f} s, '
          f'accuracy {runs[-1]["test_accuracy"]:.4f}')
    if peer in results['skipped']:
      active.remove(peer)
      continue
    results['tutorial'][peer] = {
        'runs': runs, **{k: summarize([r[k] for r in runs]) for k in (
            'train_seconds', 'compile_seconds', 'train_plus_compile_seconds',
            'time_to_target_seconds', 'test_accuracy', 'wall_seconds')}}

  for peer in active:
    results['throughput'][peer] = {}
    for batch_size in args.batch_sizes:
      result = run_one(peer, batch_size, args.throughput_epochs, args.timeout)
      if 'error' in result:
        results['throughput'][peer][str(batch_size)] = {'error': result['error']}
        log(f'throughput {peer:18s} batch {batch_size}: {result["error"]}')
        continue
      d = derive(result, batch_size)
      results['throughput'][peer][str(batch_size)] = {
          'steps_per_second': d['steady_steps_per_second'],
          'examples_per_second': d['steady_examples_per_second'], 'raw': result}
      log(f'throughput {peer:18s} batch {batch_size:5d}: {d["steady_steps_per_second"]:9.1f} '
          'steps/s')

  if 'fmnist_jax-device' in active:
    for k in args.num_models:
      result = run_one('fmnist_jax-device', 32, args.throughput_epochs, args.timeout, k)
      if 'error' in result:
        results['models'][str(k)] = {'error': result['error']}
        continue
      d = derive(result, 32)
      results['models'][str(k)] = {
          'model_steps_per_second': k * d['steady_steps_per_second'],
          'steps_per_second': d['steady_steps_per_second'], 'raw': result}
      log(f'models    K={k:3d}: {k * d["steady_steps_per_second"]:10.1f} model-steps/s')

  paths = report.write(results, args.out)
  for path in paths:
    log(f'wrote {path}')
  return results


if __name__ == '__main__':
  main()
