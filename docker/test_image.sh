#!/usr/bin/env bash
# End-to-end check of docker/Dockerfile on a machine without a Docker engine or registry access:
#   (a) makes a local base image localhost/debian-py:bookworm (debootstrap + podman import) if missing;
#   (b) makes a tiny dataset and tiny backbone with `python -m tests.fixtures` on the host;
#   (c) builds the real Dockerfile on that base (CA bundle mounted, PIP_CERT set), with the weights
#       step given the tiny checkpoint: CLIP_WEIGHTS=fetch from a local HTTP server plus its SHA-256
#       (the organisers' default path, with a URL that works here); plus cheap checks of the weights
#       stage alone: local:docker/weights/FILE with the right hash passes, a wrong hash fails, skip;
#       and the base stage on a python-less Debian base whose uid 1000 is "ubuntu" (as in ubuntu:24.04);
#   (d) runs the image as the organisers' plain `docker run --gpus all -v /data:/data -v /outputs:/outputs
#       IMAGE run_train.sh /data/train` would (buildah from + buildah run --isolation chroot, through the
#       image's ENTRYPOINT, with its default user): the host output folder owned by root (mode 755, as
#       `sudo mkdir` makes it), /dev/shm at 64 MB (Docker's default, no --shm-size), no --user, NUM_GPUS
#       unset, no network. It runs run_train.sh /data/train --allow-nonstandard-backbone --set ...
#       (the tiny baked-in weights, small batches, 1 epoch; OUT_DIR left to its default /outputs) and
#       run_infer.sh /data/test, and checks /outputs/submission.csv: one row per test image,
#       "name.jpg, 0001", known labels; then the multi-process path, NUM_GPUS=2 without a GPU (two
#       CPU processes joined over gloo), into /outputs/two-processes. Every file written must exist,
#       belong to the folder's owner (root) and be readable by an unprivileged host user (uid 65534).
#       A second host folder owned by uid:gid 4321:4321 checks that the entrypoint runs the command as
#       a folder's non-root owner and that its files are that owner's;
#   (e) removes its containers and temporary files. Last line: "docker/test_image.sh: PASS" (exit 0),
#       or "docker/test_image.sh: FAIL ..." (exit != 0).
# Not exercised here: a GPU (the image's CUDA torch runs on the CPU), hence NCCL and its /dev/shm use.
# Needs root and: apt-get install -y podman buildah debootstrap iproute2. The first run downloads ~5 GB of
# wheels into the image (minutes); later runs reuse the cached layers.
#
# Environment:
#   IMAGE          tag to build (default localhost/app:test)
#   BASE_IMAGE     base to build on (default localhost/debian-py:bookworm, made here when missing)
#   CACHE_DIR      where the debootstrap rootfs tarball is cached (default /var/tmp/app-image-test)
#   PYTHON         host Python with the project's deps, for tests.fixtures (default .venv/bin/python)
#   HOST_CA        CA bundle mounted into the build for pip (default /etc/ssl/certs/ca-certificates.crt;
#                  set it empty on a network without TLS inspection)
#   TRAIN_ARGS     extra run_train.sh arguments (default: --allow-nonstandard-backbone
#                  --set finetune.epochs=1 --set finetune.batch_size=8 --set warmup.epochs=20
#                  --set features.batch_size=16 --set infer.batch_size=8; the backbone is the baked-in
#                  tiny checkpoint, found through CLIP_WEIGHTS_FILE as in the organisers' run)
#   SHM_SIZE       size of /dev/shm inside the container (default 64m, Docker's default, as in the
#                  organisers' `docker run` without --shm-size); empty: the host's /dev/shm
#   APT_BASE_CHECK=0  skip the python-less base check (its base image is made once, ~1 minute)
#   KEEP=1         keep the work directory (dataset, outputs, logs) for inspection
set -Eeuo pipefail

