# Sourced by run_train.sh / run_infer.sh: usage, the input folder, and OUT_DIR
# (second argument unless it is an option; else /outputs when it exists; else ./outputs).
# Expects: ROOT, COMMAND (train|infer), and the script's arguments in "$@".
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# `python -m app` would otherwise import an `app` package from the caller's working directory
# before this one (Python >= 3.11; inherited by every process the launcher starts)
export PYTHONSAFEPATH=1
# the command to print when a run is interrupted (app/__main__.py): this script, with the same arguments
export APP_LAUNCHER="$ROOT/run_${COMMAND}.sh"
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  echo "usage: run_${COMMAND}.sh $( [ "$COMMAND" = train ] && echo TRAIN_DIR || echo TEST_DIR ) [OUT_DIR] [options...]"
  "$PY" -m app "$COMMAND" --help | sed -n '/^options/,$p'
  [ $# -lt 1 ] && exit 2 || exit 0
fi
IN_DIR="$1"; shift
if [ $# -ge 1 ] && [[ "$1" != -* ]]; then OUT_DIR="$1"; shift
elif [ -d /outputs ]; then OUT_DIR=/outputs
else OUT_DIR=./outputs; fi
ARGS=("$@")
