#!/usr/bin/env bash
# Set up a fresh machine: the Debian Fashion-MNIST package and a virtual environment in .venv.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist > /dev/null   # errors still reach stderr
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip -qq: errors only (a machine's pip configuration may warn about every missing find-links folder).
# torch/torchvision first and pinned: these releases install from local disk here; an unpinned
# torch would pull a multi-GB CUDA build from the index.
.venv/bin/pip install -qq --disable-pip-version-check --no-compile torch==2.14.1 torchvision==0.29.1
# then dds with exactly the versions the tests ran with (constraints.txt; pyproject.toml has lower bounds only)
.venv/bin/pip install -qq --disable-pip-version-check --no-compile -c constraints.txt -e '.[test]'
echo "setup: .venv ready ($(.venv/bin/python -c "import torch, dds; print('torch', torch.__version__)"))"
