"""Turns benchmark results into <platform>-<device>.md, .json and PNG plots."""

import json
import os
import re

BASELINE = 'fmnist_jax-device'


def slug(env) -> str:
  name = env['device_kind'] if env['platform'] != 'cpu' else f'{env["cpu_cores"]}core'
  return re.sub(r'[^a-z0-9]+', '-', f'{env["platform"]}-{name}'.lower()).strip('-')


def _fmt(stat, digits=2):
  if stat is None:
    return 'n/a'
  if stat['n'] == 1:
    return f'{stat["median"]:.{digits}f}'
  return f'{stat["median"]:.{digits}f} ({stat["min"]:.{digits}f}-{stat["max"]:.{digits}f})'


def _ratio(results, peer, key):
  base = results['tutorial'].get(BASELINE, {}).get(key)
  this = results['tutorial'][peer].get(key)
  if not base or not this or not base['median']:
    return 'n/a'
  return f'{this["median"] / base["median"]:.1f}x'


def markdown(results, plot_names) -> str:
  env = results['environment']
  lines = [
      f'# fmnist_jax benchmark: {env["platform"]} ({env["device_kind"]})', '',
      f'- Date: {env["date"]}' + (' (quick smoke run: not representative)' if env['quick'] else ''),
      f'- Command: `{env["command"]}`',
      f'- Hardware: {env["device_count"]} x {env["device_kind"]} ({env["platform"]}); CPU '
      f'{env["cpu"]}, {env["cpu_cores"]} cores'
      + (f', {env["memory_gib"]:.0f} GiB' if env.get('memory_gib') else ''),
      f'- Python {env["python"]}; ' + ', '.join(f'{k} {v}' for k, v in env['versions'].items()),
      '- Same data (tfds fashion_mnist), model (784-128-10 MLP, glorot-uniform), optimizer '
      '(Adam 1e-3, eps 1e-7) and batch size for every peer; each peer in its own process.', '']
  lines += [f'## Tutorial run: {results["tutorial_epochs"]} epochs at batch 32', '',
            'Medians (min-max) over the repeats. *Training* is the time inside the training loop; '
            'peers without a separate compile step pay compilation inside it (their first-epoch '
            'excess over a steady epoch is shown as *compile / first epoch*). fmnist_jax compiles '
            'ahead of time, so *training + compile* is the fair total for it. *Process* is the '
            'whole process: imports, data loading, evaluation. *x fmnist_jax* is the peer\'s '
            f'training time over {BASELINE}\'s, in this sitting.', '',
            '| peer | training s | compile / first epoch s | training + compile s | '
            f'process s | time to {results["target_accuracy"]:.0%} s | test accuracy | '
            'x fmnist_jax (training) | x fmnist_jax (training + compile) |',
            '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for peer, t in results['tutorial'].items():
    lines.append(
        f'| {peer} | {_fmt(t["train_seconds"])} | {_fmt(t["compile_seconds"])} | '
        f'{_fmt(t["train_plus_compile_seconds"])} | {_fmt(t["wall_seconds"], 1)} | '
        f'{_fmt(t["time_to_target_seconds"])} | {_fmt(t["test_accuracy"], 4)} | '
        f'{_ratio(results, peer, "train_seconds")} | '
        f'{_ratio(results, peer, "train_plus_compile_seconds")} |')
  lines += ['', 'Peers:', ''] + [f'- `{p}`: {d}' for p, d in results['descriptions'].items()]
  if results['throughput']:
    sizes = results['batch_sizes']
    lines += ['', '## Steady-state throughput (steps/s; examples/s below)', '',
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
    lines += ['', '## Skipped peers', ''] + [f'- `{p}`: {why}'
                                            for p, why in results['skipped'].items()]
  if plot_names:
    lines += ['', '## Plots', ''] + [f'![{n}]({n})' for n in plot_names]
  return '\n'.join(lines) + '\n'


def plots(results, out_dir, stem) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = []
  if results['throughput']:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for peer, by_size in results['throughput'].items():
      pts = [(int(b), r['examples_per_second']) for b, r in by_size.items()
             if 'examples_per_second' in r]
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
  tutorial = results['tutorial']
  if BASELINE in tutorial and len(tutorial) > 1:
    base = tutorial[BASELINE]['train_seconds']['median']
    peers = list(tutorial)
    ratios = [tutorial[p]['train_seconds']['median'] / base for p in peers]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bars = ax.barh(peers, ratios, color=['tab:green' if p == BASELINE else 'tab:gray'
                                         for p in peers])
    ax.bar_label(bars, labels=[f'{r:.1f}x' for r in ratios])
    ax.set(xlabel=f'training time relative to {BASELINE} (lower is faster)',
           title=f'Tutorial run ({results["tutorial_epochs"]} epochs, batch 32)')
    ax.invert_yaxis()
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
