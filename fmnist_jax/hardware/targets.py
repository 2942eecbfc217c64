"""The chips compile_check compiles for without them: TPU topologies, GPU device descriptions and
peak FLOP/s, with the arithmetic on compiled programs (memory against the chip's, a roofline bound).

No JAX here, only tables and numbers.

    tpu = parse_tpu('v5e:2x4')        # TpuTarget: 8 chips, 8 JAX devices, 16 GiB each
    gpu = GPUS['t4']                  # GpuTarget: XLA:GPU's device description of a Tesla T4
    gpu.spec['memory_bandwidth']      # 320e9 bytes/s, parsed from that description
"""

import ast
import dataclasses
import math
import re

from fmnist_jax.errors import UserError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  device_kind: str  # As JAX reports it: the key of PEAK_FLOPS.
  dims: int  # Axes of a topology's shape: 2 (v5e:2x4) or 3 (v4:2x2x1).
  devices_per_chip: int  # JAX devices per chip: v2 and v3 show each of their 2 cores.
  hbm_bytes: int  # Memory of one JAX device.
  host_chips: int  # Chips of the largest one-host machine: smaller shapes are one host.
  # libtpu's chip configuration: v4 and v5p run their 2 cores as one device ("megacore"), as JAX
  # shows them on Cloud TPU; libtpu's default for v4 would show each core.
  chip_config: str = 'default'


# HBM from cloud.google.com/tpu/docs/system-architecture-tpu-vm and each version's page: v2 16 GiB
# and v3 32 GiB per chip, split between the chip's 2 cores (one JAX device each); v4 32 GiB,
# v5e 16 GiB, v5p 95 GiB, v6e (Trillium) 32 GiB per chip, one JAX device each (v4 and v5p join
# their 2 cores as one "megacore").
TPUS = {
    'v2': TpuGeneration('TPU v2', 2, 2, 8 * GIB, 4),
    'v3': TpuGeneration('TPU v3', 2, 2, 16 * GIB, 4),
    'v4': TpuGeneration('TPU v4', 3, 1, 32 * GIB, 4, 'megacore'),
    'v5e': TpuGeneration('TPU v5 lite', 2, 1, 16 * GIB, 8),
    'v5p': TpuGeneration('TPU v5', 3, 1, 95 * GIB, 4, 'megacore'),
    'v6e': TpuGeneration('TPU v6 lite', 2, 1, 32 * GIB, 8),
}


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """One TPU topology as given on the command line, e.g. 'v5e:2x4'."""
  name: str
  generation: str
  shape: tuple[int, ...]

  @property
  def info(self) -> TpuGeneration:
    return TPUS[self.generation]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def devices(self) -> int:
    return self.chips * self.info.devices_per_chip

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """libtpu's host shape: the whole topology where one machine holds it (v5e:1x1 fails with
    libtpu's default 2x2x1), else 2x2x1 (4 chips per host, as multi-host slices have)."""
    shape = (self.shape + (1, 1))[:3]
    return shape if self.chips <= self.info.host_chips else (2, 2, 1)


def parse_tpu(text: str) -> TpuTarget:
  """'v5e:2x4' -> TpuTarget; a one-line UserError for anything else."""
  names = ', '.join(TPUS)
  generation, _, shape = text.strip().lower().partition(':')
  if generation not in TPUS:
    raise UserError(f'unknown TPU {generation!r} in --tpu {text}; choose from {names}, with a '
                    'shape: e.g. v5e:1x1 (Colab), v5e:2x4, v6e:2x2, v4:2x2x1, v5p:2x2x1, v3:2x2.')
  dims = TPUS[generation].dims
  example = 'x'.join(['2'] * dims)
  if not re.fullmatch(r'[1-9][0-9]*(x[1-9][0-9]*)*', shape) or shape.count('x') != dims - 1:
    raise UserError(f'--tpu {text}: {generation} needs a shape of {dims} sizes, e.g. '
                    f'{generation}:{example}.')
  return TpuTarget(text.strip(), generation, tuple(int(s) for s in shape.split('x')))


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """A GPU as XLA:GPU sees it: a GpuTargetConfigProto in text form, and the machine sizes."""
  name: str
  target_config: str
  machine_sizes: tuple[int, ...] = (1, 8)  # GPUs per machine to compile for: 1, 8 where sold so.

  @property
  def spec(self) -> dict:
    return parse_gpu_spec(self.target_config)

  @property
  def device_kind(self) -> str:
    return self.spec['device_description_str']

  @property
  def memory_bytes(self) -> int:
    return self.spec['device_memory_size']


_FIELD = re.compile(r'\b([a-z_]+)\s*:\s*("(?:[^"\\]|\\.)*"|[-+0-9.eE]+)')


