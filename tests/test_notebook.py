"""The Colab notebook: valid, its stops, its subprocesses, and a whole run on Colab's TPU runtime.

The whole run needs an environment as Colab's TPU runtime is (.ci/colab_env.sh creates .venv-colab:
Python 3.13, the runtime's packages, no TensorFlow); the notebook's kernel runs there and installs
into it, as on Colab:
    .ci/colab_env.sh
    FMNIST_COLAB_PYTHON=.venv-colab/bin/python python -m pytest tests/test_notebook.py
The other tests run the kernel of the interpreter that runs pytest.
"""

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from datetime import datetime

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from fmnist_jax import colab
from tests.conftest import ROOT

NOTEBOOK = os.path.join(ROOT, 'notebooks', 'colab_tpu.ipynb')
COLAB_PYTHON = os.environ.get('FMNIST_COLAB_PYTHON')
if COLAB_PYTHON:  # A relative path is the project folder's, as in .ci/run.
  COLAB_PYTHON = os.path.join(ROOT, COLAB_PYTHON)
INSTALLED = ('import json; from importlib import metadata; print(json.dumps({d.metadata["Name"]: '
             'd.version for d in metadata.distributions()}))')


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == 'code']


def _cell(nb, marker):
  """The code cell whose source contains `marker`."""
  return next(c for c in _code_cells(nb) if marker in c.source)


def test_notebook_is_valid():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  cells = [c.source for c in _code_cells(nb)]
  code = '\n'.join(cells)
  assert max(len(c.splitlines()) for c in cells) <= 30  # Cells a Colab user reads in seconds.
  assert 'setup_tpu' not in code  # Today's TPU runtimes need none.
  assert "SOURCE = ''" in code and 'FMNIST_JAX_SOURCE' in code  # No invented default.
  assert "'fmnist_jax.train', '--config', 'configs/base.py'" in code  # The README's command.
  # The accelerator check comes before any install; training, the benchmark and the check run
  # before the kernel imports JAX, which it pins to the CPU first.
  first_jax = code.index('from fmnist_jax import data')
  assert code.index('colab.first_check(') < code.index('colab.install(')
  assert all(code.index(s) < first_jax for s in ("'fmnist_jax.train'", "'benchmarks.run'",
                                                 'colab.check_accelerator('))
  assert code.index("jax.config.update('jax_platforms', 'cpu')") < first_jax
  assert "'jax' in sys.modules" in cells[0]  # Caught in the first cell.
  assert 'predict.' not in code and 'inference.confusion_matrix' in code
  # The range in which the notebook keeps the runtime's jax is pyproject.toml's.
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    jax_spec = next(d for d in tomllib.load(f)['project']['dependencies'] if d.startswith('jax>'))
  assert colab.JAX_SPEC == jax_spec[len('jax'):]
  assert [colab.jax_fits(v) for v in ('0.7.1', '0.7.2', '0.12.0.1', '0.12.1', '0.13.0', None)] == [
      False, True, True, False, False, False]  # Each clause, the != too.


def _execute(nb, cwd, env, drop=(), kernel='python3'):
  """Runs the notebook with `env` added (and `drop` removed); returns it with its outputs.

  Stops at the first cell that raises, as "Run all" does.
  """
  old = dict(os.environ)
  os.environ.update(env)  # The kernel inherits this process's environment.
  for name in drop:
    os.environ.pop(name, None)
  try:
    NotebookClient(nb, timeout=900, kernel_name=kernel,
                   resources={'metadata': {'path': str(cwd)}}).execute()
  except CellExecutionError:
    pass
  finally:
    os.environ.clear()
    os.environ.update(old)
  return nb


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _outputs(nb):
  outputs = [o for c in _code_cells(nb) for o in c.outputs]
  return (outputs, ''.join(o.get('text', '') for o in outputs),
          [o for o in outputs if 'image/png' in o.get('data', {})],
          [o for o in outputs if 'text/markdown' in o.get('data', {})])


def _timings(nb):
  """Seconds per code cell, from nbclient's timestamps."""
  def seconds(cell):
    timing = cell.metadata.get('execution', {})
    start, end = timing.get('iopub.execute_input'), timing.get('shell.execute_reply')
    if not (start and end):
      return None
    parse = lambda t: datetime.fromisoformat(t.replace('Z', '+00:00'))
    return round((parse(end) - parse(start)).total_seconds())
  return [seconds(c) for c in _code_cells(nb)]


def _stopped(nb):
  """The one-line messages of the cells that stopped."""
  return [o.traceback for o in _outputs(nb)[0] if o.output_type == 'error']


