#!/usr/bin/env bash
# Creates .venv-colab as Colab's TPU runtime is: Python 3.13 with the runtime's packages at its
# versions (.ci/colab-tpu.txt, the part of its published list .ci/colab-tpu-freeze.txt that
# fmnist_jax, TensorFlow, the tests and the notebook touch; h5py 3.16.0 included). Like the runtime
# it has no TensorFlow, no ml-collections and no fmnist_jax: the notebook installs those itself, and
# tests/test_notebook.py checks afterwards that no preinstalled package changed.
# Idempotent: installs once (from scratch when its inputs change), notes what it installed, and on
# later calls removes what a notebook run added since. Usage:
#   .ci/colab_env.sh
#   FMNIST_COLAB_PYTHON=.venv-colab/bin/python .venv/bin/python -m pytest tests/test_notebook.py
#   .ci/colab_env.sh --check   # only says whether every preinstalled package kept its version
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-colab
if [ "${1:-}" = --check ]; then
  exec "$VENV/bin/python" .ci/colab_packages.py check
fi
stamp="$VENV/.stamp-$(cat .ci/colab-tpu.txt .ci/colab-tpu-freeze.txt .ci/colab_env.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "colab_env: installing the Colab TPU runtime's packages into $VENV"
  start=$SECONDS
  rm -rf "$VENV"  # From scratch: what it notes as preinstalled must hold nothing an earlier run added.
  "$(.ci/python313)" -m venv "$VENV"
  # The whole published list as constraints: a dependency of a listed package comes at Colab's
  # version too.
  grep -E '^[A-Za-z0-9_.-]+==' .ci/colab-tpu-freeze.txt >"$VENV/constraints.txt"
  "$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" -r .ci/colab-tpu.txt
  "$VENV/bin/python" .ci/colab_packages.py record
  touch "$stamp"
  echo "colab_env: installed in $((SECONDS - start)) s"
else
  "$VENV/bin/python" .ci/colab_packages.py restore
fi
"$VENV/bin/python" .ci/colab_packages.py check
if "$VENV/bin/python" -c 'import tensorflow' 2>/dev/null; then
  echo "colab_env: tensorflow imports in $VENV; Colab's TPU runtime has none" >&2
  exit 1
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m, sys
print(f'colab_env: ready, Python {sys.version.split()[0]},',
      ', '.join(f'{n} {m.version(n)}' for n in ('jax', 'flax', 'h5py', 'protobuf', 'numpy')))
PY
