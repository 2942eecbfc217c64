"""Lowers the trainer's compiled programs for TPU and GPU on any machine, with jax.export.

    python -m fmnist_jax.export --config configs/base.py --platforms tpu,cuda --devices 8 --out DIR

For each platform and for 1 and N devices it writes the serialized export of the fused train chunk,
the epoch shuffle and the evaluation, sharded as the trainer shards them (one 'data' mesh axis:
replicated parameters, batch-sharded data). Lowering checks that XLA's front end accepts every
program for that platform; compiling it needs the hardware.

It also writes the predict function as a model file: trained (with --workdir) or freshly
initialised parameters baked in, uint8 images [b, 28, 28] with a symbolic batch b in, class
probabilities [b, 10] out, for cpu and every requested platform. A serving process needs only JAX:

    with open('predict-cpu_tpu_cuda-1dev.jaxexport', 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    probs = exported.call(images)

The N-device file is called under jit with its input sharded over N devices (the batch a multiple
of N): `jax.jit(exported.call)(jax.device_put(images, exported.in_shardings_jax(mesh)[0]))`.

With --tpu or --gpu it compiles instead, with the accelerators' own compilers and without the
hardware, every program the trainer runs, on a mesh over the target's devices:

    python -m fmnist_jax.export --config configs/base.py --tpu v5e:1x1,v5e:2x4 --out DIR
    python -m fmnist_jax.export --config configs/base.py --gpu t4,h100 --out DIR

--tpu needs libtpu (`pip install -e '.[tpu]'`): XLA:TPU compiles for each topology and its cost
model estimates each program's time. --gpu needs the CUDA plugin (`pip install -e '.[cuda12]'`):
XLA:GPU compiles from a device description (fmnist_jax/accelerators.py) and reports no cost, so
the time is a roofline bound from the CPU compile's flops and bytes and the GPU's peak FLOP/s and
memory bandwidth. Each writes DIR/tpu_compile.json or DIR/gpu_compile.json, one record per target
and program, prints a table, and fails with a one-line error when a program does not fit in the
device's memory.
"""

import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import os
import sys
import time

from absl import flags
from absl import logging
from ml_collections import config_flags

from fmnist_jax import IMAGE_SIZE
from fmnist_jax import accelerators
from fmnist_jax import cli
from fmnist_jax.errors import UserError

# JAX (and every module that imports it) is imported inside the functions below: the host device
# count in XLA_FLAGS must be set before JAX loads.

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
SUFFIX = '.jaxexport'


def set_host_device_count(n: int) -> None:
  """Asks XLA for n CPU devices; takes effect only if JAX has not been imported yet."""
  if 'jax' in sys.modules:
    return
  flag = f'--xla_force_host_platform_device_count={n}'
  current = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' not in current:
    os.environ['XLA_FLAGS'] = f'{current} {flag}'.strip()


def mesh_of(num_devices: int):
  """The trainer's 1-D 'data' mesh over the first num_devices CPU devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from fmnist_jax import distributed  # pylint: disable=g-import-not-at-top
  devices = jax.devices('cpu')
  if len(devices) < num_devices:
    raise UserError(f'--devices={num_devices} but this process has {len(devices)} CPU devices; '
                    f'run the export in a fresh process (it sets XLA_FLAGS=--xla_force_host_'
                    f'platform_device_count={num_devices} before JAX starts).')
  return distributed.make_mesh(devices[:num_devices])


EXPORTED = ('train_chunk', 'shuffle', 'evaluate')  # The training programs written out.


def training_programs(config, mesh) -> dict:
  """{name: programs.Program} of the trainer's programs on `mesh`: the very construction the
  trainer compiles (fmnist_jax/programs.py), for the full Fashion-MNIST splits."""
  return compiled_programs(config, mesh, stream_chunk=False, names=EXPORTED)


def predict_function(config, graphdef, params):
  """uint8 images [b, 28, 28] -> probabilities [b, 10], the parameters closed over as constants:
  fmnist_jax.inference's computation (mean over models if several)."""
  from fmnist_jax import inference  # pylint: disable=g-import-not-at-top  (imports JAX)
  probs_fn = inference.make_probs_fn(config, graphdef)
  return lambda images: probs_fn(params, images)


