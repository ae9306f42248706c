"""run_train.sh's and run_infer.sh's launcher: one training process per GPU (accelerate launch), or
the program itself.

    python -m app.launch train TRAIN_DIR OUT_DIR [options]     (NUM_GPUS=N to choose the count)
    python -m app.launch infer TEST_DIR OUT_DIR [options]      (one process)

- GPUs are counted with nvidia-smi. When it lists GPUs that torch cannot use (a driver too old for
  torch's CUDA build, a container started without --gpus), the run stops here and says so, instead
  of running for hours on the CPU (training: with one process per GPU). NUM_GPUS=0 runs on the CPU
  on purpose.
- One process: the program is exec'd directly (no launcher in between).
- Several: accelerate's launcher, whose failure is reported as the program's own message and exit
  status (the processes have printed it), without the launcher's Python traceback after it.
- Several GPUs with a small /dev/shm (Docker's default is 64 MB), which would stop NCCL at its first
  collective ("Error while creating shared memory segment"): GPUs linked directly (NVLink, PCIe
  peer-to-peer) keep every process with NCCL's shared-memory transport off (NCCL_SHM_DISABLE=1); other
  GPUs train on one. One line says so, and what to give the container.
- On a machine without GPUs, every core goes to the processes (accelerate launch would set
  OMP_NUM_THREADS=1: measured, half the fine-tuning speed on 2 cores).
"""
import logging
import os
import re
import shutil
import subprocess
import sys

from .runtime import available_cpus, shm_free_bytes

# torch 2.10's CUDA 12.8 build runs on drivers >= 525.60.13 (CUDA minor-version compatibility).
CUDA_DRIVER_HINT = ("torch {torch} is a CUDA {cuda} build; it needs NVIDIA driver >= 525.60.13 (see "
                    "docker/README.md), and a container needs `docker run --gpus all`")


