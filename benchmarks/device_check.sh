#!/usr/bin/env bash
# The GPU check, prepared to fit in about 8 minutes on one GPU. Writes to benchmarks/reports/
# (or $1): gpu-<device>.md/.json/.png from benchmarks.run (every peer that can run there: the
# tutorial runs, the batch-size sweep, K vmapped models) and gpu-<device>-fused-loop.md (a sweep of
# XLA's GPU command-buffer flags for the fused training loop).
#
#   benchmarks/device_check.sh [OUT_DIR]
#
# Run from anywhere, with a python3 that has JAX with its CUDA plugin ($PYTHON to choose another).
# Wheels in .whl/ (ml-collections, tensorboardX, ...) are installed first when present. The data:
# a prepared tfds dir in $TFDS_DATA_DIR, or the four IDX files in $FMNIST_JAX_MANUAL_DIR, .data/
# or Debian's folder. Without TensorFlow there (it prepares tfds data), the IDX files are staged
# as fmnist_jax's decoded copy beside the split counts, which loads without TF or tfds.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/reports}"
PY="${PYTHON:-python3}"
export TFDS_DATA_DIR="${TFDS_DATA_DIR:-/tmp/fmnist_tfds}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
if [ -z "${FMNIST_JAX_MANUAL_DIR:-}" ] && [ -d .data ]; then export FMNIST_JAX_MANUAL_DIR="$PWD/.data"; fi
if compgen -G '.whl/*.whl' >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fmnist_site .whl/*.whl
  export PYTHONPATH="/tmp/fmnist_site${PYTHONPATH:+:$PYTHONPATH}"
fi
SECONDS=0

"$PY" - <<'PY'
import importlib.util, json, os
from fmnist_jax import data
from fmnist_jax.data import idx
root = os.environ['TFDS_DATA_DIR']
if data._load_copy(root) is None and importlib.util.find_spec('tensorflow') is None:
  src = next(d for d in (os.environ.get(data.MANUAL_DIR_ENV), data.DEBIAN_DIR) if d and idx.has_files(d))
  arrays = data.read_idx(src)
  version = '3.0.1'
  os.makedirs(os.path.join(root, data.DATASET, version), exist_ok=True)
  with open(os.path.join(root, data.DATASET, version, 'dataset_info.json'), 'w') as f:
    json.dump({'splits': [{'name': s, 'shardLengths': [str(len(arrays[s]['label']))]}
                          for s in data.SPLITS]}, f)
  data._write_copy(root, version, arrays)
  print(f'device_check: staged the IDX files from {src} as the decoded copy in {root}')
import jax
print('device_check:', jax.default_backend(), jax.devices(), 'jax', jax.__version__, flush=True)
PY

# 1. Peers, batch sizes and K models (about 5 minutes). Keras peers run where Keras is installed.
timeout 360 "$PY" -m benchmarks.run --repeats 2 --epochs 5 --throughput-epochs 2 \
  --batch-sizes 32,512,8192 --num-models 1,8,64,512 --timeout 150 --out "$OUT" \
  || echo "device_check: benchmarks.run stopped (exit $?) after ${SECONDS} s"
echo "device_check: benchmarks.run done at ${SECONDS} s"

# 2. The fused loop under XLA's command-buffer settings, 3 epochs at batch 32 each (about a minute).
timeout 180 "$PY" - "$OUT" <<'PY' || echo "device_check: sweep stopped (exit $?)"
import json, os, statistics, subprocess, sys, tempfile
out = sys.argv[1]
VARIANTS = {  # XLA_FLAGS for each command-buffer setting.
    'default': '',
    'off': '--xla_gpu_enable_command_buffer=',
    'with loops': '--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,'
                  'CONDITIONAL,WHILE',
}
rows, device = [], None
for name, flag in VARIANTS.items():
  with tempfile.TemporaryDirectory() as workdir:
    env = dict(os.environ, XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} {flag}'.strip())
    cmd = [sys.executable, '-m', 'fmnist_jax.train', '--config', 'configs/base.py',
           '--workdir', workdir, '--config.num_epochs=3', '--config.tensorboard=False',
           '--config.progress=False']
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=50)
    if proc.returncode:
      tail = (proc.stderr.strip().splitlines() or ['no output'])[-1][:200]
      rows.append(f'| {name} | error: {tail} | | | |')
      continue
    summary = json.load(open(os.path.join(workdir, 'summary.json')))
    epochs = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
    device = device or summary.get('device_kind')
    steady = statistics.median(e['seconds'] for e in epochs[1:])
    rows.append(f'| {name} | {summary["steps_per_epoch"] / steady:,.0f} | '
                f'{summary["compile_seconds"]:.2f} | {epochs[0]["seconds"]:.2f} | '
                f'{summary["test_accuracy"]:.4f} |')
  print('device_check:', rows[-1], flush=True)
slug = ''.join(c if c.isalnum() else '-' for c in f'gpu-{device or "unknown"}'.lower())
path = os.path.join(out, f'{slug}-fused-loop.md')
os.makedirs(out, exist_ok=True)
with open(path, 'w') as f:
  f.write(f'# Fused training loop on {device}: XLA command buffers\n\n'
          'configs/base.py (batch 32, 1,875 steps per epoch), 3 epochs per run; steady rate = '
          'steps per epoch / median time of epochs 2-3. One run per row.\n\n'
          '| command buffers | steady steps/s | compile s | epoch 1 s | accuracy |\n'
          '| --- | --- | --- | --- | --- |\n' + '\n'.join(rows) + '\n')
print('device_check: wrote', path)
PY
echo "device_check: finished in ${SECONDS} s"
ls -la "$OUT" | grep -i gpu || true
