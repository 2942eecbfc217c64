"""Turns benchmark results into <platform>-<device>.md, .json and PNG plots."""

import json
import os
import re

BASELINE = 'fmnist_jax-device'
RATIO_NAMES = {'train_seconds': 'training', 'train_plus_compile_seconds': 'training + compile',
               'whole_seconds': 'whole command'}


def slug(env) -> str:
  name = env['device_kind'] if env['platform'] != 'cpu' else f'{env["cpu_cores"]}core'
  return re.sub(r'[^a-z0-9]+', '-', f'{env["platform"]}-{name}'.lower()).strip('-')


def _fmt(stat, digits=2):
  if not stat:
    return 'n/a'
  if stat['n'] == 1:
    return f'{stat["median"]:.{digits}f}'
  return f'{stat["median"]:.{digits}f} ({stat["min"]:.{digits}f}-{stat["max"]:.{digits}f})'


def _ratio(stat):
  """'median x (min-max)' of a peer's per-round ratios."""
  if not stat or 'median' not in stat:
    return 'n/a'
  if stat['n'] == 1:
    return f'{stat["median"]:.1f}x'
  return f'{stat["median"]:.1f}x ({stat["min"]:.1f}-{stat["max"]:.1f})'


def _x(value):
  return 'n/a' if value is None else f'{value:.2f}x'


def _header(results):
  env = results['environment']
  lines = [
      f'# fmnist_jax benchmark: {env["platform"]} ({env["device_kind"]})', '',
      f'- Date: {env["date"]}' + (' (quick smoke run: not representative)' if env['quick'] else ''),
      f'- Command: `{env["command"]}`'
      + (f' ({results["benchmark_seconds"] / 60:.0f} minutes)'
         if results.get('benchmark_seconds') else ''),
      f'- Hardware: {env["device_count"]} x {env["device_kind"]} ({env["platform"]}); CPU '
      f'{env["cpu"]}, {env["cpu_cores"]} cores'
      + (f', {env["memory_gib"]:.0f} GiB memory' if env.get('memory_gib') else ''),
      f'- Software: Python {env["python"]}; '
      + ', '.join(f'{k} {v}' for k, v in env['versions'].items()),
      '- Same data (tfds fashion_mnist), model (784-128-10 MLP, glorot-uniform), optimizer '
      '(Adam 1e-3, eps 1e-7) and batch size for every peer; each peer in its own process.', '']
  return lines