def test_notebook_stops_without_source(tmp_path):
  """Without SOURCE, "Run all" stops at the first cell with one sentence, not a traceback."""
  nb = _execute(_read(), tmp_path, {}, drop=['FMNIST_JAX_SOURCE'])
  assert _stopped(nb) == [['Stopped: set SOURCE in this cell to the git URL of fmnist_jax or the '
                           'path of its uploaded folder (or set FMNIST_JAX_SOURCE), then run all '
                           'cells again.']]
  assert all(not c.outputs for c in _code_cells(nb)[1:])


def test_notebook_says_to_mount_drive(tmp_path):
  """A Drive path on a runtime that has not mounted Drive: the sentence says so (no git error)."""
  nb = _execute(_read(), tmp_path, {'FMNIST_JAX_SOURCE': '/content/drive/MyDrive/fmnist_jax'})
  assert _stopped(nb) == [['Stopped: /content/drive/MyDrive/fmnist_jax is on Google Drive, which '
                           'this session has not mounted: run `from google.colab import drive; '
                           'drive.mount("/content/drive")` in a cell (or Files → Mount Drive), '
                           'then Run all.']]


def test_notebook_stops_in_a_kernel_that_imported_jax(tmp_path):
  """A user's cell that used JAX first (it holds the TPU): the first cell says to restart."""
  nb = _read()
  users_cell = 'import jax\njax.numpy.zeros(1).block_until_ready()'
  nb.cells.insert(0, nbformat.v4.new_code_cell(users_cell))
  nb = _execute(nb, tmp_path, {'FMNIST_JAX_SOURCE': ROOT, 'FMNIST_NOTEBOOK_SMOKE': '1'})
  assert _stopped(nb) == [['Stopped: this session has already imported JAX, which may hold the '
                           'accelerator: Runtime → Restart session, then Run all.']]
  assert all(not c.outputs for c in _code_cells(nb)[2:])


def test_a_held_tpu_says_to_restart_the_session(tmp_path):
  """libtpu's "TPU already in use" (its wording: tests/test_export.py checks it against libtpu)
  becomes the sentence that says what to do."""
  held = ("import sys; sys.stderr.write('RuntimeError: Unable to initialize backend tpu: ABORTED: "
          "The TPU is already in use by process with pid 4242. Not attempting to load libtpu.so in "
          "this process.\\n'); sys.exit(1)")
  with pytest.raises(colab.Stop, match='^the TPU is already in use by process 4242: Runtime → '
                     'Restart session, then Run all.$'):
    colab.check_accelerator(str(tmp_path), probe=held)


def test_the_estimate_beside_a_run_is_the_report_row_of_its_device():
  """Each estimated target's row at batch 32 (one model) is found from the device kind JAX
  reports (hardware/targets.py's tables); another device or batch has none."""
  from fmnist_jax.hardware import targets
  for kind in ('tpu', 'gpu'):
    with open(os.path.join(ROOT, 'benchmarks', 'reports', f'{kind}-estimate.json')) as f:
      estimate = json.load(f)
    rows = [r for r in estimate['rows'] if r['batch_size'] == 32 and r['num_models'] == 1]
    assert rows
    for row in rows:
      device_kind = (targets.TPUS[row['topology'].split(':')[0]].device_kind if kind == 'tpu'
                     else targets.GPUS[row['topology']].device_kind)
      line = colab.estimate_line({'device_kind': device_kind, 'batch_size': 32,
                                  'steps_per_second': 1000.0}, ROOT)
      assert line.endswith(f'{estimate["what"]}: {row["estimated_steps_per_second"]:,.0f} (an '
                           'estimate, not a measurement)'), line
      assert colab.estimate_line({'device_kind': device_kind, 'batch_size': 64,
                                  'steps_per_second': 1.0}, ROOT).startswith('no compiler')
  assert colab.estimate_line({'device_kind': 'cpu', 'batch_size': 32, 'steps_per_second': 1.0},
                             ROOT).startswith('no compiler estimate for cpu at batch 32')


def test_the_accelerator_gate_stops_a_runtime_without_one(tmp_path, monkeypatch):
  """The gate the smoke runs switch off: on a CPU it stops, naming a plugin that does not match."""
  with pytest.raises(colab.Stop, match='^this runtime has no TPU: Runtime → Change runtime type'):
    colab.check_accelerator(str(tmp_path))
  real = colab.version
  monkeypatch.setattr(colab, 'version', lambda n: '0.0.21' if n == 'libtpu' else real(n))
  with pytest.raises(colab.Stop, match='^JAX runs on the CPU although libtpu 0.0.21 is installed'):
    colab.check_accelerator(str(tmp_path))
  monkeypatch.setattr(colab, 'version', lambda n: None)  # No JAX yet: the device files decide.
  monkeypatch.setattr(colab.os.path, 'exists', lambda p: False)
  with pytest.raises(colab.Stop, match='^this runtime has no TPU'):
    colab.first_check(str(tmp_path))
  assert colab.first_check(str(tmp_path), accept_cpu=True) is None