REPO="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"
IMAGE="${IMAGE:-localhost/app:test}"
BASE_IMAGE="${BASE_IMAGE:-localhost/debian-py:bookworm}"
CACHE_DIR="${CACHE_DIR:-/var/tmp/app-image-test}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
HOST_CA="${HOST_CA-/etc/ssl/certs/ca-certificates.crt}"
PODMAN=(podman --cgroup-manager=cgroupfs)
BUILDAH=(buildah --cgroup-manager=cgroupfs)
ME="docker/test_image.sh"

STEP="setup"
FAIL_MSG=""
WORK=""
HTTP_PID=""
CONTAINERS=()
STAGED_WEIGHTS=""

say() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() { FAIL_MSG="$*"; exit 1; }
# run a command with its output in a log; print the lines matching FILTER (or the last lines)
run_logged() {  # LOG FILTER|-N CMD...
  local log="$1" filter="$2" rc; shift 2
  set +e
  if [[ "$filter" == -* ]]; then
    "$@" >"$log" 2>&1; rc=$?; tail "$filter" "$log"
  else
    "$@" 2>&1 | tee "$log" | grep --line-buffered -E "$filter"; rc=${PIPESTATUS[0]}
  fi
  set -e
  return "$rc"
}

cleanup() {
  local rc=$?
  set +e
  for c in "${CONTAINERS[@]}"; do "${BUILDAH[@]}" rm "$c" >/dev/null 2>&1; done
  [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null
  [ -n "$STAGED_WEIGHTS" ] && rm -f "$STAGED_WEIGHTS"
  if [ -n "$WORK" ]; then
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
  fi
  if [ "$rc" -ne 0 ]; then
    echo "$ME: FAIL at step '$STEP' (exit $rc)${FAIL_MSG:+: $FAIL_MSG}"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || fail "run as root (podman/buildah with chroot isolation)"
for tool in podman buildah; do
  command -v "$tool" >/dev/null || fail "$tool missing: apt-get install -y podman buildah debootstrap"
done
[ -x "$PYTHON" ] || fail "no host python at $PYTHON (set PYTHON=...)"
cd "$REPO"
WORK="$(mktemp -d /var/tmp/app-image-test.XXXXXX)"
chmod 0755 "$WORK"
T0=$SECONDS

# ---------------------------------------------------------------------------------------------
# make_base TAG NAME INCLUDE UBUNTU_USER: a Debian bookworm minbase image, made with debootstrap and
# podman import unless TAG exists; the rootfs tarball is cached as $CACHE_DIR/NAME.tar.
make_base() {
  local tag="$1" name="$2" include="$3" ubuntu_user="$4" tarball rootfs
  if "${PODMAN[@]}" image exists "$tag"; then
    echo "base image $tag exists"
    return 0
  fi
  mkdir -p "$CACHE_DIR"
  tarball="$CACHE_DIR/$name.tar"
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || fail "debootstrap missing: apt-get install -y debootstrap"
    rootfs="$CACHE_DIR/$name.rootfs"
    rm -rf "$rootfs"
    say "debootstrap Debian bookworm minbase${include:+ + $include} into $rootfs (a few minutes)"
    if ! debootstrap --variant=minbase ${include:+--include="$include"} bookworm "$rootfs" \
         http://deb.debian.org/debian >"$CACHE_DIR/$name.debootstrap.log" 2>&1; then
      # interrupted while configuring packages: finish that, as CONTAINER_NOTES.md says
      chroot "$rootfs" dpkg --configure -a || { tail -20 "$CACHE_DIR/$name.debootstrap.log"; fail "debootstrap failed"; }
    fi
    if [ "$ubuntu_user" = 1 ]; then  # like the ubuntu:24.04 image: uid 1000 is "ubuntu"
      chroot "$rootfs" useradd --uid 1000 --create-home --shell /bin/bash ubuntu
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  say "podman import $tarball as $tag"
  "${PODMAN[@]}" import --quiet "$tarball" "$tag" >/dev/null
}

STEP="base image"
say "base image $BASE_IMAGE"
if [ "$BASE_IMAGE" = localhost/debian-py:bookworm ]; then
  make_base "$BASE_IMAGE" debian-py-bookworm python3,python3-venv,ca-certificates 0
else
  "${PODMAN[@]}" image exists "$BASE_IMAGE" || fail "base image $BASE_IMAGE not found"
fi

# ---------------------------------------------------------------------------------------------
STEP="fixtures"
DATA="$WORK/data"
OUT="$WORK/outputs"
say "tiny dataset + backbone: $PYTHON -m tests.fixtures $DATA"
"$PYTHON" -m tests.fixtures "$DATA"
for f in train test tiny_backbone.pt test_labels.csv; do
  [ -e "$DATA/$f" ] || fail "tests.fixtures wrote no $DATA/$f"
done
chmod -R a+rX "$DATA"
mkdir -p "$OUT"
chown 0:0 "$OUT"; chmod 0755 "$OUT"   # /outputs as the organisers make it: `sudo mkdir /outputs`
OUT_USER="$WORK/outputs-user"         # a host user's folder, for the entrypoint's other branch
mkdir -p "$OUT_USER"
chown 4321:4321 "$OUT_USER"; chmod 0755 "$OUT_USER"
TINY_SHA="$(sha256sum "$DATA/tiny_backbone.pt" | cut -d' ' -f1)"

# ---------------------------------------------------------------------------------------------
STEP="build"
# --format docker: keep SHELL (bash -o pipefail) as Docker does; the OCI format drops it.
BUILD_ARGS=(--isolation=chroot --format docker -f docker/Dockerfile)
if [ -n "$HOST_CA" ]; then
  BUILD_ARGS+=(-v "$HOST_CA:/host-ca.crt:ro" --build-arg PIP_CERT=/host-ca.crt)
fi
# serve the tiny checkpoint over HTTP on the loopback (chroot isolation shares the host's network)
PORT="$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
mkdir -p "$WORK/www"
cp "$DATA/tiny_backbone.pt" "$WORK/www/"
"$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WORK/www" "$PORT" >"$WORK/http.log" 2>&1 &
HTTP_PID=$!
for _ in $(seq 50); do
  "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/', timeout=1)" \
    2>/dev/null && break
  sleep 0.2
done
say "build $IMAGE (CLIP_WEIGHTS=fetch from http://127.0.0.1:$PORT/tiny_backbone.pt, sha256 $TINY_SHA)"
run_logged "$WORK/build.log" '^(\[[0-9]+/[0-9]+\] STEP|--> Using cache|COMMIT|fetch_weights|Successfully|Error|error)' \
  "${PODMAN[@]}" build "${BUILD_ARGS[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  --build-arg CLIP_WEIGHTS=fetch \
  --build-arg "CLIP_WEIGHTS_URL=http://127.0.0.1:$PORT/tiny_backbone.pt" \
  --build-arg "CLIP_WEIGHTS_SHA256=$TINY_SHA" \
  -t "$IMAGE" . || { tail -40 "$WORK/build.log"; fail "podman build failed (log above)"; }
echo "build ok ($((SECONDS - T0)) s so far)"

STEP="weights stage checks"
STAGED_WEIGHTS="$REPO/docker/weights/test-tiny-backbone.pt"
cp "$DATA/tiny_backbone.pt" "$STAGED_WEIGHTS"
weights_build() {  # $1 = log name, rest = build args; builds only the weights stage
  local name="$1"; shift
  "${PODMAN[@]}" build "${BUILD_ARGS[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" --target weights "$@" -t "localhost/app-weights-check:$name" . \
    >"$WORK/weights-$name.log" 2>&1
}
weights_build local-ok --build-arg CLIP_WEIGHTS=local:docker/weights/test-tiny-backbone.pt \
  --build-arg "CLIP_WEIGHTS_SHA256=$TINY_SHA" \
  || { tail -20 "$WORK/weights-local-ok.log"; fail "CLIP_WEIGHTS=local:... with the right hash did not build"; }
grep -q "sha256 $TINY_SHA OK" "$WORK/weights-local-ok.log" || fail "local: weights not verified"
echo "local:docker/weights/FILE + right SHA-256: builds"
if weights_build local-bad --build-arg CLIP_WEIGHTS=local:docker/weights/test-tiny-backbone.pt \
     --build-arg CLIP_WEIGHTS_SHA256="$(printf '0%.0s' $(seq 64))"; then
  fail "a wrong CLIP_WEIGHTS_SHA256 did not fail the build"
fi
grep -q "SHA-256 mismatch" "$WORK/weights-local-bad.log" || { tail -20 "$WORK/weights-local-bad.log"; fail "wrong hash failed for another reason"; }
echo "local:docker/weights/FILE + wrong SHA-256: build fails (SHA-256 mismatch), as it must"
if weights_build fetch-bad --build-arg CLIP_WEIGHTS=fetch \
     --build-arg "CLIP_WEIGHTS_URL=http://127.0.0.1:$PORT/tiny_backbone.pt"; then
  fail "fetch of a file that is not OpenAI's ViT-B-32.pt passed the default hash check"
fi
grep -q "SHA-256 mismatch" "$WORK/weights-fetch-bad.log" || { tail -20 "$WORK/weights-fetch-bad.log"; fail "fetch with default hash failed for another reason"; }
echo "fetch of another file against OpenAI's default SHA-256: build fails, as it must"
weights_build skip --build-arg CLIP_WEIGHTS=skip || { tail -20 "$WORK/weights-skip.log"; fail "CLIP_WEIGHTS=skip did not build"; }
echo "CLIP_WEIGHTS=skip: builds"
rm -f "$STAGED_WEIGHTS"; STAGED_WEIGHTS=""
kill "$HTTP_PID" 2>/dev/null; HTTP_PID=""
"${PODMAN[@]}" rmi -f localhost/app-weights-check:local-ok localhost/app-weights-check:skip >/dev/null 2>&1 || true

STEP="base stage without python"
if [ "${APT_BASE_CHECK:-1}" = 1 ]; then
  # The real base (ubuntu:24.04) has no Python and a user "ubuntu" with uid 1000: check
  # the base stage's apt-get branch and user handling on a Debian base made like that.
  say "base stage on a base without python3 and with uid 1000 taken (as in ubuntu:24.04)"
  make_base localhost/debian-nopy:bookworm debian-nopy-bookworm "" 1
  "${PODMAN[@]}" build "${BUILD_ARGS[@]}" --build-arg BASE_IMAGE=localhost/debian-nopy:bookworm --target base -t localhost/app-base-check:nopy . \
    >"$WORK/base-nopy.log" 2>&1 || { tail -30 "$WORK/base-nopy.log"; fail "base stage on a python-less base failed"; }
  grep -q "apt-get install -y --no-install-recommends python3 python3-venv" "$WORK/base-nopy.log" \
    || fail "the apt-get branch did not run on the python-less base"
  CB="$("${BUILDAH[@]}" from localhost/app-base-check:nopy)"
  CONTAINERS+=("$CB")
  "${BUILDAH[@]}" run --isolation chroot "$CB" -- sh -c \
    'set -e; /opt/venv/bin/python -m pip --version; getent passwd 1000; ! getent passwd ubuntu; ls -ld /data /outputs' \
    || fail "base stage on a python-less base: wrong result"
  echo "python-less base: python3 + venv apt-installed, uid 1000 'ubuntu' replaced by 'app'"
fi

# ---------------------------------------------------------------------------------------------
STEP="image config"
cfg() { "${PODMAN[@]}" image inspect --format "$1" "$IMAGE"; }
say "image config"
echo "User=$(cfg '{{.Config.User}}') WorkingDir=$(cfg '{{.Config.WorkingDir}}') Cmd=$(cfg '{{.Config.Cmd}}') Entrypoint=$(cfg '{{.Config.Entrypoint}}')"
echo "Volumes=$(cfg '{{.Config.Volumes}}')  Size=$(( $(cfg '{{.Size}}') / 1000000 )) MB"
case "$(cfg '{{.Config.User}}')" in ""|root|0|0:0) ;; *) fail "the image does not start as root (User=$(cfg '{{.Config.User}}'))";; esac
mapfile -t ENTRYPOINT < <(cfg '{{range .Config.Entrypoint}}{{println .}}{{end}}' | sed '/^$/d')
[ "${ENTRYPOINT[*]}" = /usr/local/bin/entrypoint.sh ] || fail "ENTRYPOINT is '${ENTRYPOINT[*]}', not /usr/local/bin/entrypoint.sh"
[ "$(cfg '{{.Config.WorkingDir}}')" = /opt/app ] || fail "WORKDIR is not /opt/app"
cfg '{{.Config.Volumes}}' | grep -q /data || fail "no /data volume"
cfg '{{.Config.Volumes}}' | grep -q /outputs || fail "no /outputs volume"
ENVS="$(cfg '{{range .Config.Env}}{{println .}}{{end}}')"
for kv in CLIP_WEIGHTS_FILE=/opt/weights/ViT-B-32.pt HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1; do
  grep -qx "$kv" <<<"$ENVS" || fail "image env lacks $kv"
