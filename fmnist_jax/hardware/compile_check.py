"""Compiles every program the trainer runs with XLA:TPU and XLA:GPU, without the hardware.

XLA:TPU (libtpu, `pip install -e '.[tpu]'`) compiles for a topology and its cost model estimates
each program's time; XLA:GPU (the CUDA plugin, `'.[cuda12]'`) compiles from a device description
(targets.py) and reports no cost, so the time is a roofline bound from the CPU compile's flops and
bytes. `check` writes tpu_compile.json / gpu_compile.json, one record per target and program,
prints a table, and fails in one line when a program does not fit its device's memory.
"""

import functools
import importlib.metadata
import importlib.util
import json
import os
import time

from fmnist_jax import config as config_lib
from fmnist_jax.errors import UserError
from fmnist_jax.hardware import targets
from fmnist_jax.hardware.lowering import cpu_devices, dataset_programs, set_xla_flag
from fmnist_jax.run import workdir as workdir_lib

TPU_FIX = "pip install -e '.[tpu]'"
GPU_FIX = "pip install -e '.[cuda12]'"


def steps_covered(name: str) -> int:
  """How many train steps a program's cost-analysis numbers cover: one step alone, or a chunk, whose
  loop body (one step) XLA counts once."""
  return 1 if name in ('train_step', 'train_chunk', 'stream_chunk') else 0


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def tpu_devices(target: targets.TpuTarget) -> list:
  """The devices of a TPU topology, from libtpu's compile-only client."""
  if importlib.util.find_spec('libtpu') is None:
    raise UserError(f"--tpu needs XLA:TPU's compiler, libtpu, which is not installed here: "
                    f"{TPU_FIX}.")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  name = f'{target.generation}:{"x".join(map(str, target.shape))}'
  try:
    return topologies.get_topology_desc(
        topology_name=name, platform='tpu', chip_config_name=target.info.chip_config,
        chips_per_host_bounds=target.chips_per_host_bounds).devices
  except Exception as e:  # pylint: disable=broad-except  (libtpu's errors name no fix)
    raise UserError(f'libtpu could not describe --tpu {target.name}: {_first_line(e)}; check the '
                    f'shape, or reinstall a libtpu that matches jax: {TPU_FIX}.') from None


def gpu_devices(gpu: targets.GpuTarget, count: int) -> list:
  """`count` devices of one machine with that GPU, from the CUDA plugin's compile-only client."""
  if not any(importlib.util.find_spec(m) for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin')):
    raise UserError(f"--gpu needs XLA:GPU's compiler, jax's CUDA plugin, which is not installed "
                    f"here: {GPU_FIX}.")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return topologies.get_topology_desc(platform='cuda', topology=f'1x1x{count}',
                                        target_config=gpu.target_config).devices
  except Exception as e:  # pylint: disable=broad-except  (the plugin's errors name no fix)
    raise UserError(f'the CUDA plugin could not describe --gpu {gpu.name}: {_first_line(e)}; '
                    f'reinstall a plugin that matches jax: {GPU_FIX}.') from None


def _compile(program, name: str = '', where: str = ''):
  """(compiled, seconds) of one program, compiled fresh (JAX's cache would hide the time).

  XLA:TPU refuses a program that does not fit in the chip's memory: one line naming it.
  """
  start = time.perf_counter()
  try:
    compiled = program.lower().compile()
  except Exception as e:  # pylint: disable=broad-except  (jax.errors.JaxRuntimeError)
    text = ' '.join(str(e).split())
    if 'RESOURCE_EXHAUSTED' not in text:
      raise
    reason = text.split('RESOURCE_EXHAUSTED: ')[-1].rstrip('.')
    raise UserError(f'does not fit: {name} on {where}: {reason}; {targets.FIT_HINT}') from None
  return compiled, time.perf_counter() - start


def _compile_all(config, devices, topology: str, where: str, stream_chunk, names, log,
                 gpu: targets.GpuTarget | None = None) -> list[dict]:
  """A record per program compiled for `devices` (costs per device). XLA:GPU's compile-only client
  reports no cost: for a `gpu` the flops and bytes come from the same program compiled for as many
  CPU devices, and the time is targets.gpu_roofline's bound."""
  from fmnist_jax import distributed, programs  # pylint: disable=g-import-not-at-top  (JAX)
  if gpu:
    on_cpu = dataset_programs(config, distributed.make_mesh(cpu_devices(len(devices))),
                              stream_chunk, names)
  records = []
  for name, program in dataset_programs(config, distributed.make_mesh(devices), stream_chunk,
                                         names).items():
    compiled, seconds = _compile(program, name, where)
    cost = programs.cost(_compile(on_cpu[name])[0] if gpu else compiled)
    flops, bytes_accessed = cost.get('flops'), cost.get('bytes accessed')
    estimated = cost.get('optimal_seconds')
    if gpu:
      estimated = (targets.gpu_roofline(gpu, config.compute_dtype, flops, bytes_accessed)
                   if flops is not None and bytes_accessed is not None else None)
    records.append({
        'topology': topology, 'devices': len(devices), 'program': name,
        'compile_seconds': round(seconds, 3), 'memory_bytes': programs.memory(compiled),
        'flops': None if flops is None else float(flops),
        'bytes_accessed': None if bytes_accessed is None else float(bytes_accessed),
        # XLA:TPU's cost model answers -1 where it has no estimate (v5e, 8 vmapped models).
        'estimated_seconds': None if estimated is None or estimated < 0 else float(estimated),
        'steps': steps_covered(name)})
    log(f'compile: {name} for {where} with XLA:{"GPU" if gpu else "TPU"} in {seconds:.1f} s')
  return records


def compile_tpu(config, target: targets.TpuTarget, stream_chunk: bool = True, names=None,
                log=print) -> list[dict]:
  """Compiles the programs with XLA:TPU for one topology; its cost model estimates their time."""
  devices = tpu_devices(target)
  config_lib.check_divisible(config.batch_size, len(devices), f'--tpu {target.name}')
  return _compile_all(config, devices, target.name, target.name, stream_chunk, names, log)


def compile_gpu(config, gpu: targets.GpuTarget, count: int, stream_chunk: bool = True,
                names=None, log=print) -> list[dict]:
  """Compiles the programs with XLA:GPU for `count` GPUs of one machine (a roofline time)."""
  devices = gpu_devices(gpu, count)
  config_lib.check_divisible(config.batch_size, count, f'{count} x {gpu.name}')
  return _compile_all(config, devices, gpu.name, f'{count} x {gpu.name}', stream_chunk, names,
                      log, gpu)


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return 'not installed'


def compiler_versions(kind: str) -> str:
  """'jax 0.10.2, libtpu 0.0.42.1': the packages holding that compiler."""
  plugins = {'tpu': ('libtpu',), 'gpu': ('jax-cuda12-plugin', 'jax-cuda12-pjrt')}[kind]
  return ', '.join(f'{p} {_version(p)}' for p in ('jax', 'jaxlib', *plugins))


def format_table(records: list[dict], kind: str, capacity) -> str:
  """The records as a readable table: memory per device and its share of the chip's, the cost, and
  the estimated time (XLA:TPU's cost model, or a roofline bound on GPUs)."""
  time_label = 'XLA:TPU estimate' if kind == 'tpu' else 'roofline bound'
  head = ('target', 'devices', 'program', 'compile s', 'memory/device', 'of device', 'MFLOP/device',
          'MB accessed', time_label, 'steps')
  rows = [head]
  for r in records:
    used = targets.memory_used(r['memory_bytes'])
    est = r['estimated_seconds']
    rows.append((r['topology'], str(r['devices']), r['program'], f'{r["compile_seconds"]:.1f}',
                 f'{used / 2**20:,.1f} MiB', f'{100 * used / capacity(r):.2f}%',
                 '-' if r['flops'] is None else f'{r["flops"] / 1e6:,.2f}',
                 '-' if r['bytes_accessed'] is None else f'{r["bytes_accessed"] / 1e6:,.2f}',
                 '-' if est is None else f'{est * 1e6:,.1f} us', str(r['steps'])))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ['  '.join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(row, widths))) for row in rows]
  title = (f'Compiled by XLA:TPU without a TPU ({compiler_versions("tpu")}). Estimated times are '
           "XLA:TPU's cost model, not measurements" if kind == 'tpu' else
           f'Compiled by XLA:GPU without a GPU ({compiler_versions("gpu")}). Times are roofline '
           'bounds (max of flops / peak FLOP/s and bytes / memory bandwidth, flops and bytes from '
           'the CPU compile), not measurements')
  note = ('Cost analysis counts a loop body once: "steps" is how many train steps the flops and '
          'time cover (0: not a train step); evaluate\'s cover one test batch of its loop.')
  return '\n'.join([title + '.', *lines, note])