def export_flat(program, platforms):
  """Exports a programs.Program as a function of the flat list of its arguments' array leaves.

  jax.export serializes only standard pytree containers; flax's state and variable types are not,
  so the export takes and returns flat lists (a caller flattens with jax.tree.flatten).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax import export  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree.flatten(program.args)
  donate = tuple(range(len(jax.tree.leaves(program.args[0])))) if program.donated else ()

  def flat(*leaves):
    return jax.tree.leaves(program.jitted(*jax.tree.unflatten(treedef, leaves), **program.kwargs))
  return export.export(jax.jit(flat, donate_argnums=donate), platforms=platforms)(*leaves)


def export_predict(config, graphdef, params, platforms, mesh):
  """The predict function exported for `platforms` with a symbolic batch, sharded over `mesh`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import export  # pylint: disable=g-import-not-at-top
  from fmnist_jax import distributed  # pylint: disable=g-import-not-at-top
  params = jax.device_put(params, distributed.replicated(mesh))
  rows = distributed.batch_sharded(mesh)
  # With several devices the batch must split evenly: b = devices * k.
  batch = export.symbolic_shape('b' if mesh.size == 1 else f'{mesh.size}*k')[0]
  fn = jax.jit(predict_function(config, graphdef, params), in_shardings=rows, out_shardings=rows)
  return export.export(fn, platforms=platforms)(
      jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE), jnp.uint8, sharding=rows))


def _shapes(exported, skip: int, label: str) -> str:
  """The input shapes, the first `skip` (a pytree called `label`) as a count."""
  shapes = ' '.join(a.str_short() for a in exported.in_avals[skip:])
  return f'{label} ({skip} arrays) {shapes}' if skip else shapes


def export_all(config, platforms, devices: int, out: str, workdir: str | None = None,
               log=print) -> list[str]:
  """Writes every export into `out` (see module docstring); returns the paths written."""
  import jax  # pylint: disable=g-import-not-at-top
  from fmnist_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise UserError(f'unknown --platforms {",".join(unknown)}; choose from {",".join(PLATFORMS)}.')
  if devices < 1:
    raise UserError(f'--devices must be at least 1, not {devices}.')
  if config.batch_size % devices:
    raise UserError(f'batch_size={config.batch_size} does not divide over --devices={devices}; '
                    'choose a divisor of it, or change it with --config.batch_size=... .')
  if workdir:
    from fmnist_jax import inference  # pylint: disable=g-import-not-at-top
    predict_config, graphdef, params = inference.load_trained(workdir)
  else:
    predict_config = config
    graphdef, state = steps_lib.init_state(config)
    params = state.params
  os.makedirs(out, exist_ok=True)
  paths = []

  def write(name, platform, n, exported, skip=0, label=''):
    data = exported.serialize()
    path = os.path.join(out, f'{name}-{platform}-{n}dev{SUFFIX}')
    with open(path, 'wb') as f:
      f.write(data)
    paths.append(path)
    log(f'export: {name:11s} {platform:14s} {n} device(s)  in: {_shapes(exported, skip, label)}  '
        f'{len(data):,} bytes  {path}')

  for n in sorted({1, devices}):
    mesh = mesh_of(n)
    programs = training_programs(config, mesh)
    for platform in platforms:
      for name, program in programs.items():
        exported = export_flat(program, (platform,))
        label = {'train_chunk': 'state', 'evaluate': 'params'}.get(name, '')
        write(name, platform, n, exported, len(jax.tree.leaves(program.args[0])) if label else 0,
              label)
    serve_platforms = tuple(dict.fromkeys(('cpu', *platforms)))
    write('predict', '_'.join(serve_platforms), n,
          export_predict(predict_config, graphdef, params, serve_platforms, mesh))
  return paths


# Compiling for TPUs and GPUs without them ------------------------------------------------------

