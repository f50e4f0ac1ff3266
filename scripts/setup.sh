#!/usr/bin/env bash
# Set up a fresh machine: the Debian Fashion-MNIST package and a virtual environment in .venv.
# Idempotent: once .venv holds what pyproject.toml and constraints.txt ask for, a second run installs
# nothing and needs no network (a stamp in .venv records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist > /dev/null   # errors still reach stderr
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: dds needs Python 3.11 or newer; $PY is $("$PY" -V 2>&1). Set PYTHON=python3.11 (or newer)" >&2
  exit 2
fi
if [ ! -x .venv/bin/pip ]; then   # none yet, or a half-made one from a failed run
  rm -rf .venv
  "$PY" -m venv .venv || { echo "setup: '$PY -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 2; }
fi

STAMP=.venv/.dds-setup
WANT=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  # pip -qq: errors only (a machine's pip configuration may warn about every missing find-links folder).
  # torch/torchvision first and pinned, as the tests ran with them: on these machines both install from
  # local disk, where an unpinned torch would pull a newer multi-GB build from the index.
  .venv/bin/pip install -qq --disable-pip-version-check --no-compile torch==2.14.1 torchvision==0.29.1
  # then dds with exactly the versions the tests ran with (constraints.txt; pyproject.toml has lower bounds only)
  .venv/bin/pip install -qq --disable-pip-version-check --no-compile -c constraints.txt -e '.[test]'
  echo "$WANT" > "$STAMP"
fi
echo "setup: .venv ready ($(.venv/bin/python -c "import torch, dds; print('torch', torch.__version__)"))"