def parse_gpu_spec(text: str) -> dict:
  """The scalar fields of a GpuTargetConfigProto's text form, {name: int, float or str}; nested
  messages are flattened (the first occurrence of a name wins: the device's own fields come
  before those of its compute capability)."""
  fields = {}
  for name, value in _FIELD.findall(text):
    fields.setdefault(name, ast.literal_eval(value))
  return fields


def _gpu_config(*, sm: tuple[int, int], cores: int, fpus: int, smem_core: int, smem_optin: int,
                threads_core: int, bandwidth: float, l2: int, clock: float, memory: int,
                name: str) -> str:
  """A GpuTargetConfigProto text with the fields every supported jax-cuda plugin reads (newer
  fields, e.g. XLA's rate tables, are left out: jax 0.7.2's plugin does not parse them)."""
  return f'''gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core}
  threads_per_core_limit: {threads_core}
  core_count: {cores}
  fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{
    major: {sm[0]}
    minor: {sm[1]}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 7
}}
runtime_version {{
  major: 12
  minor: 8
  patch: 0
}}
device_description_str: "{name}"
'''


# The chip of the two A100s, and of the H100 and H200 (each pair differs in memory only).
_A100 = dict(sm=(8, 0), cores=108, fpus=64, smem_core=167936, smem_optin=166912,
             threads_core=2048, l2=41943040, clock=1.41)
_H100 = dict(sm=(9, 0), cores=132, fpus=128, smem_core=233472, smem_optin=232448,
             threads_core=2048, l2=52428800, clock=1.98)
GPUS = {
    # Colab's free GPU. No XLA spec file: NVIDIA's T4 datasheet (2,560 CUDA cores = 40 SMs x 64,
    # 320 GB/s GDDR6, 1.59 GHz boost) and the Turing tuning guide (64 KiB shared memory and 1,024
    # threads per SM); memory as CUDA reports it on Colab (15,095 MiB of the 16 GB, ECC on).
    't4': GpuTarget('t4', _gpu_config(
        sm=(7, 5), cores=40, fpus=64, smem_core=65536, smem_optin=65536, threads_core=1024,
        bandwidth=320e9, l2=4 * 2**20, clock=1.59, memory=15095 * 2**20, name='Tesla T4'), (1,)),
    # No XLA spec file: NVIDIA's L4 datasheet (7,424 CUDA cores = 58 SMs x 128, 300 GB/s GDDR6,
    # 48 MB L2, 2.04 GHz boost) and the Ada tuning guide (100 KiB shared memory, 1,536 threads per
    # SM); memory as CUDA reports it (23,034 MiB of the 24 GB). Google's g2-standard-96 has 8.
    'l4': GpuTarget('l4', _gpu_config(
        sm=(8, 9), cores=58, fpus=128, smem_core=102400, smem_optin=101376, threads_core=1536,
        bandwidth=300e9, l2=48 * 2**20, clock=2.04, memory=23034 * 2**20, name='NVIDIA L4')),
    # The rest: XLA's spec files, github.com/openxla/xla xla/backends/gpu/target_config/specs/
    # (a100_sxm_40.txtpb, a100_sxm_80.txtpb, h100_sxm.txtpb, h200.txtpb), their device fields.
    'a100': GpuTarget('a100', _gpu_config(**_A100, bandwidth=1555200000000, memory=42331013120,
                                          name='NVIDIA A100-SXM4-40GB')),
    'a100-80': GpuTarget('a100-80', _gpu_config(**_A100, bandwidth=2039040000000,
                                                memory=85100068864, name='NVIDIA A100-SXM4-80GB')),
    'h100': GpuTarget('h100', _gpu_config(**_H100, bandwidth=3352320000000, memory=84942979072,
                                          name='NVIDIA H100 80GB HBM3')),
    'h200': GpuTarget('h200', _gpu_config(**_H100, bandwidth=4800000000000, memory=151397597184,
                                          name='NVIDIA H200 141GB HBM3e')),
}


def parse_gpus(names) -> list[GpuTarget]:
  """['t4', 'h100'] -> GpuTargets; a one-line UserError for an unknown name."""
  unknown = [n for n in names if n.strip().lower() not in GPUS]
  if unknown:
    raise UserError(f'unknown GPU {",".join(unknown)} in --gpu; choose from {",".join(GPUS)}.')
  return [GPUS[n.strip().lower()] for n in names]


def roofline_seconds(flops: float, bytes_accessed: float, peak_flops: float,
                     bandwidth: float) -> float:
  """A lower bound on a program's time: its arithmetic at peak, or its memory traffic at full
  bandwidth, whichever takes longer (no launch, loop or host overheads)."""
  return max(flops / peak_flops, bytes_accessed / bandwidth)