done

# ---------------------------------------------------------------------------------------------
STEP="container"
C="$("${BUILDAH[@]}" from "$IMAGE")"
CONTAINERS+=("$C")
# buildah 1.28 (Debian bookworm), chroot isolation: with two -v binds onto paths the image declares as
# VOLUMEs, one of them silently shows an empty directory. Dropping the VOLUME declarations from this
# working container (not from the image) makes both binds work, as they do under Docker.
"${BUILDAH[@]}" config --volume /data- --volume /outputs- "$C"
# No network inside: the run must work offline (unshare -n gives buildah run an empty net namespace),
# and /dev/shm as small as Docker's default (a private tmpfs in a private mount namespace).
SHM_SIZE="${SHM_SIZE-64m}"
unshare -n true 2>/dev/null || fail "unshare -n does not work here (needed for the offline run)"
command -v ip >/dev/null || fail "ip missing (apt-get install -y iproute2): the loopback of the offline run"
# crun [-o HOST_OUT] [-e NAME=VALUE]... CMD...: as `docker run -v DATA:/data -v HOST_OUT:/outputs IMAGE CMD`:
# the image's ENTRYPOINT, then CMD, with the image's user (root); /data read-only; no network but a
# loopback (two processes join over 127.0.0.1); /dev/shm a private tmpfs of SHM_SIZE.
crun() {
  local out="$OUT" envs=()
  while [ $# -gt 0 ]; do
    case "$1" in
      -o) out="$2"; shift 2 ;;
      -e) envs+=(--env "$2"); shift 2 ;;
      *) break ;;
    esac
  done
  # shellcheck disable=SC2016  # $1 is the inner shell's
  unshare -m -n -- bash -c 'ip link set lo up || exit 1
    if [ -n "$1" ]; then mount -t tmpfs -o "size=$1" shm /dev/shm || exit 1; fi
    shift; exec "$@"' crun "$SHM_SIZE" \
    "${BUILDAH[@]}" run --isolation chroot ${envs[@]+"${envs[@]}"} -v "$DATA:/data:ro" -v "$out:/outputs" "$C" -- \
    "${ENTRYPOINT[@]}" "$@"
}
say "inside the image: user, layout, offline"
# shellcheck disable=SC2016  # expanded inside the container, not here
crun bash -c 'set -e
  echo "id: $(id)"; [ "$(id -u)" = 0 ] || { echo "not root on a root-owned /outputs"; exit 1; }
  echo "run_train.sh -> $(command -v run_train.sh) -> $(readlink -f "$(command -v run_train.sh)")"
  command -v run_infer.sh >/dev/null
  ls -A /opt/app | tr "\n" " "; echo
  for bad in tests .git .venv outputs runs docker .ci; do
    [ ! -e "/opt/app/$bad" ] || { echo "/opt/app/$bad should not be in the image"; exit 1; }
  done
  [ -z "$(find /opt/app -name "*.pt" -print -quit)" ] || { echo "a *.pt file in /opt/app"; exit 1; }
  cat /opt/weights/ViT-B-32.pt.sha256 /opt/weights/ViT-B-32.pt.source
  [ -d /data/train ] && [ -d /data/test ] || { echo "/data is not the mounted dataset"; exit 1; }
  touch /outputs/.write-test
  echo "/dev/shm: $(df -h /dev/shm | awk "NR==2 {print \$2}")"
  python -c "import torch, open_clip, accelerate; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"open_clip\", open_clip.__version__, \"accelerate\", accelerate.__version__)"
  python - <<"EOF"
