"""Checks that `pip install '.[tpu]'`, `'.[cuda12]'` and `'.[cuda13]'` resolve to one jax version
with its matching plugin (pip's --dry-run report, nothing installed; needs PyPI), for the Python
that runs it (CI: 3.11, and 3.13 as on Colab, where the notebook installs `.[tpu]` or `.[cuda12]`
when the runtime's jax is outside the range).

Usage: python .ci/check_extras.py [EXTRA ...]
"""

import json
import os
import subprocess
import sys
import tempfile
from concurrent import futures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGINS = {'tpu': ('libtpu',), 'cuda12': ('jax-cuda12-plugin', 'jax-cuda12-pjrt'),
           'cuda13': ('jax-cuda13-plugin', 'jax-cuda13-pjrt')}


def resolve(extra: str) -> dict[str, str]:
  """{normalized name: version} that pip would install for `.[extra]` into an empty environment."""
  with tempfile.TemporaryDirectory() as tmp:
    report = os.path.join(tmp, 'report.json')
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--dry-run', '--ignore-installed',
                    '--report', report, f'{ROOT}[{extra}]'], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with open(report) as f:
      installs = json.load(f)['install']
  return {i['metadata']['name'].lower().replace('_', '-'): i['metadata']['version']
          for i in installs}


def check(extra: str, versions: dict[str, str]) -> str:
  jax = versions['jax']
  assert versions['jaxlib'] == jax, (extra, versions['jaxlib'], jax)
  for plugin in PLUGINS[extra]:
    assert plugin in versions, f'{extra}: {plugin} missing'
    if plugin != 'libtpu':  # jax[tpu] pins its libtpu release exactly; its number is its own.
      assert versions[plugin] == jax, f'{extra}: {plugin} {versions[plugin]} with jax {jax}'
  others = [n for n in versions if n.startswith(('jax-cuda', 'libtpu')) and n not in PLUGINS[extra]]
  assert not others, f'{extra}: other plugins {others}'
  python = '.'.join(map(str, sys.version_info[:2]))
  return f'{extra} (Python {python}): jax {jax}, ' + ', '.join(
      f'{p} {versions[p]}' for p in PLUGINS[extra])


def main(extras):
  with futures.ThreadPoolExecutor(len(extras)) as pool:
    for extra, versions in zip(extras, pool.map(resolve, extras)):
      print('check_extras:', check(extra, versions))


if __name__ == '__main__':
  main(sys.argv[1:] or list(PLUGINS))
