"""Estimated training speed on TPUs and GPUs, from their own compilers without the hardware, beside
this machine's measured CPU speed.

    python -m benchmarks.estimate --tpu v5e:1x1,v6e:1x1   # needs libtpu: pip install -e '.[tpu]'
    python -m benchmarks.estimate --gpu t4,h100           # needs pip install -e '.[cuda12]'

For batch 32, 512 and 8192 (one model) and for 1, 8 and 64 vmapped models at batch 32 it compiles
one train step as the trainer builds it ('train_step', fmnist_jax.programs.one_step) for one chip
and turns its time into steps/s and examples/s: on TPUs XLA:TPU's cost-model estimate, on GPUs a
roofline bound (fmnist_jax.hardware.targets). Both leave out loop, launch and host overheads, so
they are upper bounds on speed, not measurements. Writes benchmarks/reports/tpu-estimate.md and .json (or
gpu-estimate.*); the CPU column is read from the measured benchmarks/reports/cpu-2core.json.
"""

import argparse
import copy
import json
import os
import platform
import sys

from fmnist_jax.hardware import targets
from fmnist_jax import config as config_lib
from fmnist_jax import cli
from fmnist_jax.hardware import compile_check
from fmnist_jax.errors import exit_on_user_error

REPORTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'reports')
CPU_REPORT = os.path.join(REPORTS, 'cpu-2core.json')
BATCH_SIZES = (32, 512, 8192)
NUM_MODELS = (1, 8, 64)  # At batch 32.
WHAT = {
    'tpu': ("XLA:TPU's cost-model estimates, not measurements",
            "XLA:TPU's cost model (the compiled program's `optimal_seconds`)"),
    'gpu': ('roofline-bound estimates, not measurements',
            'a roofline bound: the larger of flops / peak FLOP/s and bytes accessed / memory '
            "bandwidth (flops and bytes from XLA:CPU's cost analysis of the same program, peaks "
            'from fmnist_jax/hardware/targets.py and the device description)'),
}


def cases():
  """(batch_size, num_models) of every estimate."""
  return [(b, 1) for b in BATCH_SIZES] + [(32, m) for m in NUM_MODELS if m != 1]


def cpu_measured(path: str = CPU_REPORT) -> tuple[dict, str]:
  """{(batch, models): (steps/s, examples/s)} measured on this CPU (fmnist_jax-device), and where
  they come from."""
  with open(path) as f:
    report = json.load(f)
  measured = {}
  for batch, entry in report['throughput']['fmnist_jax-device'].items():
    measured[(int(batch), 1)] = (entry['steps_per_second'], entry['examples_per_second'])
  for models, entry in report['models'].items():
    if int(models) != 1:  # One model at batch 32 comes from the tutorial rounds above.
      steps = entry['steps_per_second']
      measured[(32, int(models))] = (steps, steps * 32 * int(models))
  env = report['environment']
  root = os.path.dirname(os.path.dirname(REPORTS))
  source = (f'{os.path.relpath(path, root)} ({env["date"]}, {env["cpu"]}, '
            f'{env["cpu_cores"]} cores, jax {env["versions"]["jax"]})')
  return measured, source


def estimate(kind: str, target: str, batch: int, models: int) -> dict:
  """One train step of the base config at that batch and model count, compiled for one chip."""
  config = copy.deepcopy(config_lib.base())
  config.batch_size, config.num_models = batch, models
  if kind == 'tpu':
    (record,) = compile_check.compile_tpu(config, targets.parse_tpu(target), False,
                                          ('train_step',), log=lambda _: None)
  else:
    (record,) = compile_check.compile_gpu(config, targets.GPUS[target], 1, False,
                                          ('train_step',), log=lambda _: None)
  seconds = record['estimated_seconds']
  steps = 1 / seconds if seconds else None  # None: the cost model gave no estimate.
  return dict(record, batch_size=batch, num_models=models, estimated_steps_per_second=steps,
              estimated_examples_per_second=steps and steps * batch * models)


def _si(value, missing='not measured') -> str:
  if value is None:
    return missing
  for unit, scale in (('M', 1e6), ('k', 1e3)):
    if value >= scale:
      return f'{value / scale:,.1f}{unit}'
  return f'{value:,.0f}'