import socket
try:
    socket.create_connection(("pypi.org", 443), timeout=3)
    print("network: reachable (the run below is not proven offline)")
except OSError as e:
    print("network: none inside the container (", type(e).__name__, ")")
EOF
' || fail "container sanity checks"
[ -e "$OUT/.write-test" ] || fail "a file written to /outputs in the container did not reach the host"
rm -f "$OUT/.write-test"
if [[ "$SHM_SIZE" =~ ^([0-9]+)m$ ]]; then
  shm_mb="$(crun df -B1M --output=size /dev/shm | tail -1 | tr -d ' ')"
  [ "$shm_mb" = "${BASH_REMATCH[1]}" ] || fail "/dev/shm in the container is $shm_mb MB, not $SHM_SIZE"
  echo "/dev/shm in the container: $shm_mb MB"
fi

STEP="entrypoint on a user's folder"
say "entrypoint: a host folder owned by 4321:4321 -> the command runs as 4321:4321"
# shellcheck disable=SC2016  # expanded inside the container
crun -o "$OUT_USER" bash -c 'set -e; echo "id: $(id -u):$(id -g) HOME=$HOME"
  [ "$(id -u):$(id -g)" = 4321:4321 ]; mkdir /outputs/sub; echo x > /outputs/sub/file' \
  || fail "the entrypoint did not run the command as the owner (4321:4321) of the output folder"
