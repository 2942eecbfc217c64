"""Measures fmnist_jax against its peers in interleaved rounds and writes a report.

    python -m benchmarks.run                 # full run, about 12 minutes on a 2-core CPU
    python -m benchmarks.run --quick         # about a minute: a smoke test of the whole pipeline
    python -m benchmarks.run --peers fmnist_jax-device,keras-jax-tuned --rounds 5

The full run writes benchmarks/reports/<platform>-<device>.{md,json,png}; --quick writes to the
ignored benchmarks/reports/scratch/ (never over the committed reports) unless --out is given.

Every peer trains the same model on the same data in its own process. Three measurements:
  tutorial    5 epochs at batch 32, in `--rounds` interleaved rounds: each round runs every peer
              once, the order rotated from round to round, so the machine's drift lands on all
              peers alike; each peer's ratio to fmnist_jax-device is taken within each round.
              fmnist_jax runs as its user command (`python -m fmnist_jax.train --config
              configs/base.py --workdir <new dir>`), and the Keras tutorial also runs as the
              tutorial's script (benchmarks/keras_tutorial.py); each is timed from process start to
              exit (the whole-command column). Where fmnist_jax has a persistent compilation cache,
              each of its commands first runs once into an empty cache (reported apart), so the
              rounds measure a user's second run: warm cache, new workdir;
  throughput  steady-state steps/s (the last of `--throughput-epochs` epochs) per batch size, the
              peers interleaved; batch 32 comes from the tutorial rounds;
  models      fmnist_jax training K models at once with jax.vmap: models x steps per second.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import peers as peers_lib
from benchmarks import report

TARGET_ACCURACY = 0.85
TRAIN_EXAMPLES = 60_000
TUTORIAL_BATCH = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORTS = os.path.join(ROOT, 'benchmarks', 'reports')
SCRATCH = os.path.join(REPORTS, 'scratch')  # In .gitignore.
KERAS_SCRIPT = 'keras-tutorial-script'  # The whole command of keras-tf-tutorial.
# Sized to about 12 minutes on a 2-core CPU (3 rounds of 8 processes ~ 8 min, the rest ~ 4 min).
FULL = {'peers': ','.join(peers_lib.PEERS), 'batch_sizes': '512,8192', 'rounds': 3, 'epochs': 5,
        'throughput_epochs': 2, 'num_models': '1,8,32'}
QUICK = {'peers': 'fmnist_jax-device,torch-eager', 'batch_sizes': '8192', 'rounds': 2,
         'epochs': 1, 'throughput_epochs': 1, 'num_models': '1,2'}
FRAMEWORK_MODULES = {'jax': ('jax',), 'keras+tensorflow': ('keras', 'tensorflow'),
                     'keras+jax': ('keras', 'jax'), 'torch': ('torch',)}
RATIO_METRICS = ('train_seconds', 'train_plus_compile_seconds', 'whole_seconds')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true',
                      help='a smoke test: fmnist_jax-device and torch-eager, 2 rounds of 1 epoch, '
                      'batch size 8192 only, K = 1, 4; written to benchmarks/reports/scratch/')
  parser.add_argument('--peers', default=None,
                      help='comma-separated peers (default: all; with --quick: fmnist_jax-device,'
                      'torch-eager): ' + ', '.join(peers_lib.PEERS))
  parser.add_argument('--rounds', type=int, default=None,
                      help='interleaved rounds of the tutorial run (3)')
  parser.add_argument('--epochs', type=int, default=None, help='epochs of the tutorial run (5)')
  parser.add_argument('--batch-sizes', default=None,
                      help='throughput batch sizes besides the tutorial\'s 32 (default 512,8192; '
                      '"" for none)')
  parser.add_argument('--throughput-epochs', type=int, default=None,
                      help='epochs per throughput run; the last one is measured (2)')
  parser.add_argument('--num-models', default=None,
                      help='K values for the vmap run (1,8,32; "" for none)')
  parser.add_argument('--timeout', type=int, default=900, help='seconds per peer process')
  parser.add_argument('--out', default=None,
                      help='report folder (default: benchmarks/reports, with --quick '
                      'benchmarks/reports/scratch)')
  args = parser.parse_args(argv)
  # --quick changes the defaults; options given explicitly still win.
  defaults = QUICK if args.quick else FULL
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.out is None:
    args.out = SCRATCH if args.quick else REPORTS
  args.peers = [p for p in args.peers.split(',') if p]
  unknown = [p for p in args.peers if p not in peers_lib.PEERS]
  if unknown:
    parser.error(f'unknown peer(s) {", ".join(unknown)}; choose from {", ".join(peers_lib.PEERS)}')
  if args.rounds < 1 or args.epochs < 1 or args.throughput_epochs < 1:
    parser.error('--rounds, --epochs and --throughput-epochs must be at least 1')
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(',') if b]
  args.num_models = [int(k) for k in args.num_models.split(',') if k]
  return args


def missing_modules(peer):
  framework = peers_lib.PEERS[peer][0]
  return [m for m in FRAMEWORK_MODULES[framework] if importlib.util.find_spec(m) is None]


def rotated(entries, round_index, rounds):
  """The round's order: shifted so each entry's position moves evenly across the rounds."""
  if not entries:
    return []
  shift = (round_index * len(entries)) // rounds % len(entries)
  return entries[shift:] + entries[:shift]


def _process(cmd, env, timeout):
  """Runs cmd from the repository root; (CompletedProcess, wall seconds) or an error dict."""
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout} s'}
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    tail = [l for l in proc.stderr.strip().splitlines() if l.strip()][-1:] or ['no output']
    return {'error': f'exit {proc.returncode}: {tail[0][:300]}'}
  return proc, wall


def run_one(peer, batch_size, epochs, timeout, num_models=1):
  """Runs one peer process; returns its result dict (with wall_seconds) or an error dict."""
  cmd = [sys.executable, '-m', 'benchmarks.peers', peer, '--batch-size', str(batch_size),
         '--epochs', str(epochs), '--num-models', str(num_models)]
  out = _process(cmd, peers_lib.peer_env(peer), timeout)
  if isinstance(out, dict):
    return out
  proc, wall = out
  for line in proc.stdout.splitlines():
    if line.startswith('RESULT '):
      result = json.loads(line[len('RESULT '):])
      result['wall_seconds'] = wall
      result['command'] = 'python -m ' + ' '.join(cmd[2:])
      return result
  return {'error': 'no RESULT line in the peer\'s output'}


class UserCommands:
  """fmnist_jax's and the Keras tutorial's commands as a user runs them, in a scratch folder.

  Each fmnist_jax run gets a new workdir. With the config field `compile_cache_dir` (JAX's
  persistent compilation cache), each fmnist_jax peer gets its own cache folder, empty at the start
  of the benchmark: its first run compiles cold, later runs find the cache warm, as a user's second
  run does.
  """

  def __init__(self, data_dir, epochs, timeout):
    self.data_dir = data_dir
    self.epochs = epochs
    self.timeout = timeout
    self.tmp = tempfile.mkdtemp(prefix='fmnist_jax-bench-')
    self.runs = 0
    self.has_cache_field = 'compile_cache_dir' in peers_lib.base_config()

  def close(self):
    shutil.rmtree(self.tmp, ignore_errors=True)

  def fmnist_jax(self, mode):
    """`python -m fmnist_jax.train --config configs/base.py` in a new workdir."""
    self.runs += 1
    workdir = os.path.join(self.tmp, f'workdir-{self.runs}-{mode}')
    cmd = [sys.executable, '-m', 'fmnist_jax.train', '--config', 'configs/base.py', '--workdir',
           workdir, f'--config.data.data_dir={self.data_dir}']
    shown = ['python', '-m', 'fmnist_jax.train', '--config', 'configs/base.py',
             '--workdir', '<new dir>', '--config.data.data_dir=<prepared data>']
    if mode != 'device':
      cmd.append(f'--config.input_mode={mode}')
      shown.append(cmd[-1])
    if self.epochs != 5:
      cmd.append(f'--config.num_epochs={self.epochs}')
      shown.append(cmd[-1])
    cache = None
    if self.has_cache_field:
      cache = os.path.join(self.tmp, f'compile-cache-{mode}')
      cmd.append(f'--config.compile_cache_dir={cache}')
    warm = bool(cache) and os.path.isdir(cache) and bool(os.listdir(cache))
    out = _process(cmd, dict(os.environ), self.timeout)
    if isinstance(out, dict):
      return out
    _, wall = out
    from fmnist_jax.run import outputs  # pylint: disable=g-import-not-at-top  (no JAX)
    from fmnist_jax.errors import UserError  # pylint: disable=g-import-not-at-top
    try:
      summary, history = outputs.read_summary(workdir), outputs.read_metrics(workdir)
    except UserError as e:
      return {'error': f'no readable run outputs in the workdir: {e}'}
    if cache is None:
      cache_state = 'none'  # This fmnist_jax has no persistent compilation cache.
    elif summary.get('compile_cache_hit') is not None:
      cache_state = 'warm' if summary['compile_cache_hit'] else 'cold'
    else:
      cache_state = 'warm' if warm else 'cold'
    return {'epochs': [{'seconds': h['seconds'], 'test_accuracy': h['test_accuracy']}
                       for h in history],
            'compile_seconds': summary['compile_seconds'],
            'test_accuracy': summary['test_accuracy'], 'device': summary['device_kind'],
            'wall_seconds': wall, 'compile_cache': cache_state, 'summary': summary,
            'command': ' '.join(shown)}

  def keras_script(self):
    """benchmarks/keras_tutorial.py, the tutorial's code as one script."""
    cmd = [sys.executable, os.path.join('benchmarks', 'keras_tutorial.py'), '--data-dir',
           self.data_dir]
    shown = 'python benchmarks/keras_tutorial.py --data-dir <prepared data>'
    if self.epochs != 5:
      cmd += ['--epochs', str(self.epochs)]
      shown += f' --epochs {self.epochs}'
    out = _process(cmd, peers_lib.peer_env('keras-tf-tutorial'), self.timeout)
    if isinstance(out, dict):
      return out
    proc, wall = out
    accuracy = None
    for line in proc.stdout.splitlines():
      if line.startswith('Test accuracy:'):
        accuracy = float(line.split(':', 1)[1])
    return {'wall_seconds': wall, 'test_accuracy': accuracy, 'command': shown}


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


