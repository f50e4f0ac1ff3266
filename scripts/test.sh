#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
export CUDA_VISIBLE_DEVICES=""
exec .venv/bin/python -m pytest -q "$@"