[ "$(stat -c %u:%g "$OUT_USER/sub/file")" = 4321:4321 ] || fail "a file written to a user's folder is not that user's"
rm -rf "${OUT_USER:?}/sub"

STEP="default CMD"
say "default CMD: run_train.sh --help"
crun run_train.sh --help >"$WORK/help.log" 2>&1 || { cat "$WORK/help.log"; fail "run_train.sh --help failed"; }
head -5 "$WORK/help.log"

STEP="run_train.sh"
read -r -a TRAIN_EXTRA <<<"${TRAIN_ARGS:---allow-nonstandard-backbone --set finetune.epochs=1 --set finetune.batch_size=8 --set warmup.epochs=20 --set features.batch_size=16 --set infer.batch_size=8}"
say "run_train.sh /data/train ${TRAIN_EXTRA[*]}   (OUT_DIR: the default /outputs; NUM_GPUS unset)"
run_logged "$WORK/train.log" -25 crun run_train.sh /data/train "${TRAIN_EXTRA[@]}" \
  || fail "run_train.sh /data/train ${TRAIN_EXTRA[*]} exited non-zero (log above)"

STEP="run_infer.sh"
say "run_infer.sh /data/test"
run_logged "$WORK/infer.log" -15 crun run_infer.sh /data/test \
  || fail "run_infer.sh /data/test exited non-zero (log above)"