QUIET = ('import subprocess, sys, time\n'
         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', sys.argv[1]])\n"
         'time.sleep(600)\n')


def _processes_with(text):
  """{pid: command line} of the live processes whose command line contains `text`."""
  found = {}
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        cmdline = f.read().replace(b'\0', b' ').decode(errors='replace')
      with open(f'/proc/{pid}/stat') as f:
        zombie = f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except OSError:
      continue
    if text in cmdline and not zombie:
      found[int(pid)] = cmdline
  return found


def _wait_for(condition, timeout, what):
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, f'timed out after {timeout} s waiting for {what}'
    time.sleep(0.2)


def _lock_free(workdir):
  with open(os.path.join(workdir, '.lock'), 'a') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return False
    fcntl.flock(f, fcntl.LOCK_UN)
    return True


def _printed(kc):
  """What the kernel's last execution printed (its iopub messages up to its idle status)."""
  text = []
  while True:
    msg = kc.get_iopub_msg(timeout=30)
    if msg['msg_type'] == 'stream':
      text.append(msg['content']['text'])
    if msg['msg_type'] == 'status' and msg['content']['execution_state'] == 'idle':
      return ''.join(text)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_interrupt_or_restart_leaves_no_process_behind(tmp_path, data_dir):
  """The training cell in a real kernel: an interrupt ends the training before the cell stops and
  leaves the workdir unlocked; a kernel killed mid-command (a restart) takes the command and its
  children along. The workdir first holds a run from another kind of device, which the cell does
  not take for its own."""
  from jupyter_client.manager import start_new_kernel
  nb = _read()
  src = tmp_path / 'src'
  subprocess.run(['git', 'clone', '-q', ROOT, str(src)], check=True)
  workdir = src / 'workdirs' / 'colab-cpu-cpu'
  workdir.mkdir(parents=True)
  # A run of another kind of device in this one's workdir.
  foreign = {'backend': 'tpu', 'device_kind': 'TPU v5 lite'}
  (workdir / 'summary.json').write_text(json.dumps(foreign))
  env = dict(os.environ, FMNIST_JAX_SOURCE=str(src), FMNIST_NOTEBOOK_SMOKE='1',
             TFDS_DATA_DIR=data_dir)
  setup = '\n'.join([_cell(nb, "SOURCE = ''").source,
                     _cell(nb, 'from fmnist_jax import colab').source,
                     'BACKEND, DEVICES, KIND, _ = colab.check_accelerator(HOME, accept_cpu=True)'])
  train = _cell(nb, "'fmnist_jax.train'").source
  assert "'--config.num_epochs=1'" in train
  train = train.replace("'--config.num_epochs=1'", "'--config.num_epochs=100'")  # Minutes long.

  def training():
    """The training process, once it holds the workdir's lock."""
    try:
      holder = int((workdir / '.lock').read_text().split()[1])
    except (OSError, IndexError, ValueError):
      return None
    return holder if 'fmnist_jax.train' in _processes_with(str(workdir)).get(holder, '') else None

  marker = str(tmp_path / 'quiet')
  km, kc = start_new_kernel(kernel_name='python3', cwd=str(tmp_path), env=env)
  try:
    assert kc.execute_interactive(setup, timeout=120)['content']['status'] == 'ok'
    kc.execute(train)
    _wait_for(training, 180, 'the training to take the workdir lock')
    assert '--fresh' in _processes_with(str(workdir))[training()]
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=120)['content']
    assert reply['status'] == 'error' and reply['ename'] == 'KeyboardInterrupt'
    assert _processes_with(str(workdir)) == {} and _lock_free(workdir)  # Before the cell stopped.
    assert 'holds a run on tpu (TPU v5 lite), not on this runtime\'s cpu (cpu): training again' in (
        _printed(kc))

    # A restart kills the kernel mid-command. This command prints nothing (so no broken pipe ends
    # it) and has a child of its own, as the benchmark's peers are.
    kc.execute(f'colab.run([sys.executable, "-c", {QUIET!r}, {marker!r}])')
    _wait_for(lambda: len(_processes_with(marker)) == 3, 60, 'supervisor, command and its child')
  finally:
    km.shutdown_kernel(now=True)  # SIGKILL to the kernel's process group, as a restart.
    kc.stop_channels()
  try:
    _wait_for(lambda: not _processes_with(marker), 20, 'the command to end with its kernel')
  finally:  # Whatever this test failed to end.
    for pid in _processes_with(str(tmp_path)):
      os.kill(pid, signal.SIGKILL)


# The whole notebook on Colab's TPU runtime -------------------------------------------------------


