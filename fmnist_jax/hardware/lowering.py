"""The trainer's programs lowered for TPU and GPU on any machine with jax.export, and the predict
function written as a model file that a serving process calls with JAX alone.

Lowering shows that XLA's front end accepts each program, sharded as the trainer shards it, for
that platform; compiling it needs the hardware (or compile_check's compilers). JAX is imported
inside the functions: the host device count in XLA_FLAGS must be set first.
"""

import dataclasses
import os

from fmnist_jax import IMAGE_SIZE
from fmnist_jax import config as config_lib
from fmnist_jax.errors import UserError
from fmnist_jax.run import workdir as workdir_lib

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
SUFFIX = '.jaxexport'


def set_xla_flag(name: str, value) -> None:
  """Adds --name=value to XLA_FLAGS, which XLA reads when JAX starts, unless XLA_FLAGS sets it."""
  current = os.environ.get('XLA_FLAGS', '')
  if name not in current:
    os.environ['XLA_FLAGS'] = f'{current} --{name}={value}'.strip()


def cpu_devices(count: int) -> list:
  """The first `count` CPU devices of this process (simulated host devices on a CPU machine)."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices('cpu')
  if len(devices) < count:
    raise UserError(f'{count} CPU devices are needed but this process has {len(devices)}; run it '
                    f'as `python -m fmnist_jax.export` (it sets XLA_FLAGS=--xla_force_host_'
                    f'platform_device_count={count} before JAX starts).')
  return devices[:count]


# The programs compiled, in this order: the trainer's own, the stream and tfds modes' chunk (host
# batches [K, B, 28, 28]), and one step alone, whose cost is a step's (the chunk's also holds
# what each call pays once, e.g. laying out the epoch's data on a TPU).
COMPILED = ('train_chunk', 'stream_chunk', 'train_step', 'shuffle', 'evaluate', 'predict',
            'finite')


def dataset_programs(config, mesh, stream_chunk: bool = True, names=None) -> dict:
  """{name: programs.Program} of COMPILED (or `names`) on `mesh`, built as the trainer builds
  them for the full Fashion-MNIST splits; 'train_step' is one step alone, for estimates."""
  # pylint: disable=g-import-not-at-top  (programs imports JAX)
  from fmnist_jax import NUM_TEST, NUM_TRAIN, programs
  from fmnist_jax.plan import ModelSpec, OptimizerSpec, RunPlan
  plan = RunPlan.create(config, NUM_TRAIN, NUM_TEST, mesh.size)
  model, optimizer = ModelSpec.from_config(config), OptimizerSpec.from_config(config)
  wanted = names or COMPILED
  progs = programs.build(model, optimizer, plan, mesh)
  if 'train_step' in wanted:
    progs['train_step'] = programs.one_step(model, optimizer, plan, mesh)
  if stream_chunk and plan.input_mode == 'device' and 'stream_chunk' in wanted:
    stream = dataclasses.replace(plan, input_mode='stream')
    progs['stream_chunk'] = programs.build(model, optimizer, stream, mesh)['train_chunk']
  return {name: progs[name] for name in wanted if name in progs}


def training_programs(config, mesh) -> dict:
  """{name: programs.Program} of the trainer's programs on `mesh`: the very construction the
  trainer compiles (fmnist_jax/programs.py), for the full Fashion-MNIST splits."""
  return dataset_programs(config, mesh, stream_chunk=False,
                          names=('train_chunk', 'shuffle', 'evaluate'))


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


def export_predict(model, graphdef, params, platforms, mesh):
  """fmnist_jax.inference's probabilities (mean over models if several) of uint8 images
  [b, 28, 28], exported for `platforms` with a symbolic batch, sharded over `mesh`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import export  # pylint: disable=g-import-not-at-top
  from fmnist_jax import distributed, inference  # pylint: disable=g-import-not-at-top
  probs_fn = inference.make_probs_fn(model, graphdef)
  params = jax.device_put(params, distributed.replicated(mesh))
  rows = distributed.batch_sharded(mesh)
  # With several devices the batch must split evenly: b = devices * k.
  batch = export.symbolic_shape('b' if mesh.size == 1 else f'{mesh.size}*k')[0]
  # The parameters are closed over: baked into the model file as constants.
  fn = jax.jit(lambda images: probs_fn(params, images), in_shardings=rows, out_shardings=rows)
  return export.export(fn, platforms=platforms)(
      jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE), jnp.uint8, sharding=rows))


def export_all(config, platforms, devices: int, out: str, workdir: str | None = None,
               log=print) -> list[str]:
  """Writes every export into `out` (see module docstring); returns the paths written."""
  import jax  # pylint: disable=g-import-not-at-top
  from fmnist_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from fmnist_jax.distributed import make_mesh  # pylint: disable=g-import-not-at-top
  from fmnist_jax.plan import ModelSpec, OptimizerSpec  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise UserError(f'unknown --platforms {",".join(unknown)}; choose from {",".join(PLATFORMS)}.')
  if devices < 1:
    raise UserError(f'--devices must be at least 1, not {devices}.')
  config_lib.check_divisible(config.batch_size, devices, f'--devices={devices}')
  out = workdir_lib.check_writable(out, 'output folder', 'choose another --out')
  if workdir:
    trained = _trained(workdir, config, log)
    model, graphdef, params = trained.model, trained.graphdef, trained.params
  else:
    model = ModelSpec.from_config(config)
    graphdef, state = steps_lib.init_state(model, OptimizerSpec.from_config(config), config.seed)
    params = state.params
  paths = []

  def write(name, platform, n, exported, skip=0, label=''):
    """Writes one export and logs its inputs, the first `skip` (the pytree `label`) counted."""
    data = exported.serialize()
    path = os.path.join(out, f'{name}-{platform}-{n}dev{SUFFIX}')
    with open(path, 'wb') as f:
      f.write(data)
    paths.append(path)
    shapes = ' '.join(a.str_short() for a in exported.in_avals[skip:])
    if skip:
      shapes = f'{label} ({skip} arrays) {shapes}'
    log(f'export: {name:11s} {platform:14s} {n} device(s)  in: {shapes}  {len(data):,} bytes  '
        f'{path}')

  for n in sorted({1, devices}):
    mesh = make_mesh(cpu_devices(n))
    programs = training_programs(config, mesh)
    for platform in platforms:
      for name, program in programs.items():
        label = {'train_chunk': 'state', 'evaluate': 'params'}.get(name, '')
        skip = len(jax.tree.leaves(program.args[0])) if label else 0
        write(name, platform, n, export_flat(program, (platform,)), skip, label)
    serve_platforms = tuple(dict.fromkeys(('cpu', *platforms)))
    write('predict', '_'.join(serve_platforms), n,
          export_predict(model, graphdef, params, serve_platforms, mesh))
  return paths


def _trained(workdir: str, config, log):
  """The trained run whose parameters the predict export bakes in, saying which checkpoint, and
  whether the run was trained with another config than --config (its own is used)."""
  from fmnist_jax import inference  # pylint: disable=g-import-not-at-top  (imports JAX)
  trained = inference.load_trained(workdir)
  log(f'export: predict bakes in {inference.describe(trained, workdir)}.')
  if config_lib.resume_fingerprint(trained.config) != config_lib.resume_fingerprint(config):
    log(f'note: {workdir} was trained with another config than --config; the predict export '
        'uses the run\'s own (its config.json), the training programs --config.')
  return trained