def tpu_capacity(record: dict) -> int:
  return targets.parse_tpu(record['topology']).info.hbm_bytes


def gpu_capacity(record: dict) -> int:
  return targets.GPUS[record['topology']].memory_bytes


def check(config, tpus, gpus, out: str, stream_chunk: bool = True,
          log=print) -> dict[str, list[dict]]:
  """Compiles for every TPU topology and GPU named, writes OUT/tpu_compile.json and
  OUT/gpu_compile.json, prints their tables, then fails if a program does not fit its device."""
  tpu_targets = [targets.parse_tpu(t) for t in tpus]
  machines = [(gpu, count) for gpu in targets.parse_gpus(gpus) for count in gpu.machine_sizes]
  # The plain mistakes first, before loading any compiler.
  for target in tpu_targets:
    config_lib.check_divisible(config.batch_size, target.devices, f'--tpu {target.name}')
  for gpu, count in machines:
    config_lib.check_divisible(config.batch_size, count, f'{count} x {gpu.name}')
  out = workdir_lib.check_writable(out, 'output folder', 'choose another --out')
  compiles = {'tpu': [functools.partial(compile_tpu, config, t) for t in tpu_targets],
              'gpu': [functools.partial(compile_gpu, config, g, n) for g, n in machines]}
  capacities = {'tpu': tpu_capacity, 'gpu': gpu_capacity}
  results = {}
  for kind, calls in compiles.items():
    if calls:  # Each kind's file is written before the next compiles: a failure there keeps it.
      records = [r for call in calls for r in call(stream_chunk, log=log)]
      path = os.path.join(out, f'{kind}_compile.json')
      with open(path, 'w') as f:
        json.dump(records, f, indent=1)
      log(format_table(records, kind, capacities[kind]))
      log(f'compile: wrote {path}')
      results[kind] = records
  for kind, records in results.items():
    targets.check_memory(records, capacities[kind])
  return results


def compile_env(gpu: bool) -> None:
  """Settings for compiling for TPUs (and GPUs if `gpu`) that must precede JAX's start."""
  # Compile for the targets only: never take this machine's own accelerator from its users.
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  # libtpu locks /tmp/libtpu_lockfile for the process that owns the local TPU; a compile-only
  # client owns none, and two of them (CI beside a test, two users) must not fail on the lock.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  if gpu:
    # The CPU compile that counts an 8-GPU program's flops and bytes needs 8 CPU devices.
    set_xla_flag('xla_force_host_platform_device_count', 8)
    # Compiling without the GPU cannot autotune (jax 0.7's plugin fails trying, the newest skips).
    set_xla_flag('xla_gpu_autotune_level', 0)