def round_ratios(tutorial, baseline=report.BASELINE):
  """Each peer's per-round ratio to the baseline of the same round, then min/median/max."""
  base_rounds = tutorial.get(baseline, {}).get('rounds', [])
  ratios = {}
  for peer, t in tutorial.items():
    ratios[peer] = {}
    for metric in RATIO_METRICS:
      per_round = []
      for i, r in enumerate(t['rounds']):
        b = base_rounds[i] if i < len(base_rounds) else None
        ok = r and b and r.get(metric) is not None and b.get(metric)
        per_round.append(r[metric] / b[metric] if ok else None)
      ratios[peer][metric] = {'per_round': per_round, **(summarize(per_round) or {})}
  return ratios


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
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  versions = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-datasets',
               'keras', 'tensorflow-cpu', 'tensorflow', 'torch', 'numpy'):
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
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
      'command': ' '.join(['python -m benchmarks.run'] + list(argv)),
      **device_info(), 'cpu': cpu, 'cpu_cores': os.cpu_count(),
      'memory_gib': memory_gib, 'python': platform.python_version(), 'versions': versions,
      'quick': args.quick}


def prepare_data():
  """Prepares the data once before measuring (no peer pays it); returns the tfds data dir."""
  from fmnist_jax import data  # pylint: disable=g-import-not-at-top
  config = peers_lib.base_config()
  data.load(config.data)
  return data.data_dir(config.data)


