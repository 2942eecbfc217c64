"""The README and the docs pages as a contract: their shell commands, run verbatim and in order in
a fresh clone.

Every line of a ```sh block (README.md, then the pages of PAGES in that order) is run, in one bash
session (so `source .venv/bin/activate` holds for
the lines after it), except lines marked `# [not run here: <reason>]` (Colab, a second host, the
test suite itself). Each must exit 0 without a traceback, and the clone's `git status` must be
clean at the end. The environment is a newcomer's: an empty home folder; only variables the README
documents are set (TFDS_DATA_DIR, to reuse this session's prepared data instead of preparing it
again, and XDG_CACHE_HOME, this session's compilation cache: its programs, not compiled again).
"""

import glob
import hashlib
import os
import re
import subprocess

import pytest

from tests.conftest import ROOT

SKIP = re.compile(r'#\s*\[not run here: [^\]]+\]')
# Every page with commands, in the order a reader meets them (a page's commands may use what an
# earlier one made: workdirs/base is trained by the README's).
PAGES = ('README.md', 'docs/training.md', 'docs/data.md', 'docs/photos.md', 'docs/devices.md',
         'docs/reliability.md', 'docs/benchmarks.md', 'docs/promises.md', 'docs/tutorial.md',
         'docs/tutorial.ko.md')
MARKER = '__fmnist_readme_rc__'


def readme_commands(text: str) -> list[str]:
  """The commands of the README's ```sh blocks, continuation lines joined, comments kept."""
  commands = []
  for block in re.findall(r'^```sh\n(.*?)^```', text, flags=re.M | re.S):
    pending = ''
    for line in block.splitlines():
      if pending:
        pending += '\n' + line
      elif line.strip() and not line.lstrip().startswith('#'):
        pending = line
      else:
        continue
      if not line.rstrip().endswith('\\'):
        commands.append(pending)
        pending = ''
  return commands


def page_commands(root) -> list[str]:
  """The commands of every page of PAGES, in order."""
  commands = []
  for page in PAGES:
    with open(os.path.join(root, page)) as f:
      commands += readme_commands(f.read())
  return commands


def test_every_page_is_run():
  """A docs page missing from PAGES would have its commands silently skipped."""
  pages = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md'))}
  assert pages | {'README.md'} == set(PAGES)


def test_readme_commands_are_found():
  commands = page_commands(ROOT)
  assert commands[0].startswith('./setup.sh')
  assert any(c.startswith('python -m fmnist_jax.train --config configs/base.py') for c in commands)
  assert any(SKIP.search(c) for c in commands)  # The test suite itself is not run by itself.
  assert readme_commands('```sh\na \\\n  b\n# c\nd  # e\n```\n') == ['a \\\n  b', 'd  # e']


@pytest.mark.slow
def test_readme_commands_work_verbatim_in_order(data_dir, tmp_path):
  clone = tmp_path / 'clone'
  subprocess.run(['git', 'clone', '-q', ROOT, str(clone)], check=True)
  # The installed environment, as ./setup.sh leaves it: the clone's setup.sh finds it complete.
  os.symlink(os.path.join(ROOT, '.venv'), clone / '.venv')
  home = tmp_path / 'home'
  home.mkdir()
  commands = [c for c in page_commands(clone) if not SKIP.search(c)]
  script = ''.join(f'{c}\necho "{MARKER} $? {i}"\n' for i, c in enumerate(commands))
  env = {k: v for k, v in os.environ.items() if not k.startswith(('VIRTUAL_ENV', 'PYTHON'))}
  env.update(HOME=str(home), TFDS_DATA_DIR=data_dir, FMNIST_EXTRAS=_installed_extras())
  result = subprocess.run(['bash', '-c', script], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=1500)
  output = result.stdout + result.stderr
  codes = {int(i): int(rc) for rc, i in re.findall(rf'{MARKER} (\d+) (\d+)', result.stdout)}
  for i, command in enumerate(commands):
    assert codes.get(i) == 0, f'`{command}` exited {codes.get(i)}:\n{output[-4000:]}'
  assert 'Traceback' not in output, output[-4000:]
  status = subprocess.run(['git', 'status', '--porcelain'], cwd=clone, capture_output=True,
                          text=True, check=True).stdout
  assert not status.strip(), status


def _installed_extras() -> str:
  """The extras of the installed .venv (its setup.sh stamp), so the clone's setup.sh reinstalls
  nothing into the shared environment; skips when that stamp is out of date."""
  digest = hashlib.sha1()
  for name in ('pyproject.toml', 'setup.sh'):
    with open(os.path.join(ROOT, name), 'rb') as f:
      digest.update(f.read())
  prefix = f'.fmnist_jax-{digest.hexdigest()[:12]}-'
  stamps = [n for n in os.listdir(os.path.join(ROOT, '.venv')) if n.startswith(prefix)]
  if not stamps:
    pytest.skip('.venv is older than pyproject.toml or setup.sh: run ./setup.sh first')
  return stamps[0][len(prefix):].replace('_', ',')


def test_skip_marker():
  assert SKIP.search('python -m pytest  # [not run here: the test suite itself]')
  assert not SKIP.search('python -m pytest  # runs the tests')
