"""run_train.sh's launcher: one training process per GPU (accelerate launch), or the program itself.

    python -m app.launch train TRAIN_DIR OUT_DIR [options]     (NUM_GPUS=N to choose the count)

- GPUs are counted with nvidia-smi. When it lists GPUs that torch cannot use (a driver too old for
  torch's CUDA build, a container started without --gpus), the run stops here and says so, instead
  of training on the CPU with one process per GPU. NUM_GPUS=0 runs on the CPU on purpose.
- One process: the program is exec'd directly (no launcher in between).
- Several: accelerate's launcher, whose failure is reported as the program's own message and exit
  status (the processes have printed it), without the launcher's Python traceback after it.
- On a machine without GPUs, every core goes to the processes (accelerate launch would set
  OMP_NUM_THREADS=1: measured, half the fine-tuning speed on 2 cores).
"""
import logging
import os
import shutil
import subprocess
import sys

from .runtime import available_cpus

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


def plan_processes(environ=os.environ) -> int:
    """How many processes to start: NUM_GPUS, else one per GPU torch can use, else 1 (CPU).
    Raises SystemExit with a message when nvidia-smi sees GPUs that torch cannot use."""
    import torch
    requested = environ.get("NUM_GPUS", "").strip()
    if requested == "0":                          # the CPU, on purpose
        return 1
    seen, driver = gpus_seen()
    if seen and not torch.cuda.is_available():
        hint = CUDA_DRIVER_HINT.format(torch=torch.__version__, cuda=torch.version.cuda)
        raise SystemExit(f"error: nvidia-smi lists {seen} GPU(s) (driver {driver or 'unknown'}) but torch "
                         f"cannot use CUDA: {hint}. Not training on the CPU instead; to do that on "
                         "purpose, set NUM_GPUS=0.")
    usable = torch.cuda.device_count() if seen else 0
    if requested:
        if not requested.isdigit():
            raise SystemExit(f"error: NUM_GPUS={requested!r}: expected a number")
        if usable and int(requested) > usable:
            raise SystemExit(f"error: NUM_GPUS={requested} but torch sees {usable} GPU(s)")
        return int(requested)
    return max(1, usable)


def main(argv: list[str]) -> int:
    num = plan_processes()
    if num == 1:
        os.execv(sys.executable, [sys.executable, "-m", "app", *argv])
    import torch
    from accelerate.commands.launch import launch_command, launch_command_parser
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