def load_average():
  """The 1-minute load average (None where the platform has none)."""
  try:
    return os.getloadavg()[0]
  except (AttributeError, OSError):
    return None


def log(message):
  print(message, flush=True)


def measure_tutorial(args, active, results, data_dir):
  """The interleaved rounds; fills results['tutorial'], ['ratios'] and ['round_orders']."""
  users = UserCommands(data_dir, args.epochs, args.timeout)
  results['environment']['compile_cache_field'] = users.has_cache_field
  entries = list(active)
  if 'keras-tf-tutorial' in entries:
    entries.insert(entries.index('keras-tf-tutorial') + 1, KERAS_SCRIPT)
  raw = {e: [None] * args.rounds for e in entries}
  failed = set()
  try:
    if users.has_cache_field:
      # Each fmnist_jax command once into its empty cache: the rounds then measure a user's
      # second run (warm cache, new workdir), and this first run is reported on its own.
      for peer in [e for e in entries if e.startswith('fmnist_jax-')]:
        result = users.fmnist_jax(peer.split('-', 1)[1])
        if 'error' in result:
          failed.add(peer)
          results['skipped'][peer] = f'first run: {result["error"]}'
          log(f'first run {peer:19s} failed: {result["error"]}')
          continue
        results['first_runs'][peer] = {**derive(result, TUTORIAL_BATCH),
                                       'whole_seconds': result['wall_seconds'],
                                       'compile_cache': result['compile_cache'], 'raw': result}
        log(f'first run {peer:19s} compile {result["compile_seconds"]:6.2f} s, whole command '
            f'{result["wall_seconds"]:6.2f} s, compile cache {result["compile_cache"]}')
    for r in range(args.rounds):
      order = [e for e in rotated(entries, r, args.rounds) if e not in failed]
      results['round_orders'].append(order)
      results['round_load'].append([load_average()])
      for position, entry in enumerate(order):
        if entry == KERAS_SCRIPT:
          result = users.keras_script()
        elif entry.startswith('fmnist_jax-'):
          result = users.fmnist_jax(entry.split('-', 1)[1])
        else:
          result = run_one(entry, TUTORIAL_BATCH, args.epochs, args.timeout)
        if 'error' in result:
          failed.add(entry)
          results['skipped'][entry] = f'round {r + 1}: {result["error"]}'
          log(f'round {r + 1}  {entry:21s} failed: {result["error"]}')
          continue
        result['position'] = position + 1
        raw[entry][r] = result
        detail = (f'train {sum(e["seconds"] for e in result["epochs"]):6.2f} s, '
                  if 'epochs' in result else ' ' * 17)
        cache = f', compile cache {result["compile_cache"]}' if 'compile_cache' in result else ''
        log(f'round {r + 1}  {entry:21s} {detail}whole command {result["wall_seconds"]:6.2f} s'
            f'{cache}')
      results['round_load'][-1].append(load_average())
  finally:
    users.close()
  for peer in active:
    if peer in failed:
      continue
    rounds = []
    for r in range(args.rounds):
      result = raw[peer][r]
      if result is None:
        rounds.append(None)
        continue
      record = {'round': r + 1, 'position': result['position'], **derive(result, TUTORIAL_BATCH),
                'whole_seconds': result['wall_seconds'], 'whole_command': result['command'],
                'compile_cache': result.get('compile_cache'), 'raw': result}
      if peer == 'keras-tf-tutorial':
        script = raw.get(KERAS_SCRIPT, [None] * args.rounds)[r]
        record['whole_seconds'] = script['wall_seconds'] if script else None
        record['whole_command'] = script['command'] if script else None
        record['script'] = script
      rounds.append(record)
    results['tutorial'][peer] = {'rounds': rounds, **{
        k: summarize([r[k] for r in rounds if r]) for k in (
            'train_seconds', 'compile_seconds', 'train_plus_compile_seconds',
            'time_to_target_seconds', 'test_accuracy', 'wall_seconds', 'whole_seconds',
            'steady_steps_per_second')}}
  results['ratios'] = round_ratios(results['tutorial'])


