#!/usr/bin/env bash
# TECH_REPORT.md section 4.5 (hard-variant rows): the data set they are measured on.
# The hard variant of the proxy benchmark: the truly clean images of
# flowers102-noisy (its truth file) as a clean dataset, its off-topic images as the off-topic pool,
# re-noised by `python -m app make-noisy` (45% noise, imbalance 22), beside the same dev-test split.
#   bench/make_hard_variant.sh OUT_DIR        -> OUT_DIR/{train,train_truth.csv,stats.json,test,test_labels.csv}
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${DATA:-$ROOT/../shared/data/flowers102-noisy}"
OUT="$1"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 - "$DATA" "$WORK" <<'PY'
import os, sys
from pathlib import Path
import pandas as pd
data, work = Path(sys.argv[1]), Path(sys.argv[2])
truth = pd.read_csv(data / "train_truth.csv", dtype=str)
for row in truth.itertuples():
    if row.noise == "clean":
        target = work / "clean" / row.true_label / Path(row.path).name
    elif row.noise == "off_topic":
        target = work / "offtopic" / Path(row.path).name
    else:
        continue
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(data / row.path, target)
PY
cd "$ROOT"
python3 -m app make-noisy "$WORK/clean" "$OUT" --symmetric 0.2 --pair 0.2 --off-topic "$WORK/offtopic" 0.08 \
    --duplicates 0.02 --imbalance 22 --seed 0
ln -sfn "$DATA/test" "$OUT/test"
cp "$DATA/test_labels.csv" "$OUT/test_labels.csv"
