#!/bin/sh
# The image's ENTRYPOINT: runs the command as the owner of the output folder, so that a plain
#   docker run --gpus all -v /data:/data -v /outputs:/outputs IMAGE run_train.sh /data/train
# can write to a host folder whatever its owner, and what it writes there belongs to that owner.
#
# - Started with --user (not root): the command runs as that user, unchanged.
# - Started as root (the image's default): the output folder is OUT_DIR of run_train.sh/run_infer.sh
#   (their second argument, unless it is an option) or else /outputs; its nearest existing folder's
#   owner is looked up. Owned by root (a host folder made with sudo mkdir): the command runs as root,
#   and its files (mode 644, folders 755) are readable by every host user. Owned by another uid (a
#   user's folder): the command runs as that uid:gid (setpriv, from util-linux), so its files are
#   that user's.
set -eu

if [ "$(id -u)" != 0 ]; then
  exec "$@"
fi

out=/outputs
case "${1:-}" in
  run_train.sh | run_infer.sh | */run_train.sh | */run_infer.sh)
    if [ $# -ge 3 ]; then
      case "$3" in
        -*) ;;
        *) out=$3 ;;
      esac
    fi ;;
esac
while [ ! -d "$out" ]; do
  out=$(dirname "$out")
done

owner=$(stat -c %u:%g "$out")
uid=${owner%%:*}
gid=${owner#*:}
if [ "$uid" = 0 ]; then
  exec "$@"
fi
home=$(getent passwd "$uid" | cut -d: -f6 || true)
HOME=${home:-/tmp}
export HOME
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"