# The programs compiled, in this order: the trainer's own and the stream and tfds modes' chunk,
# which takes host batches [K, B, 28, 28] instead.
COMPILED = ('train_chunk', 'stream_chunk', 'shuffle', 'evaluate', 'predict', 'finite')
TPU_FILE, GPU_FILE = 'tpu_compile.json', 'gpu_compile.json'
TPU_FIX = "pip install -e '.[tpu]'"
GPU_FIX = "pip install -e '.[cuda12]'"


def compiled_programs(config, mesh, stream_chunk: bool = True, names=None) -> dict:
  """{name: programs.Program} of COMPILED (or `names`) on `mesh`, as the trainer builds them."""
  from fmnist_jax import NUM_TEST, NUM_TRAIN  # pylint: disable=g-import-not-at-top
  from fmnist_jax import programs  # pylint: disable=g-import-not-at-top  (imports JAX)
  from fmnist_jax.plan import RunPlan  # pylint: disable=g-import-not-at-top
  plan = RunPlan.create(config, NUM_TRAIN, NUM_TEST, mesh.size)
  progs = programs.programs(config, mesh, plan)
  if stream_chunk and config.input_mode == 'device':
    stream = copy.deepcopy(config)
    stream.input_mode = 'stream'
    progs['stream_chunk'] = programs.programs(stream, mesh, plan)['train_chunk']
  return {name: progs[name] for name in names or COMPILED if name in progs}


def steps_covered(name: str) -> int:
  """How many train steps a program's cost-analysis numbers cover: XLA counts a loop's body once,
  and the chunk's body (steps.train_chunk) is one step."""
  return 1 if name in ('train_chunk', 'stream_chunk') else 0


@contextlib.contextmanager
def native_stderr(show: bool):
  """Holds back what native code writes to stderr in the block (libtpu warns that this machine has
  no TPU before its log settings apply, so TPU_MIN_LOG_LEVEL cannot hide it); replays it if show,
  also when the block fails (a refused program's one-line error stands alone otherwise)."""
  with cli.held_stderr(show_on_failure=show) as held:
    yield
  if show:
    os.write(2, held)


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def tpu_devices(target: accelerators.TpuTarget) -> list:
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


def gpu_devices(gpu: accelerators.GpuTarget, count: int) -> list:
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
    raise UserError(f'does not fit: {name} on {where}: {reason}; {accelerators.FIT_HINT}') from None
  return compiled, time.perf_counter() - start


def _memory(compiled) -> dict:
  stats = compiled.memory_analysis()
  return {'argument': stats.argument_size_in_bytes, 'output': stats.output_size_in_bytes,
          'temp': stats.temp_size_in_bytes, 'generated_code': stats.generated_code_size_in_bytes}


def _record(topology: str, devices: int, program: str, seconds: float, memory: dict, flops,
            bytes_accessed, estimated, steps: int) -> dict:
  return {'topology': topology, 'devices': devices, 'program': program,
          'compile_seconds': round(seconds, 3), 'memory_bytes': memory,
          'flops': None if flops is None else float(flops),
          'bytes_accessed': None if bytes_accessed is None else float(bytes_accessed),
          # XLA:TPU's cost model answers -1 where it has no estimate (v5e, 8 vmapped models).
          'estimated_seconds': None if estimated is None or estimated < 0 else float(estimated),
          'steps': steps}


def compile_tpu(config, target: accelerators.TpuTarget, stream_chunk: bool = True, names=None,
                log=print) -> list[dict]:
  """Compiles the programs with XLA:TPU for one topology: a record per program (see module doc);
  flops, bytes and the compiler's estimated time are per device."""
  from fmnist_jax import distributed, programs  # pylint: disable=g-import-not-at-top  (JAX)
  devices = tpu_devices(target)
  accelerators.check_divisible(config.batch_size, len(devices), f'--tpu {target.name}')
  mesh = distributed.make_mesh(devices)
  records = []
  for name, program in compiled_programs(config, mesh, stream_chunk, names).items():
    compiled, seconds = _compile(program, name, target.name)
    cost = programs.cost(compiled)
    records.append(_record(target.name, len(devices), name, seconds, _memory(compiled),
                           cost.get('flops'), cost.get('bytes accessed'),
                           cost.get('optimal_seconds'), steps_covered(name)))
    log(f'compile: {name} for {target.name} with XLA:TPU in {seconds:.1f} s')
  return records


