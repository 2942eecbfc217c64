"""Peak FLOP/s of accelerators, by the `device_kind` JAX reports, for MFU (model FLOP/s
utilisation).

Dense matrix-multiply peaks per JAX device, from the vendors' published specifications:
- TPUs (cloud.google.com/tpu/docs, the system architecture page of each version): bf16 per chip;
  v2 and v3 show one device per core (half a chip). float32 matmuls run on the same units at
  JAX's default precision (bf16 passes), so their peak is the bf16 one.
- NVIDIA (the H200, H100 SXM, A100, L4 and T4 datasheets): bf16/fp16 tensor-core peaks without
  sparsity; float32 at JAX's default precision uses TF32 tensor cores on Ampere and newer, plain
  FP32 on the T4.
CPUs and unknown devices have no entry: their MFU is reported as null.
"""

TERA = 1e12

# device_kind -> {compute dtype: peak FLOP/s of one JAX device}.
PEAK_FLOPS = {
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