def _colab_kernel(tmp_path):
  """A kernel spec for FMNIST_COLAB_PYTHON, in a folder for $JUPYTER_PATH."""
  spec = tmp_path / 'jupyter' / 'kernels' / 'colab'
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [COLAB_PYTHON, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'Colab TPU runtime', 'language': 'python'}))
  return str(tmp_path / 'jupyter')


def _colab_installed():
  out = subprocess.run([COLAB_PYTHON, '-I', '-c', INSTALLED], capture_output=True, text=True,
                       check=True)  # -I: not this folder's fmnist_jax.egg-info.
  return {re.sub(r'[-_.]+', '-', n).lower(): v for n, v in json.loads(out.stdout).items()}


@pytest.mark.slow
@pytest.mark.skipif(not COLAB_PYTHON, reason='needs FMNIST_COLAB_PYTHON: an environment as '
                    "Colab's TPU runtime is (.ci/colab_env.sh creates .venv-colab)")
def test_notebook_on_colab_runtime_from_a_fresh_clone_twice(tmp_path):
  if subprocess.run([COLAB_PYTHON, '-c', 'import tensorflow'], capture_output=True).returncode == 0:
    pytest.fail(f'TensorFlow imports in {COLAB_PYTHON}, but Colab\'s TPU runtime has none: run '
                '.ci/colab_env.sh, which takes back what an earlier notebook run installed.')
  preinstalled = _colab_installed()
  origin = tmp_path / 'origin'  # A fresh clone of this commit, as a user's git URL.
  subprocess.run(['git', 'clone', '-q', ROOT, str(origin)], check=True)
  env = {'FMNIST_JAX_SOURCE': f'file://{origin}', 'FMNIST_NOTEBOOK_SMOKE': '1',
         'TFDS_DATA_DIR': str(tmp_path / 'tfds'),  # Empty: the notebook prepares the data.
         'TF_CPP_MIN_LOG_LEVEL': '3', 'JUPYTER_PATH': _colab_kernel(tmp_path)}
  home = tmp_path / 'colab'
  home.mkdir()
  src = home / 'fmnist_jax_src'

  nb = _execute(_read(), home, env, kernel='colab')
  print('first run, seconds per code cell:', _timings(nb))
  outputs, text, images, reports = _outputs(nb)
  assert not [o for o in outputs if o.output_type == 'error'], text[-3000:]
  assert 'tensorflow-cpu 2.' in text and 'preinstalled packages kept their versions' in text
  assert 'fmnist_jax ready: jax 0.7.2' in text and 'cpu: 1 x cpu' in text
  assert re.search(r'Trained on 1 x cpu \(cpu\): \d+ steps .*; test accuracy 0\.8', text), text
  assert 'test accuracy recomputed here on the CPU from the saved parameters: 0.8' in text
  assert 'Epoch 1/1' in text and len(images) == 4  # Grid, predictions, bars, confusion matrix.
  assert len(reports) == 1 and 'fmnist_jax-device' in reports[0]['data']['text/markdown']
  assert (src / 'workdirs' / 'colab-cpu-cpu' / 'summary.json').exists()
  assert os.listdir(src / 'reports') == ['cpu-cpu']
  assert not (home / 'fmnist_jax').exists()  # Nothing that shadows the package.

  # A runtime restart: a new kernel, the same folder. Nothing is cloned, installed, retrained or
  # measured again; an earlier notebook's unkeyed results and another device's report stay unseen.
  (src / 'workdirs' / 'colab').mkdir()
  (src / 'reports' / 'gpu-nvidia-l4').mkdir()
  (src / 'reports' / 'gpu-nvidia-l4' / 'gpu-nvidia-l4.md').write_text('# a GPU report\n')
  nb = _execute(_read(), home, env, kernel='colab')
  print('second run, seconds per code cell:', _timings(nb))
  outputs, text, images, reports = _outputs(nb)
  assert not [o for o in outputs if o.output_type == 'error'], text[-3000:]
  assert 'already installed' in text and 'not retraining' in text
  assert 'Not benchmarking' in text and 'already holds a report for cpu (cpu)' in text
  assert 'Epoch 1/1' not in text and len(images) == 4 and len(reports) == 1
  assert 'a GPU report' not in reports[0]['data']['text/markdown']

  # Without the test override, a runtime without TPU or GPU stops before anything is installed.
  nb = _execute(_read(), home, env, drop=['FMNIST_NOTEBOOK_SMOKE'], kernel='colab')
  assert _stopped(nb) == [
      ['Stopped: this runtime has no TPU: Runtime → Change runtime type → TPU.']]
  assert not _cell(nb, 'colab.install(SRC, HOME)').outputs

  # Every package the runtime had keeps its version.
  after = _colab_installed()
  assert {n: (v, after.get(n)) for n, v in preinstalled.items() if after.get(n) != v} == {}
  assert {'fmnist-jax', 'tensorflow-cpu', 'ml-collections'} <= set(after) - set(preinstalled)