def compile_gpu(config, gpu: accelerators.GpuTarget, count: int, stream_chunk: bool = True,
                names=None, log=print) -> list[dict]:
  """Compiles the programs with XLA:GPU for `count` GPUs of one machine. XLA:GPU's compile-only
  client reports no cost, so flops and bytes come from compiling the same programs for as many
  CPU devices, and the time is accelerators.gpu_roofline's bound."""
  from fmnist_jax import distributed, programs  # pylint: disable=g-import-not-at-top  (JAX)
  devices = gpu_devices(gpu, count)
  accelerators.check_divisible(config.batch_size, count, f'{count} x {gpu.name}')
  on_cpu = compiled_programs(config, distributed.make_mesh(cpu_devices(count)), stream_chunk,
                             names)
  records = []
  for name, program in compiled_programs(config, distributed.make_mesh(devices), stream_chunk,
                                         names).items():
    compiled, seconds = _compile(program, name, f'{count} x {gpu.name}')
    cost = programs.cost(_compile(on_cpu[name])[0])
    flops, bytes_accessed = cost.get('flops'), cost.get('bytes accessed')
    bound = (accelerators.gpu_roofline(gpu, config.compute_dtype, flops, bytes_accessed)
             if flops is not None and bytes_accessed is not None else None)
    records.append(_record(gpu.name, count, name, seconds, _memory(compiled), flops,
                           bytes_accessed, bound, steps_covered(name)))
    log(f'compile: {name} for {count} x {gpu.name} with XLA:GPU in {seconds:.1f} s')
  return records


def cpu_devices(count: int) -> list:
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices('cpu')
  if len(devices) < count:
    raise UserError(f'{count} CPU devices are needed for the cost of an {count}-GPU program but '
                    f'this process has {len(devices)}; run it as `python -m fmnist_jax.export` '
                    f'(it sets XLA_FLAGS=--xla_force_host_platform_device_count={count} before '
                    'JAX starts).')
  return devices[:count]


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
    used = accelerators.memory_used(r['memory_bytes'])
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
  return accelerators.parse_tpu(record['topology']).info.hbm_bytes


def gpu_capacity(record: dict) -> int:
  return accelerators.GPUS[record['topology']].memory_bytes


def compile_check(config, tpus, gpus, out: str, stream_chunk: bool = True,
                  show_native_logs: bool = False, log=print) -> dict[str, list[dict]]:
  """Compiles for every TPU topology and GPU named, writes OUT/tpu_compile.json and
  OUT/gpu_compile.json, prints their tables, then fails if a program does not fit its device."""
  tpu_targets = [accelerators.parse_tpu(t) for t in tpus]
  gpu_targets = accelerators.parse_gpus(gpus)
  # The plain mistakes first, before loading any compiler.
  for target in tpu_targets:
    accelerators.check_divisible(config.batch_size, target.devices, f'--tpu {target.name}')
  for gpu in gpu_targets:
    for count in gpu.machine_sizes:
      accelerators.check_divisible(config.batch_size, count, f'{count} x {gpu.name}')
  os.makedirs(out, exist_ok=True)
  results = {}
  kinds = (('tpu', TPU_FILE, tpu_capacity, tpu_targets), ('gpu', GPU_FILE, gpu_capacity,
                                                          gpu_targets))
  for kind, file, capacity, targets in kinds:
    if not targets:
      continue
    records = []
    with native_stderr(show_native_logs):
      for target in targets:
        if kind == 'tpu':
          records += compile_tpu(config, target, stream_chunk, log=log)
        else:
          for count in target.machine_sizes:
            records += compile_gpu(config, target, count, stream_chunk, log=log)
    with open(os.path.join(out, file), 'w') as f:
      json.dump(records, f, indent=1)
    log(format_table(records, kind, capacity))
    log(f'compile: wrote {os.path.join(out, file)}')
    results[kind] = records
  for kind, _, capacity, _ in kinds:
    accelerators.check_memory(results.get(kind, []), capacity)
  return results


