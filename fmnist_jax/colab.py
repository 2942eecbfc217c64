"""The Colab notebook's machinery: the accelerator probe, installs that keep the runtime's packages,
and commands run under a supervisor, so that the notebook's cells read in seconds.

Standard library only: the notebook imports it from the clone before anything is installed.
Everything stops "Run all" with one sentence (`Stop`), never a traceback.
"""

import ctypes
import json
import operator
import os
import re
import shutil
import signal
import subprocess
import sys
from importlib import metadata

from fmnist_jax.hardware import targets  # Standard library only, too.

# pyproject.toml's jax (a test holds them equal): a runtime's jax inside it is kept.
JAX_SPEC = '>=0.7.2,<0.13,!=0.12.1'
PROBE = ('import jax; d = jax.devices(); '
         'print(jax.default_backend(), len(d), d[0].device_kind, sep="|")')
# libtpu's words when another process holds the TPU (checked against libtpu.so in CI).
TPU_HELD = re.compile(r'TPU is already in use by (?:process with pid (\d+)|another process)')
NO_TPU = 'this runtime has no TPU: Runtime → Change runtime type → TPU.'
PLUGINS = ('libtpu', 'jax-cuda12-plugin', 'jax-cuda13-plugin')
# Each command runs under this supervisor, the leader of its own process group: a stop signal (an
# interrupted cell, or the kernel's end) goes to the whole group, the benchmark's peer processes
# too, and whatever is left after 30 s is killed, so no process keeps the TPU or the workdir lock.
SUPERVISOR = r"""
import os, signal, subprocess, sys, time
child, deadline = subprocess.Popen(sys.argv[2:]), []
def stop(signum, frame):
    if not deadline:
        deadline.append(time.monotonic() + 30)
        os.killpg(0, signal.SIGTERM)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, stop)
if os.getppid() != int(sys.argv[1]):  # The kernel ended before the parent-death signal was set.
    stop(None, None)
while child.poll() is None and not (deadline and time.monotonic() > deadline[0]):
    time.sleep(0.1)
if deadline:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGKILL)
sys.exit(child.returncode)
"""


class Stop(Exception):
  """Stops "Run all" with one sentence instead of a traceback."""

  def _render_traceback_(self):
    return [f'Stopped: {self}']


def check_source(source: str, src: str) -> None:
  """That `src`, got from `source`, is an fmnist_jax checkout the notebook can run."""
  if source.endswith('.whl'):
    raise Stop('a wheel holds the package but not configs/ and benchmarks/; give the git URL or '
               'the uploaded project folder instead.')
  if not os.path.isfile(os.path.join(src, 'configs', 'base.py')):
    raise Stop(f'{src} is not an fmnist_jax checkout (no configs/base.py).')


def _die_with_kernel():
  """Linux: the supervisor gets SIGTERM when the kernel ends (a restart, a crash)."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def child_env() -> dict:
  """The kernel's environment less JAX_PLATFORMS: the kernel's choice (the CPU), not theirs."""
  return {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}


def run(cmd, cwd=None) -> list[str]:
  """Runs a command, streaming its output here; a failure stops with its last line. An interrupt
  ends the command and every process it started before the cell stops."""
  proc = subprocess.Popen([sys.executable, '-c', SUPERVISOR, str(os.getpid()), *cmd], cwd=cwd,
                          env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True, preexec_fn=_die_with_kernel)
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line.rstrip())
      print(line, end='', flush=True)
    proc.wait()
  finally:
    if proc.poll() is None:  # Interrupted: the supervisor stops its process group.
      proc.terminate()
      try:
        proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
  if proc.returncode:
    last = next((l for l in reversed(lines) if l.strip()), 'no output')
    raise Stop(f'`{" ".join(cmd)}` failed: {last}')
  return lines


def version(name: str) -> str | None:
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def _release(v: str | None):
  return tuple(int(x) for x in re.findall(r'\d+', v)) if v else None


def jax_fits(v: str | None) -> bool:
  """Whether jax `v` is inside JAX_SPEC (each of its >=, < and != clauses)."""
  ops = {'>=': operator.ge, '<': operator.lt, '!=': operator.ne}
  return v is not None and all(ops[op](_release(v), _release(bound))
                               for op, bound in re.findall(r'(>=|<|!=)([\d.]+)', JAX_SPEC))


def check_accelerator(cwd: str, accept_cpu: bool = False, probe: str = PROBE) -> tuple:
  """(backend, device count, device kind, jax version) as a new process sees them; stops without
  a TPU or GPU (`accept_cpu`: the tests' smoke runs), or when another process holds the TPU."""
  out = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, cwd=cwd,
                       env=child_env())
  held = TPU_HELD.search(out.stderr)
  if held:
    pid = held.group(1)
    who = ("this notebook's kernel" if pid == str(os.getpid()) else
           f'process {pid}' if pid else 'another process')
    raise Stop(f'the TPU is already in use by {who}: Runtime → Restart session, then Run all.')
  if out.returncode:
    raise Stop(f'JAX does not start: {(out.stderr.strip().splitlines() or ["no output"])[-1]}')
  backend, devices, kind = out.stdout.strip().splitlines()[-1].split('|')
  plugin = next((p for p in PLUGINS if version(p)), None)
  if backend == 'cpu' and not accept_cpu:
    if plugin:
      raise Stop(f'JAX runs on the CPU although {plugin} {version(plugin)} is installed: it does '
                 f'not match jax {version("jax")}; Runtime → Disconnect and delete runtime, then '
                 'run all cells again.')
    raise Stop(NO_TPU)
  print(f'{backend}: {devices} x {kind}')
  return backend, int(devices), kind, version('jax')


