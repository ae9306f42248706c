#!/usr/bin/env bash
# run_train.sh TRAIN_DIR [OUT_DIR] [options...]   (options: python -m app train --help)
# One program, one process per GPU (NUM_GPUS=N to choose; default every GPU torch can use; NUM_GPUS=0
# for the CPU on purpose): app/launch.py starts it through `accelerate launch`.
set -euo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
COMMAND=train
source "$ROOT/app/launch_common.sh"
exec "$PY" -m app.launch train "$IN_DIR" "$OUT_DIR" ${ARGS[@]+"${ARGS[@]}"}
