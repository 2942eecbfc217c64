"""Command line: the trainer's programs for chips this machine does not have.

    python -m fmnist_jax.export --config configs/base.py --platforms tpu,cuda --devices 8 --out DIR
    python -m fmnist_jax.export --config configs/base.py --tpu v5e:1x1 --gpu t4,h100 --out DIR

The first lowers them with jax.export and writes a predict model file (hardware/lowering.py); the
second compiles them with XLA:TPU and XLA:GPU and estimates their time (hardware/compile_check.py).
Only flag parsing lives here.
"""

if __name__ == '__main__':  # The command's first instruction: Ctrl-C and SIGTERM are caught.
  from fmnist_jax.run import signals
  signals.install()
# pylint: disable=g-import-not-at-top,wrong-import-position

from absl import flags
from ml_collections import config_flags

from fmnist_jax import cli
from fmnist_jax.hardware import compile_check, lowering

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. configs/base.py; override fields with '
    '--config.num_models=8 etc.', lock_config=True)
_PLATFORMS = flags.DEFINE_list('platforms', ['tpu', 'cuda'],
                               'Platforms to lower for: tpu, cuda, rocm, cpu.')
_DEVICES = flags.DEFINE_integer('devices', 1, 'Also export sharded over this many devices (on a '
                                'CPU-only machine they are simulated host devices).')
_OUT = flags.DEFINE_string('out', 'workdirs/exports', 'Output folder.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir whose trained parameters the '
                               'predict export bakes in; default: freshly initialised ones.')
_TPU = flags.DEFINE_list('tpu', [], 'Compile every program the trainer runs with XLA:TPU (libtpu) '
                         'for these topologies, e.g. v5e:1x1,v5e:2x4; writes OUT/tpu_compile.json '
                         '(and skips the exports unless --platforms is given).')
_GPU = flags.DEFINE_list('gpu', [], 'Compile them with XLA:GPU for these GPUs (t4, l4, a100, '
                         'a100-80, h100, h200), on 1 device and on 8 where machines hold 8; '
                         'writes OUT/gpu_compile.json.')
_STREAM_CHUNK = flags.DEFINE_bool('stream_chunk', True, "With --tpu/--gpu and the device input "
                                  "mode, also compile the stream and tfds modes' train chunk.")


def main(argv):
  del argv
  # Before JAX loads (nothing has imported it yet): the host devices and the compilers' settings.
  if _DEVICES.value > 1:
    lowering.set_xla_flag('xla_force_host_platform_device_count', _DEVICES.value)
  if _TPU.value or _GPU.value:
    compile_check.compile_env(gpu=bool(_GPU.value))
    compile_check.check(_CONFIG.value, _TPU.value, _GPU.value, _OUT.value, _STREAM_CHUNK.value)
    if not flags.FLAGS['platforms'].present:
      return
  lowering.export_all(_CONFIG.value, [p.strip().lower() for p in _PLATFORMS.value if p.strip()],
                      _DEVICES.value, _OUT.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main, config_flags_to_load=('config',))
