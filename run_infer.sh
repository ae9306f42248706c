#!/usr/bin/env bash
# run_infer.sh TEST_DIR [OUT_DIR] [options...]   (options: python -m app infer --help)
# Writes OUT_DIR/submission.csv from OUT_DIR/model.pt: one line `name.jpg, 0001` per test image.
set -euo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
PY="${PYTHON:-python3}"
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  echo "usage: run_infer.sh TEST_DIR [OUT_DIR] [options...]"
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m app infer --help | sed -n '/^options/,$p'
  exit $([ $# -lt 1 ] && echo 2 || echo 0)
fi
TEST_DIR="$1"; shift
if [ $# -ge 1 ] && [[ "$1" != -* ]]; then OUT_DIR="$1"; shift
elif [ -d /outputs ]; then OUT_DIR=/outputs
else OUT_DIR=./outputs; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m app infer "$TEST_DIR" "$OUT_DIR" "$@"
