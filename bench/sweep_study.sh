#!/usr/bin/env bash
# TECH_REPORT.md 4.7, table "The sweep on the hard variant": the learning-rate and noise-stage sweeps
# of `python -m app sweep` at the reduced proxy budget, each run's dev-test top-1, and the paired
# comparison of every pair of runs; results in bench/results/sweep/<sweep>/.
#   bench/sweep_study.sh HARD_DIR OUT_ROOT      (HARD_DIR: made by bench/make_hard_variant.sh)
# PROXY numbers (../shared/models/proxy-vit-s8-64.pt), not CLIP numbers. About 50 min on 2 CPU cores.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HARD="$1"; S="$2"
PY="${PYTHON:-python3}"
cd "$ROOT"
PROXY=(--config configs/proxy-cpu.yaml --weights "$ROOT/../shared/models/proxy-vit-s8-64.pt" --allow-nonstandard-backbone
       --seed 0 --image-size native --epochs 2)
score() {  # OUT_ROOT: every run inferred on the dev-test images and scored against test_labels.csv
  : > "$1/devtest.jsonl"
  for run in "$1"/*=*; do
    ./run_infer.sh "$HARD/test" "$run" > "$run/infer.log" 2>&1
    "$PY" -c "import sys, json, pandas as pd; from pathlib import Path; from app.studies.bench import score
s = score(Path(sys.argv[1]) / 'submission.csv', pd.read_csv(sys.argv[2], dtype=str), tail=set())
print(json.dumps({'run': Path(sys.argv[1]).name, 'top1': round(s['top1'], 4), 'macro': round(s['macro'], 4)}))" "$run" "$HARD/test_labels.csv" \
      >> "$1/devtest.jsonl"
  done
}
pairs() {  # OUT_ROOT: `compare` on every pair of its runs
  local runs=("$1"/*=*)
  : > "$1/pairs.md"
  for ((i = 0; i < ${#runs[@]}; i++)); do for ((j = i + 1; j < ${#runs[@]}; j++)); do
    "$PY" -m app compare "${runs[i]}" "${runs[j]}" | tail -1 | sed "s|$1/||" >> "$1/pairs.md"
  done; done
}
"$PY" -m app sweep "$HARD/train" "$S/hard-lr" --grid finetune.lr=2e-4,5e-4,1e-3,2e-3 "${PROXY[@]}"
score "$S/hard-lr"; pairs "$S/hard-lr"
mkdir -p "$S/hard-noise" && cp -r "$S/hard-lr/shared" "$S/hard-noise/"     # scan and feature cache reused
"$PY" -m app sweep "$HARD/train" "$S/hard-noise" --grid noise.enabled=true,false "${PROXY[@]}"
score "$S/hard-noise"; pairs "$S/hard-noise"
for sweep in hard-lr hard-noise; do
  mkdir -p "bench/results/sweep/$sweep"
  cp "$S/$sweep"/{sweep.md,sweep.json,sweep.png,best.yaml,devtest.jsonl,pairs.md} "bench/results/sweep/$sweep/"
done