def gpu_roofline(gpu: GpuTarget, dtype: str, flops: float, bytes_accessed: float) -> float:
  """roofline_seconds on `gpu`: peak FLOP/s from fmnist_jax.hardware, bandwidth from its spec."""
  peak = peak_flops(gpu.device_kind, dtype)
  if peak is None:
    raise UserError(f'no peak FLOP/s for {gpu.device_kind} ({dtype}) in '
                    'fmnist_jax/hardware/targets.py.')
  return roofline_seconds(flops, bytes_accessed, peak, gpu.spec['memory_bandwidth'])


MEMORY_KEYS = ('argument', 'output', 'temp', 'generated_code')
FIT_HINT = 'use a smaller batch_size or eval_batch_size, fewer num_models, or more chips.'


def memory_used(memory: dict) -> int:
  """Bytes a program holds on a device: its arguments, outputs, temporaries and code (a donated
  state is counted as argument and as output: an upper bound by the state's size)."""
  return sum(memory[k] for k in MEMORY_KEYS)


def _where(record: dict) -> str:
  """'v5e:2x4' (a topology names its chips), '8 x h100' (a GPU does not)."""
  if ':' in record['topology'] or record.get('devices', 1) == 1:
    return record['topology']
  return f'{record["devices"]} x {record["topology"]}'


def check_memory(results: list[dict], capacity) -> None:
  """A one-line UserError naming every program whose memory exceeds its device's.

  Args:
    results: records with 'topology', 'program' and 'memory_bytes'.
    capacity: record -> bytes of memory of one of its devices.
  """
  over = [f'{r["program"]} on {_where(r)} needs {memory_used(r["memory_bytes"]) / GIB:.2f} GiB '
          f'of {capacity(r) / GIB:.2f} GiB per device' for r in results
          if memory_used(r['memory_bytes']) > capacity(r)]
  if over:
    raise UserError(f'does not fit: {"; ".join(over)}; {FIT_HINT}')


# Dense matrix-multiply peaks of one JAX device, for MFU (model FLOP/s utilisation), from the
# vendors' specifications. TPUs (cloud.google.com/tpu/docs, each version's system architecture):
# bf16 per chip, halved where a device is one core (v2, v3); float32 runs on the same units at
# JAX's default precision (bf16 passes). NVIDIA (the H200, H100 SXM, A100, L4 and T4 datasheets):
# tensor-core peaks without sparsity; float32 uses TF32 tensor cores, plain FP32 on the T4.
# CPUs and unknown devices have no entry: their MFU is null.
TERA = 1e12
PEAK_FLOPS = {  # device_kind -> {compute dtype: peak FLOP/s of one JAX device}.
    'TPU v2': {'bfloat16': 22.5 * TERA, 'float32': 22.5 * TERA},  # 45 per chip, 2 cores.
    'TPU v3': {'bfloat16': 61.5 * TERA, 'float32': 61.5 * TERA},  # 123 per chip, 2 cores.
    'TPU v4': {'bfloat16': 275 * TERA, 'float32': 275 * TERA},
    'TPU v5 lite': {'bfloat16': 197 * TERA, 'float32': 197 * TERA},  # v5e.
    'TPU v5': {'bfloat16': 459 * TERA, 'float32': 459 * TERA},  # v5p.
    'TPU v5p': {'bfloat16': 459 * TERA, 'float32': 459 * TERA},
    'TPU v6 lite': {'bfloat16': 918 * TERA, 'float32': 918 * TERA},  # v6e (Trillium).
    'NVIDIA H200': {'bfloat16': 989 * TERA, 'float32': 494.5 * TERA},
    'NVIDIA H100 80GB HBM3': {'bfloat16': 989 * TERA, 'float32': 494.5 * TERA},
    'NVIDIA A100-SXM4-80GB': {'bfloat16': 312 * TERA, 'float32': 156 * TERA},
    'NVIDIA A100-SXM4-40GB': {'bfloat16': 312 * TERA, 'float32': 156 * TERA},
    'NVIDIA L4': {'bfloat16': 121 * TERA, 'float32': 60 * TERA},
    'Tesla T4': {'bfloat16': 65 * TERA, 'float32': 8.1 * TERA},  # bf16 runs as fp16 here.
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The peak FLOP/s of one device of that kind for `dtype`, or None where unknown (CPUs)."""
  entry = PEAK_FLOPS.get(device_kind)
  if entry is None:  # 'NVIDIA H100 PCIe', 'NVIDIA H200 NVL' ...: match the model name.
    entry = next((v for k, v in PEAK_FLOPS.items()
                  if k.startswith('NVIDIA') and device_kind.startswith(k.split('-')[0])), None)
  return entry.get(dtype) if entry else None
