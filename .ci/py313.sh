#!/usr/bin/env bash
# .venv-py313: fmnist_jax[tf,test] on Python 3.13 (Colab's Python) with the newest releases that
# pyproject.toml allows (jax 0.12 and its flax today: jax >= 0.11 ships only for Python >= 3.12,
# so the 3.11 .venv of setup.sh never gets them); then pytest there with the given arguments.
# Idempotent: installs only when pyproject.toml or this script changed.
# Usage: .ci/py313.sh --install-only
#        .ci/py313.sh -q -n 2 --dist loadfile      # the suite, or any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-py313
[ -x "$VENV/bin/python" ] || "$(.ci/python313)" -m venv "$VENV"
stamp="$VENV/.stamp-$(cat pyproject.toml .ci/py313.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "py313: installing fmnist_jax[tf,test] into $VENV"
  start=$SECONDS
  "$VENV/bin/python" -m pip install -q -U --upgrade-strategy eager -e '.[tf,test]'
  rm -f "$VENV"/.stamp-*
  touch "$stamp"
  echo "py313: installed in $((SECONDS - start)) s"
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m, sys
print(f'py313: Python {sys.version.split()[0]},', ', '.join(f'{n} {m.version(n)}' for n in (
    'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'tensorflow-cpu')))
PY
if [ "${1:-}" = --install-only ]; then
  exit 0
fi
exec "$VENV/bin/python" -m pytest "$@"
