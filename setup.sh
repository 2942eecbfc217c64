#!/usr/bin/env bash
# Installs everything fmnist_jax needs, idempotently:
#   - the Fashion-MNIST IDX files (Debian's dataset-fashion-mnist) when no local copy is found and
#     apt is available (otherwise tfds downloads the data on first use, where there is a network);
#   - a virtual environment in .venv with the project and the extras in $FMNIST_EXTRAS
#     (default: tf,test; add bench for the benchmark peers).
# Usage: ./setup.sh && .venv/bin/python -m fmnist_jax.train --config configs/base.py
set -euo pipefail
cd "$(dirname "$0")"
EXTRAS="${FMNIST_EXTRAS:-tf,test}"
DEBIAN_DIR=/usr/share/datasets/fashion-mnist

if [ -z "${FMNIST_JAX_MANUAL_DIR:-}" ] && [ ! -f "$DEBIAN_DIR/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: no local Fashion-MNIST files and no root apt; tfds will download them on first use"
  fi
fi

if ! python3 -c 'import venv, ensurepip' 2>/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv

# Reinstall only when pyproject.toml or the extras changed.
stamp=".venv/.fmnist_jax-$(cat pyproject.toml setup.sh | sha1sum | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
  echo "setup: installing fmnist_jax[$EXTRAS] into .venv"
  if [[ ",$EXTRAS," == *",bench,"* ]]; then
    # A torch that is already there is kept; else 2.13.0, whose CPU build lies on this project's
    # CI machines (elsewhere, install the torch build you want first).
    .venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/python -m pip install -q 'torch==2.13.0'
  fi
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  rm -f .venv/.fmnist_jax-*
  touch "$stamp"
fi