STEP="two processes"
say "NUM_GPUS=2 run_train.sh /data/train /outputs/two-processes ${TRAIN_EXTRA[*]}   (2 CPU processes, gloo)"
run_logged "$WORK/train2.log" -15 crun -e NUM_GPUS=2 run_train.sh /data/train /outputs/two-processes "${TRAIN_EXTRA[@]}" \
  || fail "NUM_GPUS=2 run_train.sh exited non-zero (log above)"
"$PYTHON" - "$OUT/two-processes/train_report.json" <<'EOF' || fail "the two-process run's report is wrong"
import json, sys
r = json.load(open(sys.argv[1]))
print("two-process run: processes", r["processes"], "device", r["device"], "timeouts", r["process_group_timeout_s"])
sys.exit(0 if r["processes"] == 2 else 1)
EOF
[ -s "$OUT/two-processes/model.pt" ] || fail "the two-process run wrote no model.pt"

STEP="outputs' owner and readability"
say "outputs: owned by the host folder's owner (root), readable by an unprivileged host user"
others="$(find "$OUT" ! -uid 0 -printf '%u:%g %p\n')"
[ -z "$others" ] || fail "files in the root-owned folder that are not root's: $others"
# Every result, report, figure and cache is readable by any host user (uid 65534 here). The resume
# checkpoints (checkpoints/) are root's like the folder; the safetensors files in them are written
# mode 600 by the safetensors library, which is listed here and not required.
unreadable="$(setpriv --reuid=65534 --regid=65534 --clear-groups -- \
  find "$OUT" -path '*/checkpoints/*' -prune -o \( -type d \( ! -readable -o ! -executable \) -o ! -type d ! -readable \) \
  -printf '%m %p\n' 2>&1)"
