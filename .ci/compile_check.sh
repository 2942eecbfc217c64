#!/usr/bin/env bash
# CI: compiles every program the trainer runs (configs/base.py) with the accelerators' own compilers
# on this machine, which has neither TPU nor GPU:
#   newest     one venv with pip install '.[tpu,cuda12]' (both compilers load side by side):
#              XLA:TPU for v5e:1x1 (Colab's free TPU) and v5e:2x4, and XLA:GPU for t4 (Colab's
#              free GPU) and h100 (1 and 8 GPUs)
#   colab-tpu  XLA:TPU for v5e:1x1 and v5e:2x4 in the stack Colab's TPU runtime pins
#              (.ci/colab-tpu.txt: jax 0.7.2, whose jax[tpu] pins libtpu 0.0.23)
# then checks each <kind>_compile.json and runs the tests that need that compiler.
# One venv per stack under $VENVS, reinstalled only when its inputs change (pip's cache is
# shared); the stacks run one after the other: compiling is CPU-bound.
# Usage: .ci/compile_check.sh [newest] [colab-tpu]     (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
VENVS="${COMPILE_CHECK_VENVS:-build/compile-venvs}"
OUT="${COMPILE_CHECK_OUT:-workdirs/compile_check}"
PYTEST='pytest>=8,<10'

setup() {  # setup STACK PIP_ARGS...: the stack's venv, installed when its inputs changed.
  local stack=$1 venv="$VENVS/$1"
  shift
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  local stamp
  stamp="$venv/.stamp-$(echo "$*" | cat - pyproject.toml .ci/colab-tpu.txt | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    local start=$SECONDS
    "$venv/bin/python" -m pip install -q "$@"
    rm -f "$venv"/.stamp-*
    touch "$stamp"
    echo "compile_check: $stack: installed in $((SECONDS - start)) s"
  fi
}

check() {  # check STACK KIND TARGETS: compile, check the JSON, run the compiler's tests.
  local stack=$1 kind=$2 targets=$3 python="$VENVS/$1/bin/python" start=$SECONDS
  JAX_PLATFORMS=cpu "$python" -m fmnist_jax.export --config configs/base.py "--$kind=$targets" \
    --out "$OUT/$stack" >"$OUT/$stack-$kind.log" 2>&1 || { cat "$OUT/$stack-$kind.log"; return 1; }
  grep -v '^compile: ' "$OUT/$stack-$kind.log"  # The table.
  "$python" - "$OUT/$stack/${kind}_compile.json" "$targets" "$stack" <<'PY'
import json, sys
path, targets, stack = sys.argv[1], sys.argv[2].split(','), sys.argv[3]
records = json.load(open(path))
keys = {'topology', 'devices', 'program', 'compile_seconds', 'memory_bytes', 'flops',
        'bytes_accessed', 'estimated_seconds', 'steps'}
groups = {}
for r in records:
  assert set(r) == keys and set(r['memory_bytes']) == {'argument', 'output', 'temp',
                                                        'generated_code'}, r
  assert r['estimated_seconds'] and r['estimated_seconds'] > 0, r
  groups.setdefault((r['topology'], r['devices']), {})[r['program']] = r
assert {t for t, _ in groups} == set(targets), (groups.keys(), targets)
for (target, devices), progs in groups.items():
  assert {'train_chunk', 'train_step', 'shuffle', 'evaluate', 'predict'} <= set(progs), progs
  step = progs['train_step']
  assert step['steps'] == progs['train_chunk']['steps'] == 1, step  # A loop body counts once.
  if devices == 1:  # ~4 x 101,770 parameters x 32 examples, and Adam's update.
    assert 1.2e7 < step['flops'] < 1.7e7, step
  print(f'compile_check: {stack}: {target} x {devices}: {len(progs)} programs compiled; train step '
        f'{step["flops"]:.3g} flops, {step["estimated_seconds"] * 1e6:.1f} us')
PY
  # The tests that skip without this compiler (XLA autotuning is off for a GPU-less compile).
  JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 XLA_FLAGS=--xla_gpu_autotune_level=0 \
    FMNIST_EXPECTED_SKIPS=".ci/expected-skips/compile-$stack.txt" \
    "$python" -m pytest -q -p no:cacheprovider tests/test_export.py -k "xla_$kind" | tail -1
  echo "compile_check: $stack: $kind compiled and checked in $((SECONDS - start)) s"
}

install() {  # install STACK: its venv.
  case "$1" in
    newest) setup newest -e '.[tpu,cuda12]' "$PYTEST" ;;
    colab-tpu)
      # The pins are constraints: pip fails instead of moving them; jax[tpu]==0.7.2 pins libtpu.
      setup colab-tpu -c .ci/colab-tpu.txt 'jax[tpu]' -e . "$PYTEST"
      "$VENVS/colab-tpu/bin/python" -c "import importlib.metadata as m; v = m.version('libtpu'); \
assert (m.version('jax'), v) == ('0.7.2', '0.0.23'), v" ;;
    *) echo "compile_check: unknown stack $1 (newest, colab-tpu)" >&2; return 2 ;;
  esac
}

stacks="${*:-newest colab-tpu}"
mkdir -p "$VENVS" "$OUT"
# Installing is mostly download and unpacking: the stacks install side by side, compile in turn.
pids=()
for stack in $stacks; do
  install "$stack" &
  pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "$pid"
done
for stack in $stacks; do
  case "$stack" in
    newest)
      check newest tpu v5e:1x1,v5e:2x4
      check newest gpu t4,h100 ;;
    colab-tpu)
      check colab-tpu tpu v5e:1x1,v5e:2x4 ;;
  esac
done
echo "compile_check: passed in $SECONDS s"
