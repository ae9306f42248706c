#!/usr/bin/env bash
# run_train.sh TRAIN_DIR [OUT_DIR] [options...]   (options: python -m app train --help)
# One program, launched with `accelerate launch` on NUM_GPUS processes (default: every GPU seen).
set -euo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
COMMAND=train
source "$ROOT/app/launch_common.sh"
GPUS_SEEN=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
NUM_GPUS="${NUM_GPUS:-$GPUS_SEEN}"
[ "${NUM_GPUS:-0}" -ge 1 ] 2>/dev/null || NUM_GPUS=1
LAUNCH=(--num_processes "$NUM_GPUS" --num_machines 1 --dynamo_backend no --mixed_precision no)
if [ "$NUM_GPUS" -gt 1 ]; then LAUNCH+=(--multi_gpu); fi
# accelerate launch sets OMP_NUM_THREADS=1: right beside GPUs, but on a CPU-only machine it would
# leave all cores but one idle (measured: half the fine-tuning speed on 2 cores). Share the cores.
if [ "$GPUS_SEEN" -eq 0 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  LAUNCH+=(--num_cpu_threads_per_process "$(( $(nproc) / NUM_GPUS > 0 ? $(nproc) / NUM_GPUS : 1 ))")
fi
exec "$PY" -m accelerate.commands.launch "${LAUNCH[@]}" -m app train "$IN_DIR" "$OUT_DIR" ${ARGS[@]+"${ARGS[@]}"}
