#!/usr/bin/env bash
# The GPU check, one command for whenever a GPU is lent (never needed otherwise):
#   1. dds embed with openclip:ViT-B-32 (random weights, half-precision autocast) on synthetic 64-px images
#   2. dds bench-index: the index stage's compute on 1.28M synthetic 512-d vectors, on CUDA
#   3. dds train --device cuda: 2 epochs of resnet18 on the same 64-px images
# Each step prints its seconds and img/s. Usage: bash benchmarks/gpu_check.sh [WORKDIR]
# Sizes: GPU_CHECK_PER_CLASS (train images per class, 10 classes; default 2000), GPU_CHECK_N (default 1280000).
set -euo pipefail
WORK=$(realpath -m "${1:-$(mktemp -d)}")
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DDS=${DDS:-.venv/bin/dds}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); run this on a machine with one" >&2
  exit 3
fi
"$PY" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

export DDS_WORKSPACE="$WORK/ws" HF_HUB_OFFLINE=1
PER_CLASS=${GPU_CHECK_PER_CLASS:-2000}
N=${GPU_CHECK_N:-1280000}

step() {  # step TITLE COMMAND...: run it, then print its wall-clock seconds
  echo "== $1"
  local t0=$SECONDS
  "${@:2}"
  echo "== $1: $((SECONDS - t0)) s"
}

# data: disjoint train and test image folders (different seeds), sharded once
"$PY" benchmarks/synthetic_folder.py "$WORK/img/train" --per-class "$PER_CLASS" --size 64 --seed 0 >/dev/null
"$PY" benchmarks/synthetic_folder.py "$WORK/img/test" --per-class 200 --size 64 --seed 1 >/dev/null
"$DDS" shard "imagefolder:$WORK/img" --name synth64 --no-progress >/dev/null

# ViT-B-32 with random weights: a checkpoint file of a freshly built model, loaded like any local checkpoint
"$PY" -c "import open_clip, torch, sys; torch.save(open_clip.create_model('ViT-B-32').state_dict(), sys.argv[1])" \
  "$WORK/vit-b-32-random.pt"
step "embed openclip:ViT-B-32 (random, autocast)" \
  "$DDS" embed synth64 --encoder "openclip:ViT-B-32/$WORK/vit-b-32-random.pt" --device cuda --batch-size 512 --no-progress
step "index compute, $N x 512 synthetic vectors" \
  "$DDS" bench-index --n "$N" --dim 512 --classes 1000 --device cuda
step "train resnet18, 2 epochs, 64 px" \
  "$DDS" train synth64 --policy full --epochs 2 --model resnet18 --device cuda --no-progress
echo "gpu_check done; workspace: $WORK"
