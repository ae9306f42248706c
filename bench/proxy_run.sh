#!/usr/bin/env bash
# The issue-2 proxy benchmark: train + infer on flowers102-noisy with the proxy backbone, timed, scored.
#   bench/proxy_run.sh OUT_DIR [extra train options...]
# Prints one line: OUT_DIR, options, wall seconds of train+infer, dev-test top-1 / macro accuracy.
# PROXY numbers (../shared/models/proxy-vit-s8-64.pt), not CLIP numbers.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${DATA:-$ROOT/../shared/data/flowers102-noisy}"
WEIGHTS="${WEIGHTS:-$ROOT/../shared/models/proxy-vit-s8-64.pt}"
PY="${PYTHON:-python3}"
OUT="$1"; shift
mkdir -p "$OUT"
start=$(date +%s)
CONFIG="${CONFIG:-$ROOT/configs/proxy-cpu.yaml}"      # the proxy profile: the contest recipe, CPU budgets
"$ROOT/run_train.sh" "$DATA/train" "$OUT" --weights "$WEIGHTS" --allow-nonstandard-backbone --config "$CONFIG" "$@" > "$OUT/train.log" 2>&1
"$ROOT/run_infer.sh" "$DATA/test" "$OUT" > "$OUT/infer.log" 2>&1
end=$(date +%s)
echo "$OUT options=[$*] train+infer_seconds=$((end - start)) machine=$(nproc)cpu-$(uname -m) $("$PY" "$ROOT/bench/score_submission.py" "$OUT/submission.csv" "$DATA/test_labels.csv")"
