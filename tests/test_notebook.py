"""The Colab notebook: valid, and run end to end from a fresh clone, twice, on Colab's versions.

The run needs the environment pinned to Colab's TPU runtime (.ci/colab_env.sh creates .venv-colab;
.ci/run runs this file there): the notebook installs into the interpreter that runs it, as on Colab.
"""

import os
import subprocess
from importlib import metadata

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests.conftest import ROOT

NOTEBOOK = os.path.join(ROOT, 'notebooks', 'colab_tpu.ipynb')
PINS = os.path.join(ROOT, '.ci', 'colab-tpu.txt')


def _code(nb):
  return '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')


def _off_pins():
  """The packages whose installed version differs from Colab's TPU runtime's."""
  off = []
  with open(PINS) as f:
    for line in f:
      if '==' in line and not line.startswith('#'):
        name, want = line.strip().split('==')
        try:
          have = metadata.version(name)
        except metadata.PackageNotFoundError:
          have = None
        if have != want:
          off.append(f'{name} {have} (Colab: {want})')
  return off


def test_notebook_is_valid():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = _code(nb)
  assert 'setup_tpu' not in code  # Today's TPU runtimes need none.
  assert "SOURCE = ''" in code and 'FMNIST_JAX_SOURCE' in code  # No invented default.
  assert "'fmnist_jax.train', '--config', 'configs/base.py'" in code  # The README's command.
  # Training, the benchmark and the accelerator check run before the kernel imports JAX.
  first_jax = code.index('from fmnist_jax import')
  assert all(code.index(s) < first_jax for s in ("'fmnist_jax.train'", "'benchmarks.run'",
                                                 'import jax; d = jax.devices()'))
  assert "os.environ['JAX_PLATFORMS'] = 'cpu'" in code[:first_jax]


def _execute(nb_path, cwd, env, drop=()):
  """Runs the notebook with `env` added (and `drop` removed); returns it with its outputs.

  Stops at the first cell that raises, as "Run all" does.
  """
  nb = nbformat.read(nb_path, as_version=4)
  old = dict(os.environ)
  os.environ.update(env)  # The kernel inherits this process's environment.
  for name in drop:
    os.environ.pop(name, None)
  try:
    NotebookClient(nb, timeout=900, kernel_name='python3',
                   resources={'metadata': {'path': str(cwd)}}).execute()
  except CellExecutionError:
    pass
  finally:
    os.environ.clear()
    os.environ.update(old)
  return nb


def _outputs(nb):
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  return (outputs, ''.join(o.get('text', '') for o in outputs),
          [o for o in outputs if 'image/png' in o.get('data', {})],
          [o for o in outputs if 'text/markdown' in o.get('data', {})])


def _stopped(nb):
  """The one-line messages of the cells that stopped."""
  return [o.traceback for o in _outputs(nb)[0] if o.output_type == 'error']


@pytest.mark.slow
def test_notebook_runs_from_a_fresh_clone_twice(request, tmp_path):
  off = _off_pins()
  if off:
    pytest.skip('runs in the environment pinned to Colab\'s TPU runtime (.ci/colab_env.sh, then '
                '.venv-colab/bin/python -m pytest tests/test_notebook.py); here: ' + ', '.join(off))
  data_dir = request.getfixturevalue('data_dir')  # Only now: preparing it takes half a minute.
  origin = tmp_path / 'origin'  # A fresh clone of this commit, as a user's git URL.
  subprocess.run(['git', 'clone', '-q', ROOT, str(origin)], check=True)
  env = {'FMNIST_JAX_SOURCE': f'file://{origin}', 'FMNIST_NOTEBOOK_SMOKE': '1',
         'TFDS_DATA_DIR': data_dir, 'TF_CPP_MIN_LOG_LEVEL': '3'}
  home = tmp_path / 'colab'
  home.mkdir()
  src = home / 'fmnist_jax_src'

  outputs, text, images, reports = _outputs(_execute(NOTEBOOK, home, env))
  assert not [o for o in outputs if o.output_type == 'error']
  assert 'fmnist_jax ready: jax 0.7.2' in text and 'cpu: ' in text
  assert "'test_accuracy': 0.8" in text and 'Epoch 1/1' in text
  assert len(images) == 4  # Grid, predictions, one image's bars, confusion matrix.
  assert len(reports) == 1 and 'fmnist_jax-device' in reports[0]['data']['text/markdown']
  assert (src / 'workdirs' / 'colab' / 'summary.json').exists()
  assert not (home / 'fmnist_jax').exists()  # Nothing that shadows the package.

  # A runtime restart: a new kernel, the same folder. Nothing is cloned, installed or retrained.
  outputs, text, images, reports = _outputs(_execute(NOTEBOOK, home, env))
  assert not [o for o in outputs if o.output_type == 'error']
  assert 'already installed' in text and 'not retraining' in text
  assert 'Epoch 1/1' not in text and len(images) == 4 and len(reports) == 1

  # Without the test override, a runtime without TPU or GPU stops before training.
  nb = _execute(NOTEBOOK, home, env, drop=['FMNIST_NOTEBOOK_SMOKE'])
  assert _stopped(nb) == [
      ['Stopped: this runtime has no TPU: Runtime → Change runtime type → TPU.']]
  assert 'not retraining' not in _outputs(nb)[1]


def test_notebook_stops_without_source(tmp_path):
  """Without SOURCE, "Run all" stops at the first cell with one sentence, not a traceback."""
  nb = _execute(NOTEBOOK, tmp_path, {}, drop=['FMNIST_JAX_SOURCE'])
  assert _stopped(nb) == [['Stopped: set SOURCE in this cell to the git URL of fmnist_jax or the '
                           'path of its uploaded folder (or set FMNIST_JAX_SOURCE), then run all '
                           'cells again.']]
  assert all(not c.outputs for c in nb.cells[2:] if c.cell_type == 'code')