def first_check(cwd: str, accept_cpu: bool = False):
  """check_accelerator where JAX is installed (Colab's runtimes); elsewhere the device files
  (JAX's own answer comes after the install): None, or a Stop without a TPU or GPU."""
  if version('jax'):
    return check_accelerator(cwd, accept_cpu)
  devices = ('/dev/accel0', '/dev/vfio/0', '/dev/nvidia0')  # TPU v4 and older, TPU v5+, GPU.
  if not accept_cpu and not any(os.path.exists(p) for p in devices):
    raise Stop(NO_TPU)
  return None


def versions() -> str:
  """'jax 0.7.2, jaxlib 0.7.2, libtpu 0.0.23, ...': what the run uses."""
  names = ('jax', 'jaxlib', *PLUGINS[:2], 'flax', 'optax', 'orbax-checkpoint',
           'tensorflow-datasets', 'protobuf')
  return ', '.join(f'{n} {version(n)}' for n in names if version(n))


def estimate_line(summary: dict, src: str) -> str:
  """The compilers' estimate for this accelerator (benchmarks/reports/*-estimate.json) beside the
  measured run: an estimate leaves out loop, launch and host overheads."""
  kinds = {**{f'{g}:1x1': tpu.device_kind for g, tpu in targets.TPUS.items()},
           **{name: gpu.device_kind for name, gpu in targets.GPUS.items()}}
  for kind in ('tpu', 'gpu'):
    with open(os.path.join(src, 'benchmarks', 'reports', f'{kind}-estimate.json')) as f:
      estimate = json.load(f)
    for row in estimate['rows']:
      if (kinds.get(row['topology']) == summary['device_kind'] and row['num_models'] == 1
          and row['batch_size'] == summary['batch_size'] == 32):
        return (f'steps/s at batch 32: measured {summary["steps_per_second"]:,.0f} on '
                f'{summary["device_kind"]}; {estimate["what"]}: '
                f'{row["estimated_steps_per_second"]:,.0f} (an estimate, not a measurement)')
  return (f'no compiler estimate for {summary["device_kind"]} at batch {summary["batch_size"]} '
          '(benchmarks/reports/tpu-estimate.md, gpu-estimate.md)')


def _installed() -> dict:
  """{name: version} of every installed distribution, names as pip normalises them."""
  found = {}
  for dist in metadata.distributions():
    found.setdefault(re.sub(r'[-_.]+', '-', dist.metadata['Name']).lower(), dist.version)
  return found


def _succeeds(code: str, cwd: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=cwd,
                        env={**child_env(), 'TF_CPP_MIN_LOG_LEVEL': '3'})


def install(src: str, home: str) -> None:
  """Installs fmnist_jax from `src` (editable) and what it misses, every preinstalled package as
  a constraint: the runtime's jax is kept when inside JAX_SPEC, else jax comes with its plugin."""
  found = _succeeds('import fmnist_jax; print(fmnist_jax.__file__)', home)
  from_src = found.returncode == 0 and found.stdout.strip().startswith(os.path.join(src, ''))
  fits = jax_fits(version('jax'))
  need_tf = _succeeds('import tensorflow', home).returncode != 0  # Any TensorFlow build works.
  if from_src and fits and not need_tf:
    print('already installed')
    return
  before = _installed()
  # Where jax must change, its plugins and its own dependencies may move with it.
  keep = {n: v for n, v in before.items() if n != 'fmnist-jax' and (
      fits or n in ('numpy', 'protobuf'))}
  pins = os.path.join(home, 'fmnist_jax_pins.txt')
  with open(pins, 'w') as f:
    f.writelines(f'{n}=={v}\n' for n, v in keep.items())
  target = src
  if not fits:  # jax with its plugin at one version.
    target = f'{src}[{"cuda12" if shutil.which("nvidia-smi") else "tpu"}]'
    print(f'jax {version("jax")} does not fit {JAX_SPEC}: installing {target}')
  extra = ['tensorflow-cpu>=2.18,<2.22'] if need_tf else []
  run([sys.executable, '-m', 'pip', 'install', '-q', '-c', pins, '-e', target, *extra])
  after = _installed()
  moved = [f'{n} {v} -> {after.get(n)}' for n, v in keep.items() if after.get(n) != v]
  if moved:
    raise Stop('pip changed preinstalled packages: ' + ', '.join(moved) + '.')
  print(f'installed {", ".join(f"{n} {v}" for n, v in sorted(after.items()) if n not in before)};'
        f' the {len(keep)} preinstalled packages kept their versions')


def device_key(backend: str, kind: str) -> str:
  """One folder name per kind of device: 'tpu-tpu-v5-lite', 'gpu-nvidia-l4', 'cpu-cpu'."""
  return re.sub(r'[^a-z0-9]+', '-', f'{backend}-{kind}'.lower()).strip('-')


def trained_on(summary_path: str):
  """(backend, device kind) that a run's summary.json names, or None without one."""
  try:
    with open(summary_path) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary.get('backend'), summary.get('device_kind')


def reports_on(folder: str, key: str) -> list[str]:
  """The benchmark reports in `folder` ([] if none), after checking they were measured on this
  kind of device (else the folder is removed and the notebook stops)."""
  reports = sorted(p for p in os.listdir(folder) if p.endswith('.md')) if (
      os.path.isdir(folder)) else []
  for name in reports:
    with open(os.path.join(folder, name[:-3] + '.json')) as f:
      env = json.load(f)['environment']
    if device_key(env['platform'], env['device_kind']) != key:
      shutil.rmtree(folder)
      raise Stop(f'the benchmark ran on {env["platform"]} ({env["device_kind"]}), not on this '
                 f'runtime\'s device ({key}): Runtime → Restart session, then Run all.')
  return reports
