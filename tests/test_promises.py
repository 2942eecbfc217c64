"""docs/promises.md names a test for every promise, and CI lists the skips it expects."""

import ast
import fnmatch
import functools
import glob
import os
import re

import pytest

from tests.conftest import ROOT, read_expected_skips, unexpected_skips

NODE = re.compile(r'`(tests/[\w/]+\.py)::(\w+)(\[[^\]`]*\])?`')


@functools.cache
def _tests() -> dict[str, set[str]]:
  """Test file -> the test functions it defines (parsed, not imported)."""
  found = {}
  for path in glob.glob(os.path.join(ROOT, 'tests', 'test_*.py')):
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read())
    found[os.path.relpath(path, ROOT)] = {
        node.name for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith('test_')}
  return found


def _rows() -> list[str]:
  """The promise rows of docs/promises.md's tables (header and rule lines left out)."""
  with open(os.path.join(ROOT, 'docs', 'promises.md'), encoding='utf-8') as f:
    lines = f.read().splitlines()
  return [l for l in lines if l.startswith('| ') and not l.startswith(('| Promise', '| ---'))]


def test_every_promise_names_tests_that_exist():
  rows = _rows()
  assert len(rows) > 60  # The three sections' promises, not an empty page.
  for row in rows:
    nodes = NODE.findall(row)
    assert nodes or '**Not tested**' in row, f'no test named: {row}'
    for path, name, _ in nodes:
      assert name in _tests().get(path, ()), f'{path}::{name} does not exist ({row})'


def _ci_pytest_lines() -> list[str]:
  """Every pytest command of CI's scripts, continuation lines joined."""
  commands = []
  for script in ('run', 'compile_check.sh'):
    with open(os.path.join(ROOT, '.ci', script), encoding='utf-8') as f:
      text = f.read().replace('\\\n', ' ')
    commands += [l for l in text.splitlines() if not l.lstrip().startswith('#') and (
        '-m pytest' in l or re.search(r'\.ci/py313\.sh -[^-]', l))]  # Not --install-only.
  return commands


def test_every_ci_pytest_run_lists_its_expected_skips():
  commands = _ci_pytest_lines()
  assert len(commands) >= 5
  for command in commands:
    match = re.search(r'FMNIST_EXPECTED_SKIPS="?([^"\s]+)', command)
    assert match, f'no FMNIST_EXPECTED_SKIPS: {command}'
    paths = [match.group(1).replace('$stack', s) for s in ('newest', 'colab-tpu')]
    for path in paths:
      assert os.path.isfile(os.path.join(ROOT, path)), path


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, '.ci', 'expected-skips',
                                                             '*.txt'))), ids=os.path.basename)
def test_expected_skips_name_tests_that_exist_and_say_why(path):
  names = [f'{file}::{name}' for file, functions in _tests().items() for name in functions]
  for pattern, reason in read_expected_skips(path):
    base = pattern.split('[', 1)[0]  # A parametrized id matches by its function.
    assert any(fnmatch.fnmatchcase(n, base) for n in names), f'{pattern} matches no test'
    assert len(reason) > 10, reason


def test_unexpected_skips_are_those_no_pattern_matches(tmp_path):
  listed = tmp_path / 'skips.txt'
  listed.write_text('# comment\n\ntests/test_a.py::test_x*  # no compiler here\n')
  expected = read_expected_skips(str(listed))
  assert expected == [('tests/test_a.py::test_x*', 'no compiler here')]
  skipped = {'tests/test_a.py::test_xla[v5e]': 'needs libtpu',
             'tests/test_a.py::test_disk_full': 'needs root'}
  assert unexpected_skips(skipped, expected) == {'tests/test_a.py::test_disk_full': 'needs root'}
  listed.write_text('tests/test_a.py::test_x\n')  # No reason: refused.
  with pytest.raises(pytest.UsageError, match='reason'):
    read_expected_skips(str(listed))