def gpus_seen() -> tuple[int, str]:
    """(GPUs nvidia-smi lists, its driver version or ''); (0, '') without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return 0, ""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return 0, ""
    return sum(line.startswith("GPU ") for line in listed.splitlines()), (driver[0] if driver else "")


def usable_gpus(environ=os.environ) -> int:
    """GPUs torch can use (0 with NUM_GPUS=0: the CPU, on purpose). Raises SystemExit with a message
    when nvidia-smi sees GPUs that torch cannot use."""
    if environ.get("NUM_GPUS", "").strip() == "0":
        return 0
    import torch
    seen, driver = gpus_seen()
    if seen and not torch.cuda.is_available():
        hint = CUDA_DRIVER_HINT.format(torch=torch.__version__, cuda=torch.version.cuda)
        raise SystemExit(f"error: nvidia-smi lists {seen} GPU(s) (driver {driver or 'unknown'}) but torch "
                         f"cannot use CUDA: {hint}. Not running on the CPU instead; to do that on "
                         "purpose, set NUM_GPUS=0.")
    return torch.cuda.device_count() if seen else 0


def plan_processes(environ=os.environ) -> int:
    """How many processes to start: NUM_GPUS, else one per GPU torch can use, else 1 (CPU).
    Raises SystemExit with a message when nvidia-smi sees GPUs that torch cannot use."""
    requested = environ.get("NUM_GPUS", "").strip()
    usable = usable_gpus(environ)
    if requested == "0":                          # the CPU, on purpose
        return 1
    if requested:
        if not requested.isdigit():
            raise SystemExit(f"error: NUM_GPUS={requested!r}: expected a number")
        if usable and int(requested) > usable:
            raise SystemExit(f"error: NUM_GPUS={requested} but torch sees {usable} GPU(s)")
        return int(requested)
    return max(1, usable)


# NCCL's user guide ("Troubleshooting: Shared memory", Docker) asks for --shm-size=1g: below that,
# its shared-memory transport's segments (about 4-10 MB per peer and channel) can fail to fit.
NCCL_SHM_MIN_BYTES = 1 << 30
# NCCL sends between two GPUs directly (its P2P transport, no /dev/shm) over NVLink, or over PCIe within
# a switch (its default NCCL_P2P_LEVEL, PXB: `nvidia-smi topo -m` PIX or PXB) where peer access works.
P2P_LINKS = ("PIX", "PXB")


def _nvidia_smi_matrix(args: list[str], count: int) -> list[list[str]] | None:
    """The first `count` x `count` cells of an `nvidia-smi topo` GPU matrix, or None."""
    try:
        text = subprocess.run(["nvidia-smi", "topo", *args], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = {}
    for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines():
        cells = line.split()
        gpu = int(cells[0][3:]) if cells and re.fullmatch(r"GPU\d+", cells[0]) else count
        if gpu < count and len(cells) > count and cells[1 + gpu] == "X":      # a row, not the header
            rows[gpu] = cells[1:1 + count]
    return [rows[i] for i in range(count)] if all(i in rows for i in range(count)) else None


def gpus_peer_to_peer(count: int) -> bool | None:
    """Whether NCCL can send between every pair of the first `count` GPUs directly: NVLink (NV#), or a
    PCIe path within a switch (P2P_LINKS) with peer reads possible (`nvidia-smi topo -p2p r`: OK).
    None when nvidia-smi cannot tell."""
    links, peer = _nvidia_smi_matrix(["-m"], count), _nvidia_smi_matrix(["-p2p", "r"], count)
    if links is None or peer is None:
        return None
    return all((links[i][j].startswith("NV") or links[i][j] in P2P_LINKS) and peer[i][j] == "OK"
               for i in range(count) for j in range(count) if i != j)


def small_shm_plan(processes: int, cuda: bool, shm_free: int | None, peer_to_peer,
                   environ=os.environ) -> tuple[int, str | None]:
    """(processes to start, the one line to log or None) for several GPUs and a /dev/shm under
    NCCL_SHM_MIN_BYTES (Docker's default is 64 MB), which stops NCCL at its first collective ("Error
    while creating shared memory segment"). GPUs that reach each other directly (peer_to_peer(): True)
    keep every process, with NCCL's shared-memory transport off (NCCL_SHM_DISABLE=1 set in `environ`).
    Others would fall back to NCCL's network transport, whose proxy maps an operation pool of tens of
    MB per process in /dev/shm (ncclProxyOpsPool, NCCL 2.27 src/proxy.cc): training runs on one GPU.
    A NCCL_SHM_DISABLE already set is the user's choice: nothing changes."""
    if processes < 2 or not cuda or shm_free is None or shm_free >= NCCL_SHM_MIN_BYTES:
        return processes, None
    if "NCCL_SHM_DISABLE" in environ:
        return processes, None
    small = f"warning: /dev/shm has {shm_free / 2**20:.0f} MB free (Docker's default is 64 MB)"
    advice = "Give the container --shm-size=16g (or --ipc=host)."
    if peer_to_peer():
        environ["NCCL_SHM_DISABLE"] = "1"
        return processes, (f"{small}: NCCL's shared-memory transport is off (NCCL_SHM_DISABLE=1); the "
                           f"{processes} GPUs exchange gradients directly (NVLink/PCIe peer-to-peer). {advice}")
    return 1, (f"{small}, too little for NCCL between GPUs without direct peer-to-peer access: training "
               f"runs on 1 GPU instead of {processes}, about {processes} times slower (the same model). "
               f"{advice}")


def settings_mistake(argv: list[str]) -> str | None:
    """The one line of a settings mistake in a train / infer command line, before any process starts
    (each of N processes would otherwise say it, after starting); None when the settings are fine."""
    from .__main__ import parser
    from .config import ConfigError, from_args
    try:
        from_args(parser().parse_args(argv))
    except ConfigError as e:
        return f"error: {e}"
    return None


def main(argv: list[str]) -> int:
    mistake = settings_mistake(argv)
    if mistake:
        print(mistake, file=sys.stderr)
        return 1
    if os.environ.get("NUM_GPUS", "").strip() == "0":     # the CPU on purpose: torch must not see the GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if argv[:1] != ["train"]:                     # inference (and the rest) run in one process
        usable_gpus()
        os.execv(sys.executable, [sys.executable, "-m", "app", *argv])
    import torch
    planned = plan_processes()
    num, shm_line = small_shm_plan(planned, torch.cuda.is_available(), shm_free_bytes(),
                                   lambda: gpus_peer_to_peer(planned))
    if shm_line:
        print(shm_line, file=sys.stderr, flush=True)
    if num == 1:
        os.execv(sys.executable, [sys.executable, "-m", "app", *argv])
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    launch = ["--multi_gpu", "--num_processes", str(num), "--num_machines", "1",
              "--dynamo_backend", "no", "--mixed_precision", "no"]
    if not torch.cuda.is_available():             # several CPU processes (tests): share the cores
        launch += ["--num_cpu_threads_per_process", str(max(1, available_cpus() // num))]
    args = launch_command_parser().parse_args([*launch, "-m", "app", *argv])
    # the launcher's own failure log ("failed (exitcode: 1) local_rank: 0 ...") would follow, and
    # hide, the program's message
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except ChildFailedError as e:                 # the processes printed why; exit with their status
        return max((f.exitcode for f in e.failures.values() if f.exitcode and f.exitcode > 0), default=1)
    except subprocess.CalledProcessError as e:
        return e.returncode or 1
    except SignalException as e:                  # Ctrl-C / docker stop: the main process said what to run
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
