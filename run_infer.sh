#!/usr/bin/env bash
# run_infer.sh TEST_DIR [OUT_DIR] [options...]   (options: python -m app infer --help)
# Writes OUT_DIR/submission.csv from OUT_DIR/model.pt: one line `name.jpg, 0001` per test image.
# One process; app/launch.py first stops a run on GPUs that nvidia-smi lists but torch cannot use
# (NUM_GPUS=0: the CPU, on purpose).
set -euo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
COMMAND=infer
source "$ROOT/app/launch_common.sh"
exec "$PY" -m app.launch infer "$IN_DIR" "$OUT_DIR" ${ARGS[@]+"${ARGS[@]}"}
