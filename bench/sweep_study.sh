#!/usr/bin/env bash
# TECH_REPORT.md 4.7, table "The learning-rate sweeps": the learning-rate and noise-stage sweeps of
# `python -m app sweep` at the reduced proxy budget, each run's dev-test top-1, and the paired
# comparison of every pair of runs; results in bench/results/sweep/<name>-lr (a training run's split,
# 3%), <name>-noise (likewise) and <name>-lr-split1500, <name>-noise-split1500 (the sweep's default
# split, about 1,500 images).
#   bench/sweep_study.sh OUT_ROOT NAME=DATA_DIR [NAME=DATA_DIR ...]
#   e.g. bench/sweep_study.sh /work/sweeps hard=/work/data/hard flowers=../shared/data/flowers102-noisy
# DATA_DIR holds train/, test/ and test_labels.csv (the hard variant: bench/make_hard_variant.sh).
# PROXY numbers (../shared/models/proxy-vit-s8-64.pt), not CLIP numbers. About 70 min a set on 2 CPU
# cores (the four sweeps).
# LARGER_SPLIT=1 adds the learning-rate sweep with the split capped at 7% and at 15% of the images
# (on flowers102-noisy 3 and 10 a class, 306 and 877 images), in <name>-lr-split7 and -split15;
# about 30 min more a set. Rerun, it reuses finished runs and their scores.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
S="$1"; shift
PY="${PYTHON:-python3}"
cd "$ROOT"
WEIGHTS="$(cd "$ROOT/../shared/models" && pwd)/proxy-vit-s8-64.pt"
PROXY=(--config configs/proxy-cpu.yaml --weights "$WEIGHTS" --allow-nonstandard-backbone
       --seed 0 --image-size native --epochs 2)
score() {  # OUT_ROOT DATA_DIR: every run inferred on the dev-test images and scored against test_labels.csv
  : > "$1/devtest.jsonl"
  for run in "$1"/*=*; do
    [[ "$run/submission.csv" -nt "$run/model.pt" ]] || ./run_infer.sh "$2/test" "$run" > "$run/infer.log" 2>&1
    "$PY" -c "import sys, json, pandas as pd; from pathlib import Path; from app.studies.bench import score
s = score(Path(sys.argv[1]) / 'submission.csv', pd.read_csv(sys.argv[2], dtype=str), tail=set())
print(json.dumps({'run': Path(sys.argv[1]).name, 'top1': round(s['top1'], 4), 'macro': round(s['macro'], 4)}))" "$run" "$2/test_labels.csv" \
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
for set in "$@"; do
  name="${set%%=*}"; data="${set#*=}"
  # a training run's split (3% of the images)
  "$PY" -m app sweep "$data/train" "$S/$name-lr" --grid finetune.lr=2e-4,5e-4,1e-3,2e-3 --split-images 0 "${PROXY[@]}"
  score "$S/$name-lr" "$data"; pairs "$S/$name-lr"
  mkdir -p "$S/$name-noise" && cp -rn "$S/$name-lr/shared" "$S/$name-noise/"    # scan and feature cache reused
  "$PY" -m app sweep "$data/train" "$S/$name-noise" --grid noise.enabled=true,false --split-images 0 "${PROXY[@]}"
  score "$S/$name-noise" "$data"; pairs "$S/$name-noise"
  # the sweep's default split (about 1,500 images), learning rates and noise stage
  for grid in lr=finetune.lr=2e-4,5e-4,1e-3,2e-3 noise=noise.enabled=true,false; do
    mkdir -p "$S/$name-${grid%%=*}-split1500" && cp -rn "$S/$name-lr/shared" "$S/$name-${grid%%=*}-split1500/"
    "$PY" -m app sweep "$data/train" "$S/$name-${grid%%=*}-split1500" --grid "${grid#*=}" "${PROXY[@]}"
    score "$S/$name-${grid%%=*}-split1500" "$data"; pairs "$S/$name-${grid%%=*}-split1500"
  done
  if [[ -n "${LARGER_SPLIT:-}" ]]; then   # the learning-rate sweep again, its split capped at 7% (3 a class)
    mkdir -p "$S/$name-lr-split7" && cp -rn "$S/$name-lr/shared" "$S/$name-lr-split7/"
    "$PY" -m app sweep "$data/train" "$S/$name-lr-split7" --grid finetune.lr=2e-4,5e-4,1e-3,2e-3 "${PROXY[@]}" \
      --set validation.max_fraction=0.07
    score "$S/$name-lr-split7" "$data"; pairs "$S/$name-lr-split7"
    # and at 15%, spread evenly over the classes (flowers102-noisy: 10 a class)
    per_class=$("$PY" -c "import math, sys; from app.scan import list_train_files
_, files = list_train_files(sys.argv[1]); print(math.ceil(0.15 * len(files) / files['label'].nunique()))" "$data/train")
    mkdir -p "$S/$name-lr-split15" && cp -rn "$S/$name-lr/shared" "$S/$name-lr-split15/"
    "$PY" -m app sweep "$data/train" "$S/$name-lr-split15" --grid finetune.lr=2e-4,5e-4,1e-3,2e-3 "${PROXY[@]}" \
      --set validation.max_fraction=0.15 --set validation.per_class="$per_class"
    score "$S/$name-lr-split15" "$data"; pairs "$S/$name-lr-split15"
  fi
  for sweep in "$name-lr" "$name-noise" "$name-lr-split1500" "$name-noise-split1500" \
               ${LARGER_SPLIT:+"$name-lr-split7" "$name-lr-split15"}; do
    mkdir -p "bench/results/sweep/$sweep"
    cp "$S/$sweep"/{sweep.md,sweep.json,sweep.png,best.yaml,devtest.jsonl,pairs.md} "bench/results/sweep/$sweep/"
    for run in "$S/$sweep"/*=*; do     # each run's report: its split, the images it trained on
      mkdir -p "bench/results/sweep/$sweep/${run##*/}" && cp "$run/train_report.json" "$_/"
    done
  done
done