def _define_flags() -> None:
  """The command line's flags, defined only when the module runs as a program: it is a library
  too (tests, benchmarks/estimate.py), and absl's flags are global, so another command line's
  `--workdir` imported in the same process must not collide with this one's."""
  config_flags.DEFINE_config_file(
      'config', None, 'Training config file, e.g. configs/base.py; override fields with '
      '--config.num_models=8 etc.', lock_config=True)
  flags.DEFINE_list('platforms', ['tpu', 'cuda'], 'Platforms to lower for: tpu, cuda, rocm, cpu.')
  flags.DEFINE_integer('devices', 1, 'Also export sharded over this many devices (on a CPU-only '
                       'machine they are simulated host devices).')
  flags.DEFINE_string('out', 'workdirs/exports', 'Output folder for the serialized exports.')
  flags.DEFINE_string('workdir', None, 'A training workdir whose trained parameters the predict '
                      'export bakes in; default: freshly initialised ones.')
  flags.DEFINE_list('tpu', [], 'Compile every program the trainer runs with XLA:TPU (libtpu) for '
                    'these topologies, e.g. v5e:1x1,v5e:2x4; writes OUT/tpu_compile.json (and '
                    'skips the exports unless --platforms is given).')
  flags.DEFINE_list('gpu', [], 'Compile them with XLA:GPU for these GPUs (t4, l4, a100, a100-80, '
                    'h100, h200), on 1 device and on 8 where machines hold 8; writes '
                    'OUT/gpu_compile.json.')
  flags.DEFINE_bool('stream_chunk', True, 'With --tpu/--gpu and the device input mode, also '
                    "compile the stream and tfds modes' train chunk.")


def main(argv):
  del argv
  f = flags.FLAGS
  if f.tpu or f.gpu:
    compile_check(f.config, f.tpu, f.gpu, f.out, f.stream_chunk,
                  show_native_logs=logging.get_verbosity() >= logging.INFO)
    if not f['platforms'].present:
      return
  export_all(f.config, [p.strip().lower() for p in f.platforms if p.strip()], f.devices, f.out,
             f.workdir)


def _early_device_count(argv) -> None:
  """Sets the host device count from --devices before absl parses flags and JAX is imported."""
  for i, arg in enumerate(argv):
    value = None
    if arg.startswith('--devices='):
      value = arg.split('=', 1)[1]
    elif arg == '--devices' and i + 1 < len(argv):
      value = argv[i + 1]
    if value is not None and value.isdigit() and int(value) > 1:
      set_host_device_count(int(value))


def compile_env(gpu: bool) -> None:
  """Settings for compiling for TPUs (and GPUs if `gpu`) that must precede JAX's start."""
  # Compile for the targets only: never take this machine's own accelerator from its users.
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  # libtpu locks /tmp/libtpu_lockfile for the process that owns the local TPU; a compile-only
  # client owns none, and two of them (CI beside a test, two users) must not fail on the lock.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  if gpu:
    set_host_device_count(8)  # The CPU compile that counts an 8-GPU program's flops and bytes.
    # Compiling without the GPU cannot autotune (jax 0.7's plugin fails trying, the newest skips).
    current = os.environ.get('XLA_FLAGS', '')
    if 'xla_gpu_autotune_level' not in current:
      os.environ['XLA_FLAGS'] = f'{current} --xla_gpu_autotune_level=0'.strip()


def _early_compile_env(argv) -> None:
  targets = [a for a in argv if a.startswith(('--tpu', '--gpu'))]
  if targets:
    compile_env(gpu=any(a.startswith('--gpu') for a in targets))


if __name__ == '__main__':
  _define_flags()
  _early_device_count(sys.argv)
  _early_compile_env(sys.argv)
  cli.run(main, config_flags_to_load=('config',))
