#!/usr/bin/env bash
# Creates .venv-colab: fmnist_jax on the versions Colab's TPU runtime preinstalls (.ci/colab-tpu.txt),
# plus what the notebook installs there itself (tensorflow-cpu for tfds's data preparation, kept on
# the runtime's protobuf) and pytest. Idempotent: reinstalls only when its inputs change.
# Usage: .ci/colab_env.sh && .venv-colab/bin/python -m pytest tests/test_train.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-colab
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
stamp="$VENV/.stamp-$(cat .ci/colab-tpu.txt .ci/colab_env.sh pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "colab_env: installing the Colab TPU runtime's versions into $VENV"
  # One resolution: the pins are constraints, so pip fails instead of silently upgrading them.
  "$VENV/bin/python" -m pip install -q -c .ci/colab-tpu.txt \
    jax jaxlib flax optax orbax-checkpoint numpy tensorflow-datasets protobuf absl-py etils pillow \
    matplotlib ipykernel nbclient nbformat 'pytest>=8,<10' \
    'tensorflow-cpu>=2.18,<2.22' -e .
  rm -f "$VENV"/.stamp-*
  touch "$stamp"
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
pins = [l.split('==') for l in open('.ci/colab-tpu.txt') if '==' in l and not l.startswith('#')]
wrong = [f'{n} {m.version(n)} (want {v.strip()})' for n, v in pins if m.version(n) != v.strip()]
assert not wrong, f'colab_env: not the pinned versions: {wrong}'
print('colab_env: ready,', ', '.join(f'{n} {m.version(n)}' for n in ('jax', 'flax', 'tensorflow-cpu')))
PY
