"""Shared fixtures: real Fashion-MNIST prepared once per session into a temporary tfds data dir;
and the check that a run skipped only what its environment's list expects (FMNIST_EXPECTED_SKIPS).
"""

import fcntl
import fnmatch
import os
import subprocess
import sys

import pytest

from fmnist_jax import data
from fmnist_jax import config as config_lib
from fmnist_jax.data import idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_test_config():
  """configs/test.py, loaded by path as --config loads it."""
  return config_lib.load(os.path.join(ROOT, 'configs', 'test.py'))


def _source_dir():
  for candidate in (os.environ.get(data.MANUAL_DIR_ENV), data.DEBIAN_DIR):
    if candidate and idx.has_files(candidate):
      return candidate
  pytest.fail('the real Fashion-MNIST IDX files are needed: run ./setup.sh (installs Debian\'s '
              f'dataset-fashion-mnist) or set ${data.MANUAL_DIR_ENV}.')


def _run_folder(tmp_path_factory):
  """This test run's temporary folder, shared by pytest-xdist's workers."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get('PYTEST_XDIST_WORKER') else root


@pytest.fixture(scope='session', autouse=True)
def compile_cache(tmp_path_factory):
  """The compilation cache ('auto') of this test run, shared by its workers and the processes they
  start: tests see what a fresh machine sees, whatever earlier runs left in ~/.cache."""
  folder = _run_folder(tmp_path_factory) / 'xdg_cache'
  os.environ['XDG_CACHE_HOME'] = str(folder)
  return folder


@pytest.fixture(scope='session')
def source_dir():
  return _source_dir()


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory, source_dir):
  """A tfds data dir holding the prepared dataset, prepared from the IDX files once per test run
  (pytest-xdist's workers share it: the first prepares it, the others wait for it)."""
  root = _run_folder(tmp_path_factory)
  path = root / 'tfds_shared'
  with open(root / 'tfds_shared.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / 'tfds_shared.ready').exists():
      config = load_test_config()
      config.data.data_dir = str(path)
      config.data.manual_dir = source_dir
      data.load(config.data)
      (root / 'tfds_shared.ready').touch()
  return str(path)


@pytest.fixture(scope='session')
def arrays(data_dir):
  config = load_test_config()
  config.data.data_dir = data_dir
  return data.load(config.data)


@pytest.fixture
def config(data_dir):
  """configs/test.py pointed at the session's data."""
  config = load_test_config()
  config.data.data_dir = data_dir
  config.data.download = False
  return config


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory, data_dir):
  """configs/test.py trained for its one epoch (with TensorBoard files): read-only for tests."""
  from fmnist_jax import loop
  config = load_test_config()
  config.data.data_dir = data_dir
  config.tensorboard = True
  path = tmp_path_factory.mktemp('trained')
  loop.train_and_evaluate(config, str(path))
  return path


def run_cli(*args, env=None, timeout=600, cwd=ROOT):
  """Runs `python -m <args>` and returns the CompletedProcess (text output)."""
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True,
                        timeout=timeout, cwd=cwd, env=full_env)


def initial_state(config):
  """(graphdef, TrainState) of a new run of `config`, as the trainer builds it."""
  from fmnist_jax import steps
  from fmnist_jax.plan import ModelSpec, OptimizerSpec
  return steps.init_state(ModelSpec.from_config(config), OptimizerSpec.from_config(config),
                          config.seed)


def wait_for_lock_record(proc, workdir, timeout: float = 300) -> None:
  """Returns once `proc` holds <workdir>/.lock: the holder writes its name there only then, so
  waiting for the name never races it (probing the lock could take it first). The timeout is a
  hang guard that fails the test; it measures nothing."""
  import socket
  import time
  record = f'pid {proc.pid} on {socket.gethostname()}\n'
  deadline = time.time() + timeout
  while True:
    try:
      with open(os.path.join(workdir, '.lock'), encoding='utf-8') as f:
        if f.read() == record:
          return
    except FileNotFoundError:
      pass
    assert proc.poll() is None, f'{proc.args} ended without taking the lock'
    assert time.time() < deadline, f'{proc.args} never took the lock'
    time.sleep(0.01)


def restore_state(config, workdir):
  """(TrainState, record) of the newest readable checkpoint in `workdir`."""
  from fmnist_jax.run import checkpoint
  _, template = initial_state(config)
  ckpt = checkpoint.Checkpointer(str(workdir), read_only=True)
  try:
    return ckpt.restore(template)
  finally:
    ckpt.close()


# Expected skips ----------------------------------------------------------------------------------

EXPECTED_SKIPS_ENV = 'FMNIST_EXPECTED_SKIPS'


def read_expected_skips(path: str) -> list[tuple[str, str]]:
  """(pattern, reason) per line of an expected-skips file: `<node id or fnmatch pattern>  # why`.

  Blank lines and lines starting with '#' are comments; a line without its reason is refused, so
  every listed skip says why this environment cannot run it.
  """
  entries = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      pattern, _, reason = line.partition('#')
      if not pattern.strip() or not reason.strip():
        raise pytest.UsageError(f'{path}:{number}: expected `<node id or pattern>  # reason`, '
                                f'got {line!r}')
      entries.append((pattern.strip(), reason.strip()))
  return entries


def unexpected_skips(skipped: dict[str, str], expected: list[tuple[str, str]]) -> dict[str, str]:
  """The skipped node ids (with pytest's reason) that no expected pattern matches."""
  return {node: reason for node, reason in skipped.items()
          if not any(fnmatch.fnmatchcase(node, pattern) for pattern, _ in expected)}


class ExpectedSkips:
  """Fails the run (exit 1) when a test skips that the environment's list does not name: a skip
  passes silently otherwise, and a guarantee whose test cannot run here would go unchecked."""

  def __init__(self, path: str):
    self.path = path
    self.expected = read_expected_skips(path)
    self.skipped = {}

  def _record(self, report) -> None:
    if report.skipped and not hasattr(report, 'wasxfail'):  # An xfail is reported as skipped.
      reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
      self.skipped[report.nodeid] = reason

  def pytest_runtest_logreport(self, report):  # On the controller too, with pytest-xdist.
    self._record(report)

  def pytest_collectreport(self, report):
    self._record(report)

  def pytest_sessionfinish(self, session):
    if unexpected_skips(self.skipped, self.expected) and session.exitstatus == 0:
      session.exitstatus = pytest.ExitCode.TESTS_FAILED

  def pytest_terminal_summary(self, terminalreporter):
    unexpected = unexpected_skips(self.skipped, self.expected)
    expected = len(self.skipped) - len(unexpected)
    terminalreporter.write_line(f'{len(self.skipped)} skipped, {expected} of them listed in '
                                f'{self.path}')
    for node, reason in sorted(unexpected.items()):
      terminalreporter.write_line(f'UNEXPECTED SKIP {node}: {reason}', red=True)
    if unexpected:
      terminalreporter.write_line(f'{len(unexpected)} unexpected skip(s): make them run here, or '
                                  f'list them in {self.path} with the reason', red=True)


def pytest_configure(config):
  path = os.environ.get(EXPECTED_SKIPS_ENV)
  if path and not hasattr(config, 'workerinput'):  # The controller sees every worker's reports.
    config.pluginmanager.register(ExpectedSkips(path), 'fmnist_expected_skips')