def _tutorial(results):
  tutorial, ratios = results['tutorial'], results.get('ratios', {})
  rounds = results['rounds']
  epochs = results['tutorial_epochs']
  lines = [f'## Tutorial run: {epochs} epoch{"s" if epochs != 1 else ""} at batch '
           f'{results.get("tutorial_batch_size", 32)}, {rounds} interleaved rounds', '',
           'Each round runs every peer once, in an order rotated from round to round (listed '
           'below), so the machine\'s drift during the benchmark lands on all peers alike. '
           'Seconds are medians (min-max) over the rounds. *x fmnist_jax* is the peer\'s time over '
           f'{BASELINE}\'s **in the same round**, then the median (min-max) of those per-round '
           'ratios (not a ratio of medians). *Training* is the time inside the training loop; '
           'peers without a separate compile step pay compilation inside it. fmnist_jax compiles '
           'ahead of time, so *training + compile* is the fair total for it. *Whole command* is '
           'process start to exit, imports, data loading, compilation and evaluation included '
           '(the commands are listed below).', '',
           '| peer | training s | x fmnist_jax (training) | training + compile s | '
           'x fmnist_jax (training + compile) | whole command s | x fmnist_jax (whole command) | '
           f'time to {results["target_accuracy"]:.0%} s | test accuracy |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for peer, t in tutorial.items():
    r = ratios.get(peer, {})
    lines.append(
        f'| {peer} | {_fmt(t["train_seconds"])} | {_ratio(r.get("train_seconds"))} | '
        f'{_fmt(t["train_plus_compile_seconds"])} | '
        f'{_ratio(r.get("train_plus_compile_seconds"))} | {_fmt(t["whole_seconds"], 1)} | '
        f'{_ratio(r.get("whole_seconds"))} | {_fmt(t["time_to_target_seconds"])} | '
        f'{_fmt(t["test_accuracy"], 4)} |')

  lines += ['', f'### Ratios to {BASELINE}, round by round', '']
  for metric, name in RATIO_NAMES.items():
    lines += [f'{name.capitalize()}:', '',
              '| peer | ' + ' | '.join(f'round {i + 1}' for i in range(rounds))
              + ' | min | median | max |', '| --- |' + ' --- |' * (rounds + 3)]
    for peer in tutorial:
      stat = ratios.get(peer, {}).get(metric, {})
      cells = [_x(v) for v in stat.get('per_round', [None] * rounds)]
      cells += [_x(stat.get(k)) for k in ('min', 'median', 'max')]
      lines.append(f'| {peer} | ' + ' | '.join(cells) + ' |')
    lines.append('')

  lines += ['### Whole commands', '',
            'Each timed from process start to exit; fmnist_jax in a new workdir each round.', '']
  for peer, t in tutorial.items():
    first = next((r for r in t['rounds'] if r and r.get('whole_command')), None)
    if first:
      lines.append(f'- `{peer}`: `{first["whole_command"]}`')
  if any(p.startswith('fmnist_jax-') for p in tutorial):
    lines.append('')
    if results['environment'].get('compile_cache_field'):
      lines += ['Compilation cache (JAX\'s persistent cache): '
                'one folder per fmnist_jax peer (the command '
                'above plus `--config.compile_cache_dir=<folder>`), empty at the start of the '
                'benchmark. Each fmnist_jax command ran '
                'once into it before the rounds (its first run, below), so the rounds measure a '
                'user\'s second run (new workdir, warm cache). Cache state in each round: '
                + '; '.join(f'{p} ' + ', '.join(r['compile_cache'] if r else 'n/a'
                                                 for r in t['rounds'])
                            for p, t in tutorial.items() if p.startswith('fmnist_jax-')) + '.', '',
                'First run, empty cache:', '',
                '| peer | whole command s | compile s | training s | compile cache |',
                '| --- | --- | --- | --- | --- |']
      for peer, f in results.get('first_runs', {}).items():
        lines.append(f'| {peer} | {f["whole_seconds"]:.1f} | {f["compile_seconds"]:.2f} | '
                     f'{f["train_seconds"]:.2f} | {f["compile_cache"]} |')
    else:
      lines.append('This fmnist_jax has no persistent compilation cache (no `compile_cache_dir` '
                   'config field): every fmnist_jax command compiles.')
  lines += ['', 'Order of the rounds:', '']
  loads = results.get('round_load', [])
  for i, order in enumerate(results['round_orders']):
    load = loads[i] if i < len(loads) and None not in loads[i] else None
    lines.append(f'{i + 1}. ' + ', '.join(order)
                 + (f' (1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end)'
                    if load and len(load) == 2 else ''))
  lines += ['', 'Peers:', ''] + [f'- `{p}`: {d}' for p, d in results['descriptions'].items()]
  return lines


def markdown(results, plot_names) -> str:
  lines = _header(results)
  if results['tutorial']:
    lines += _tutorial(results)
  if any(results['throughput'].values()):
    sizes = sorted({int(b) for by_size in results['throughput'].values() for b in by_size})
    lines += ['', '## Steady-state throughput (steps/s; examples/s below)', '',
              f'Batch {results.get("tutorial_batch_size", 32)}: the steady epochs of the tutorial '
              f'rounds (median). Other batch sizes: one run of {results["throughput_epochs"]} '
              'epochs per peer, the last one measured, the peers interleaved.', '',
              '| peer | ' + ' | '.join(f'batch {b}' for b in sizes) + ' |',
              '| --- |' + ' --- |' * len(sizes)]
    for peer, by_size in results['throughput'].items():
      cells = []
      for b in sizes:
        r = by_size.get(str(b), {})
        cells.append(f'{r["steps_per_second"]:.0f}<br>{r["examples_per_second"]:.3g} ex/s'
                     if 'steps_per_second' in r else r.get('error', 'n/a')[:40])
      lines.append(f'| {peer} | ' + ' | '.join(cells) + ' |')
  if results['models']:
    lines += ['', '## Many models at once (fmnist_jax, jax.vmap, batch 32)', '',
              '| models K | steps/s | models x steps/s |', '| --- | --- | --- |']
    for k, r in results['models'].items():
      if 'error' in r:
        lines.append(f'| {k} | {r["error"]} | |')
      else:
        lines.append(f'| {k} | {r["steps_per_second"]:.0f} | {r["model_steps_per_second"]:.0f} |')
  if results['skipped']:
    lines += ['', '## Not measured', ''] + [f'- `{p}`: {why}'
                                           for p, why in results['skipped'].items()]
  if plot_names:
    lines += ['', '## Plots', ''] + [f'![{n}]({n})' for n in plot_names]
  return '\n'.join(lines) + '\n'


def plots(results, out_dir, stem) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = []
  if any(results['throughput'].values()):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for peer, by_size in results['throughput'].items():
      pts = sorted((int(b), r['examples_per_second']) for b, r in by_size.items()
                   if 'examples_per_second' in r)
      if pts:
        ax.plot(*zip(*pts), marker='o', label=peer)
    ax.set(xscale='log', yscale='log', xlabel='batch size', ylabel='examples / s (steady state)',
           title='Training throughput vs batch size')
    ax.legend(fontsize=8)
    ax.grid(True, which='both', alpha=0.3)
    names.append(f'{stem}-throughput.png')
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, names[-1]), dpi=100)
    plt.close(fig)
  ratios = results.get('ratios', {})
  peers = [p for p in results['tutorial'] if ratios.get(p, {}).get('train_seconds', {}).get('n')]
  if BASELINE in peers and len(peers) > 1:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    height = 0.4
    for j, (metric, color) in enumerate((('train_seconds', 'tab:blue'),
                                         ('whole_seconds', 'tab:orange'))):
      ys, med, err = [], [], [[], []]
      for i, p in enumerate(peers):
        stat = ratios[p].get(metric, {})
        if stat.get('n'):
          ys.append(i + (j - 0.5) * height)
          med.append(stat['median'])
          err[0].append(stat['median'] - stat['min'])
          err[1].append(stat['max'] - stat['median'])
      bars = ax.barh(ys, med, height=height, xerr=err, color=color, capsize=3,
                     label=RATIO_NAMES[metric])
      ax.bar_label(bars, labels=[f'{m:.1f}x' for m in med], fontsize=8, padding=6)
    ax.set_yticks(range(len(peers)), peers)
    ax.axvline(1.0, color='black', linewidth=0.8)
    ax.set(xlabel=f'time relative to {BASELINE}, same round (median, min-max; lower is faster)',
           title=f'Tutorial run ({results["tutorial_epochs"]} epoch(s), batch 32, '
           f'{results["rounds"]} rounds)')
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    names.append(f'{stem}-speedup.png')
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, names[-1]), dpi=100)
    plt.close(fig)
  return names


def write(results, out_dir) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  stem = slug(results['environment'])
  names = plots(results, out_dir, stem)
  md = os.path.join(out_dir, f'{stem}.md')
  js = os.path.join(out_dir, f'{stem}.json')
  with open(js, 'w') as f:
    json.dump(results, f, indent=1)
  with open(md, 'w') as f:
    f.write(markdown(results, names))
  return [md, js] + [os.path.join(out_dir, n) for n in names]
