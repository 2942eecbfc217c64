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
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from fmnist_jax import IMAGE_SIZE
from fmnist_jax import cli
from fmnist_jax.errors import UserError

# JAX (and every module that imports it) is imported inside the functions below: the host device
# count in XLA_FLAGS must be set before JAX loads.

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. configs/base.py; override fields with '
    '--config.num_models=8 etc.', lock_config=True)
_PLATFORMS = flags.DEFINE_list('platforms', ['tpu', 'cuda'], 'Platforms to lower for: tpu, cuda, '
                               'rocm, cpu.')
_DEVICES = flags.DEFINE_integer('devices', 1, 'Also export sharded over this many devices (on a '
                                'CPU-only machine they are simulated host devices).')
_OUT = flags.DEFINE_string('out', 'workdirs/exports', 'Output folder for the serialized exports.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir whose trained parameters the '
                               'predict export bakes in; default: freshly initialised ones.')

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
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fmnist_jax import distributed  # pylint: disable=g-import-not-at-top
  devices = jax.devices('cpu')
  if len(devices) < num_devices:
    raise UserError(f'--devices={num_devices} but this process has {len(devices)} CPU devices; '
                    f'run the export in a fresh process (it sets XLA_FLAGS=--xla_force_host_'
                    f'platform_device_count={num_devices} before JAX starts).')
  return jax.sharding.Mesh(np.asarray(devices[:num_devices]), (distributed.DATA_AXIS,))


EXPORTED = ('train_chunk', 'shuffle', 'evaluate')  # The training programs written out.


def training_programs(config, mesh) -> dict:
  """{name: programs.Program} of the trainer's programs on `mesh`: the very construction the
  trainer compiles (fmnist_jax/programs.py), for the full Fashion-MNIST splits."""
  from fmnist_jax import NUM_TEST, NUM_TRAIN  # pylint: disable=g-import-not-at-top
  from fmnist_jax import programs  # pylint: disable=g-import-not-at-top  (imports JAX)
  from fmnist_jax.plan import RunPlan  # pylint: disable=g-import-not-at-top
  plan = RunPlan.create(config, NUM_TRAIN, NUM_TEST, mesh.size)
  progs = programs.programs(config, mesh, plan)
  return {name: progs[name] for name in EXPORTED if name in progs}


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


def main(argv):
  del argv
  export_all(_CONFIG.value, [p.strip().lower() for p in _PLATFORMS.value if p.strip()],
             _DEVICES.value, _OUT.value, _WORKDIR.value)


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


if __name__ == '__main__':
  _early_device_count(sys.argv)
  cli.run(main, config_flags_to_load=('config',))
