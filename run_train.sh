#!/usr/bin/env bash
# run_train.sh TRAIN_DIR [OUT_DIR] [options...]   (options: python -m app train --help)
# One program, launched with `accelerate launch` on NUM_GPUS processes (default: every GPU seen).
set -euo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
PY="${PYTHON:-python3}"
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  echo "usage: run_train.sh TRAIN_DIR [OUT_DIR] [options...]"
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m app train --help | sed -n '/^options/,$p'
  exit $([ $# -lt 1 ] && echo 2 || echo 0)
fi
TRAIN_DIR="$1"; shift
if [ $# -ge 1 ] && [[ "$1" != -* ]]; then OUT_DIR="$1"; shift
elif [ -d /outputs ]; then OUT_DIR=/outputs
else OUT_DIR=./outputs; fi
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
fi
[ "${NUM_GPUS:-0}" -ge 1 ] 2>/dev/null || NUM_GPUS=1
LAUNCH=(--num_processes "$NUM_GPUS" --num_machines 1 --dynamo_backend no --mixed_precision no)
[ "$NUM_GPUS" -gt 1 ] && LAUNCH+=(--multi_gpu)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m accelerate.commands.launch "${LAUNCH[@]}" -m app train "$TRAIN_DIR" "$OUT_DIR" "$@"