def measure_throughput(args, active, results):
  """Steady steps/s per batch size, the peers interleaved (order rotated per batch size)."""
  for peer in active:
    t = results['tutorial'].get(peer)
    if t and t['steady_steps_per_second'] and args.epochs > 1:
      rate = t['steady_steps_per_second']['median']
      results['throughput'][peer] = {str(TUTORIAL_BATCH): {
          'steps_per_second': rate, 'examples_per_second': rate * TUTORIAL_BATCH,
          'source': 'tutorial rounds (median)'}}
    else:
      results['throughput'][peer] = {}
  for i, batch_size in enumerate(args.batch_sizes):
    for peer in rotated(active, i, max(len(args.batch_sizes), 1)):
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


def measure_models(args, results):
  for k in args.num_models:
    result = run_one('fmnist_jax-device', TUTORIAL_BATCH, args.throughput_epochs, args.timeout, k)
    if 'error' in result:
      results['models'][str(k)] = {'error': result['error']}
      log(f'models    K={k:3d}: {result["error"]}')
      continue
    d = derive(result, TUTORIAL_BATCH)
    results['models'][str(k)] = {
        'model_steps_per_second': k * d['steady_steps_per_second'],
        'steps_per_second': d['steady_steps_per_second'], 'raw': result}
    log(f'models    K={k:3d}: {k * d["steady_steps_per_second"]:10.1f} model-steps/s')


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  start = time.perf_counter()
  log(f'Writing the report to {os.path.abspath(args.out)}'
      + (' (scratch: --quick never writes the committed reports)' if args.quick else ''))
  env = environment(args, argv)
  results = {'environment': env, 'skipped': {}, 'first_runs': {}, 'tutorial': {}, 'ratios': {},
             'round_orders': [], 'round_load': [], 'throughput': {}, 'models': {},
             'target_accuracy': TARGET_ACCURACY, 'tutorial_epochs': args.epochs,
             'tutorial_batch_size': TUTORIAL_BATCH, 'rounds': args.rounds,
             'batch_sizes': args.batch_sizes,
             'throughput_epochs': args.throughput_epochs, 'descriptions': {
                 p: peers_lib.PEERS[p][1] for p in args.peers}}
  active = []
  for peer in args.peers:
    missing = missing_modules(peer)
    if missing:
      results['skipped'][peer] = f'not installed: {", ".join(missing)} (pip install -e .[bench])'
    else:
      active.append(peer)
  data_dir = prepare_data()
  load = load_average()
  if load is not None and load > 0.5 * (os.cpu_count() or 1):
    log(f'warning: load average {load:.1f} on {os.cpu_count()} cores: other processes are running, '
        'so these timings will not hold (PyTorch\'s default threads slow down many times over)')

  measure_tutorial(args, active, results, data_dir)
  active = [p for p in active if p in results['tutorial']]
  measure_throughput(args, active, results)
  if 'fmnist_jax-device' in active:
    measure_models(args, results)

  results['benchmark_seconds'] = time.perf_counter() - start
  paths = report.write(results, args.out)
  for path in paths:
    log(f'wrote {path}')
  log(f'benchmark took {results["benchmark_seconds"]:.0f} s')
  return results


if __name__ == '__main__':
  main()