[ -z "$unreadable" ] || fail "not readable by uid 65534: $unreadable"
for f in submission.csv model.pt train_report.json two-processes/model.pt two-processes/train_report.json; do
  setpriv --reuid=65534 --regid=65534 --clear-groups -- cat "$OUT/$f" >/dev/null || fail "uid 65534 cannot read $f"
done
echo "$(find "$OUT" | wc -l) paths under the host folder, all root's; readable by uid 65534: all but" \
  "$(find "$OUT" -path '*/checkpoints/*' ! -perm -o=r | wc -l) files in checkpoints/ (mode 600)"

STEP="submission check"
say "check /outputs/submission.csv"
ls -la "$OUT"
[ -s "$OUT/submission.csv" ] || fail "no /outputs/submission.csv"
"$PYTHON" - "$OUT/submission.csv" "$DATA" <<'EOF' || fail "submission.csv is wrong (see above)"
import csv, os, re, sys
sub_path, data = sys.argv[1], sys.argv[2]
classes = {d for d in os.listdir(os.path.join(data, "train")) if os.path.isdir(os.path.join(data, "train", d))}
test_imgs = set()
for root, _, files in os.walk(os.path.join(data, "test")):
    test_imgs.update(f for f in files if f.lower().endswith((".jpg", ".jpeg", ".png")))
with open(os.path.join(data, "test_labels.csv"), newline="") as f:
    rows = [r for r in csv.reader(f) if r]
label_rows = [r for r in rows if not (r[0].strip().lower() in ("name", "image", "filename", "file"))]
truth = {r[0].strip(): r[1].strip() for r in label_rows}
lines = open(sub_path, newline="").read().splitlines()
pat = re.compile(r"^([^,\s][^,]*\.(?:jpe?g|png)), (\d{4})$", re.I)
errors, seen = [], {}
for n, line in enumerate(lines, 1):
    m = pat.match(line)
    if not m:
        errors.append(f"line {n} not 'name.jpg, 0001': {line!r}")
        continue
    name, label = m.groups()
    if name in seen:
        errors.append(f"line {n}: {name} repeated")
    seen[name] = label
    if label not in classes:
        errors.append(f"line {n}: label {label} is not a training class")
missing = sorted(test_imgs - set(seen))
extra = sorted(set(seen) - test_imgs)
if missing:
    errors.append(f"{len(missing)} test images without a row, e.g. {missing[:3]}")
if extra:
    errors.append(f"{len(extra)} rows for unknown images, e.g. {extra[:3]}")
if set(truth) != test_imgs:
    print(f"note: test_labels.csv names {len(truth)} images, test/ holds {len(test_imgs)}")
acc = sum(seen.get(k) == v for k, v in truth.items()) / max(1, len(truth))
print(f"submission.csv: {len(lines)} rows, {len(test_imgs)} test images, {len(classes)} classes, "
      f"first rows {lines[:2]}, accuracy vs test_labels.csv {acc:.3f} (tiny backbone: not judged)")
for e in errors[:20]:
    print("ERROR:", e)
sys.exit(1 if errors else 0)
EOF

STEP="cleanup"
for c in "${CONTAINERS[@]}"; do "${BUILDAH[@]}" rm "$c" >/dev/null; done
CONTAINERS=()
say "done in $((SECONDS - T0)) s"
echo "$ME: PASS"