def _table(rows, measured, label, key, word) -> list[str]:
  lines = [f'| chip | {label} | MFLOP per step | {word} us per step | {word} steps/s | '
           f'{word} examples/s | CPU measured steps/s | CPU measured examples/s | '
           f'{word} / CPU |', '| --- |' + ' --- |' * 8]
  for r in rows:
    cpu = measured.get((r['batch_size'], r['num_models']))
    steps, seconds = r['estimated_steps_per_second'], r['estimated_seconds']
    ratio = f'{steps / cpu[0]:,.0f}x' if cpu and steps else '-'
    lines.append(
        f'| {r["topology"]} | {r[key]:,} | {r["flops"] / 1e6:,.1f} | '
        f'{f"{seconds * 1e6:,.1f}" if seconds else "none given"} | {_si(steps, "-")} | '
        f'{_si(r["estimated_examples_per_second"], "-")} | {_si(cpu and cpu[0])} | '
        f'{_si(cpu and cpu[1])} | {ratio} |')
  return lines


def markdown(kind: str, report: dict) -> str:
  short, long = WHAT[kind]
  chips = ', '.join(report['targets'])
  rows, measured = report['rows'], {tuple(k): v for k, v in report['cpu_measured']}
  word = 'estimated' if kind == 'tpu' else 'roofline'
  lines = [
      f'# Training speed on {chips}: {short}', '',
      f'- Compiled on a {report["machine"]} without the accelerator, by '
      f'{"XLA:TPU" if kind == "tpu" else "XLA:GPU"} ({report["compiler"]}). The command: '
      f'`{report["command"]}`.',
      "- What: one train step as the trainer builds it (`train_step`, fmnist_jax/programs.py's "
      '`one_step`; the chunk\'s own cost also holds what each call pays once) of configs/base.py '
      '(784-128-10 MLP, Adam, float32), for one chip. Its time is ' + long + '.',
      '- These leave out the loop, launch and host overheads (the trainer runs a whole epoch in '
      'one compiled loop, whose per-step overhead no cost model counts): they bound what a chip '
      'could do, they are not what it does. Nothing here ran on a TPU or GPU.',
      '- CPU columns: measured on this machine, fmnist_jax device mode, from '
      f'{report["cpu_source"]}.',
      '- examples/s counts every model\'s examples: batch x models x steps/s. "none given": the '
      'cost model returned no time (-1) for that program.', '',
      f'## Batch size, one model: {short}', '',
      *_table([r for r in rows if r['num_models'] == 1], measured, 'batch', 'batch_size',
              word), '',
      f'## Models trained at once (jax.vmap) at batch 32: {short}', '',
      *_table([r for r in rows if r['batch_size'] == 32], measured, 'models', 'num_models', word),
      '']
  return '\n'.join(lines)


def run(kind: str, targets: list[str], out_dir: str = REPORTS, log=print) -> dict:
  """Estimates every case on every target and writes <kind>-estimate.md and .json."""
  measured, source = cpu_measured()
  rows = []
  for target in targets:
    for batch, models in cases():
      rows.append(estimate(kind, target, batch, models))
      log(f'estimate: {target} batch {batch} models {models}: '
          f'{rows[-1]["estimated_seconds"]} s per step')
  report = {'title': f'Training speed: {WHAT[kind][0]}', 'kind': kind, 'targets': targets,
            'what': WHAT[kind][1], 'compiler': compile_check.compiler_versions(kind),
            'command': 'python -m benchmarks.estimate ' + ' '.join(sys.argv[1:]),
            'machine': f'{os.cpu_count()}-core {platform.machine()} CPU machine',
            'cpu_source': source, 'cpu_measured': [[list(k), v] for k, v in measured.items()],
            'rows': rows}
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f'{kind}-estimate')
  with open(stem + '.json', 'w') as f:
    json.dump(report, f, indent=1)
  with open(stem + '.md', 'w') as f:
    f.write(markdown(kind, report))
  log(f'estimate: wrote {stem}.md and .json')
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument('--tpu', help='TPU topologies, e.g. v5e:1x1,v6e:1x1')
  group.add_argument('--gpu', help='GPUs, e.g. t4,h100')
  parser.add_argument('--out', default=REPORTS, help='Folder for the reports.')
  args = parser.parse_args(argv)
  compile_check.compile_env(gpu=bool(args.gpu))  # Before JAX starts.
  cli.quiet_frameworks()  # libtpu's warnings that this machine has no TPU.
  with exit_on_user_error():
    kind = 'tpu' if args.tpu else 'gpu'
    run(kind, [t.strip() for t in (args.tpu or args.gpu).split(',') if t.strip()], args.out)


if __name__ == '__main__':
  main()
