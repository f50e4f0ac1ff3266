#!/usr/bin/env bash
# The main job on the embedded default: Fashion-MNIST with the offline encoder pair (lite0-minilm).
# shard -> embed -> index -> a summary of the scores table -> a short bench of `full` against the
# reduced-cost policies at half the budget (`budgeted`, `random`, `dds`). A few minutes on 2 CPU cores,
# set-up included (the README's "Two commands" gives a measured time and the table to expect).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
export DDS_WORKSPACE=${DDS_WORKSPACE:-./dds-work}
LIMIT=${DDS_LIMIT:-5000}
DDS=.venv/bin/dds

$DDS shard fashion-mnist --limit "$LIMIT"
$DDS embed fashion-mnist --encoder lite0-minilm
$DDS index fashion-mnist --encoder lite0-minilm    # prints the scores table by region
EPOCHS=${DDS_EPOCHS:-8}
$DDS bench fashion-mnist --policies full,budgeted,random,dds --budget 0.5 --epochs "$EPOCHS" --seeds 1 \
    --eval-every "$EPOCHS" --results "$DDS_WORKSPACE/main-job.jsonl"   # one JSON line per run, appended
echo "workspace: $DDS_WORKSPACE  (query it: .venv/bin/dds sql \"SELECT * FROM epochs\"; every main job so far:"
echo "  .venv/bin/dds bench-table $DDS_WORKSPACE/main-job.jsonl)"
