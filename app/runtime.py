"""Devices, processes and mixed precision, through accelerate; and the one batched-pass helper
that the feature stage and inference share."""
import contextlib
import datetime
import functools
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from tqdm import tqdm

from .data import normalize

log = logging.getLogger("app")


BF16_MARGIN = 0.8      # bf16 only where it is clearly faster: AMX / AVX512-BF16 CPUs are several times faster


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_faster(trials: int = 5, clearly_slower: float = 8.0) -> bool:
    """Measured, not assumed: CPUs with AVX512-BF16/AMX run bf16 matmuls several times faster than
    fp32, AVX2-only CPUs emulate bf16 some 30 times slower. First one product of each, twice: where
    bf16's best is still `clearly_slower` times fp32's the answer is plain (about 0.3 s on the 2-core
    AVX2 machine, where the full timing took 5 s). Else 8 products of each are timed in turns,
    `trials` times, and each keeps its best time: a single timing, taken while another process held
    the cores, picked bf16 for two proxy bench runs on that machine, where it is the slower one."""
    a = torch.randn(256, 512)
    b = torch.randn(512, 512)
    pairs = {dtype: (a.to(dtype), b.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    for x, y in pairs.values():
        x @ y                                     # the kernel's first call, not timed

    def best_times(turns: int, products: int) -> dict:
        best = dict.fromkeys(pairs, float("inf"))
        for _ in range(turns):
            for dtype, (x, y) in pairs.items():
                t0 = time.perf_counter()
                for _ in range(products):
                    x @ y
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
        return best

    quick = best_times(2, 1)
    if quick[torch.bfloat16] > clearly_slower * quick[torch.float32]:
        return False
    best = best_times(trials, 8)
    return best[torch.bfloat16] < BF16_MARGIN * best[torch.float32]


def resolve_precision(precision: str) -> str:
    """auto: bf16 on GPUs that run it natively (compute capability 8.0+: A100, H100, L4...), else fp16,
    which accelerate trains with a grad scaler; on CPU bf16 autocast where it measures faster.
    torch.cuda.is_bf16_supported() counts emulated bf16 by default (V100, T4: several times slower
    than fp16), hence including_emulation=False."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if cpu_bf16_is_faster() else "no"


# The gloo group the other processes wait on while the main process runs a stage alone: a gloo
# receive sleeps on a condition variable, where a NCCL collective keeps a core (and the GPU) spinning,
# and its timeout is its own, not the training collectives'.
_WAIT_GROUP = None


def make_accelerator(cfg: dict) -> Accelerator:
    # cpu=True without CUDA: several processes on a CPU-only machine then join with gloo (MULTI_CPU).
    # The process group carries the training collectives, with a short timeout
    # (process_group_timeout_min) so that a wedged process fails the run. The stages the main process
    # runs alone (hashing, the noise stage) are waited for on a second, gloo group with its own long
    # timeout (main_process_wait_min): see on_main_process.
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=cfg["process_group_timeout_min"]))
    acc = Accelerator(mixed_precision=resolve_precision(cfg["precision"]), cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[timeout])
    global _WAIT_GROUP
    _WAIT_GROUP = None
    if acc.num_processes > 1:
        import torch.distributed as dist
        _WAIT_GROUP = dist.new_group(backend="gloo",
                                     timeout=datetime.timedelta(minutes=cfg["main_process_wait_min"]))
    set_seed(cfg["seed"])
    return acc


class OtherProcessFailed(RuntimeError):
    """Raised on the processes that waited for a stage that failed on the main process: the main
    process reports the error; the others stop quietly."""


def on_main_process(accelerator: Accelerator, stage) -> None:
    """Run `stage()` on the main process while the others wait (its results travel through files).
    An error there stops every process: the main one raises it, the others OtherProcessFailed,
    instead of waiting until the main process' exit breaks the wait with a traceback.
    The others wait in a gloo broadcast on their own group (_WAIT_GROUP): asleep, not spinning, for
    up to main_process_wait_min, however short the training collectives' timeout."""
    error = None
    if accelerator.is_main_process:
        try:
            stage()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others are told
            error = e
    failed = torch.tensor([error is not None], dtype=torch.uint8)
    if accelerator.num_processes > 1:
        import torch.distributed as dist
        dist.broadcast(failed, src=0, group=_WAIT_GROUP)
    if error is not None:
        raise error
    if failed.item():
        raise OtherProcessFailed("the main process failed")


def close_process_group() -> None:
    """Shut the process groups down before exit: left to the interpreter's teardown, their threads can
    abort the process ("terminate called without an active exception") after the product's message."""
    global _WAIT_GROUP
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()                 # every group, the waiting group included
    _WAIT_GROUP = None


def process_group_timeout_s(accelerator: Accelerator) -> dict | None:
    """The timeouts the process groups really run with, in seconds (None with one process), for the
    report: the training collectives', and the wait for the stages the main process runs alone."""
    if accelerator.num_processes == 1:
        return None
    import torch.distributed as dist

    def timeout(group, device):
        return group._get_backend(device).options._timeout.total_seconds()
    return {"collectives": timeout(dist.group.WORLD, accelerator.device),
            "main_process_wait": timeout(_WAIT_GROUP, torch.device("cpu"))}


def available_cpus() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 quota (containers
    started with --cpus see every host core in the mask but get only the quota)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def local_processes() -> int:
    """Processes sharing this machine (accelerate launch / torchrun set LOCAL_WORLD_SIZE)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


# `num_workers: auto` never starts more decoding workers than this per process: past ~12 workers
# one process' loader is limited by collation and the GPU, not by decoding.
MAX_AUTO_WORKERS = 12


def resolve_workers(num_workers) -> int:
    """Decoding workers per process. auto: the cores available per process, minus one for the
    process itself, capped at MAX_AUTO_WORKERS."""
    if num_workers != "auto":
        return int(num_workers)
    return max(0, min(MAX_AUTO_WORKERS, available_cpus() // local_processes() - 1))


@contextlib.contextmanager
def all_cores():
    """Give a CPU-bound single-process stage (noise stage, on the main process) every core:
    `accelerate launch` sets OMP_NUM_THREADS=1 for its processes, right for the GPU stages only."""
    before = torch.get_num_threads()
    torch.set_num_threads(available_cpus())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shm_free_bytes() -> int | None:
    """Free space of /dev/shm, where worker batches travel as shared tensors (None: no /dev/shm)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


# Worker batches waiting in /dev/shm may fill at most this share of it (the other processes on the
# machine, pinned-memory copies and the next epoch's workers need the rest).
SHM_SHARE = 0.5
MAX_PREFETCH = 4


def prefetch_depth(batch_bytes: int, num_workers: int, shm_free: int | None) -> int:
    """Batches each worker may prepare ahead so that every process' queued batches fit in
    SHM_SHARE of /dev/shm: 1..MAX_PREFETCH, or 0 when even one batch per worker does not fit
    (Docker's default 64 MB /dev/shm): the batches then travel through a pipe instead."""
    if shm_free is None:
        return MAX_PREFETCH
    in_flight = local_processes() * num_workers * batch_bytes
    return min(MAX_PREFETCH, int(SHM_SHARE * shm_free // max(1, in_flight)))


def numpy_collate(batch):
    """Collate to numpy: batches travel from the workers through a pipe instead of /dev/shm."""
    return tuple(np.stack([np.asarray(sample[i]) for sample in batch]) for i in range(len(batch[0])))


def collate_images(samples, stats: torch.Tensor, through_pipe: bool):
    """(uint8 crops, indices, decoded-ok flags, the dataset's (2, 3) mean/std): the batch carries
    what `as_tensors` normalises it with (24 bytes, pickled inline). The crops are numpy arrays when
    they go through a pipe, else tensors in shared memory."""
    batch = numpy_collate(samples) if through_pipe else torch.utils.data.default_collate(samples)
    return (*batch, stats.numpy())


def as_tensors(batch, device):
    """A loader batch (collate_images: tensors, or numpy through a pipe) on `device`, as the model
    takes it: (float images normalised there, indices, decoded-ok flags)."""
    images, idx, ok, stats = (torch.as_tensor(b).to(device, non_blocking=True) for b in batch)
    return normalize(images, stats, ok), idx, ok


def make_loader(dataset, batch_size: int, num_workers, sampler=None, drop_last=False):
    """DataLoader over an ImageDataset: `num_workers` decoding processes (or `auto`), each a few
    batches of uint8 crops ahead as far as /dev/shm allows; as_tensors reads its batches."""
    num_workers = resolve_workers(num_workers)
    batch_bytes = batch_size * 3 * dataset.image_size ** 2                # uint8 CHW crops
    depth = prefetch_depth(batch_bytes, num_workers, shm_free_bytes()) if num_workers else None
    collate = functools.partial(collate_images, stats=dataset.stats, through_pipe=depth == 0)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), collate_fn=collate,
        persistent_workers=False, prefetch_factor=max(1, depth) if num_workers else None)


@torch.inference_mode()
def batched_pass(fn, dataset, accelerator: Accelerator, batch_size: int, num_workers, desc: str,
                 autocast: bool = True):
    """Run fn(images) over an ImageDataset on every process (data parallel), gather to all, under
    the accelerator's mixed precision (`autocast`) or in fp32. Returns (outputs as float32 numpy in
    dataset order, decoded-ok mask)."""
    loader = accelerator.prepare_data_loader(make_loader(dataset, batch_size, num_workers))
    out, ok = None, np.zeros(len(dataset), dtype=bool)
    bar = tqdm(loader, desc=desc, unit="batch", disable=not accelerator.is_main_process, mininterval=2)
    for batch in bar:
        x, idx, good = as_tensors(batch, accelerator.device)
        with accelerator.autocast() if autocast else contextlib.nullcontext():
            y = fn(x).float()
        y, idx, good = accelerator.gather_for_metrics((y, idx, good))
        if out is None:
            out = np.zeros((len(dataset), y.shape[1]), dtype=np.float32)
        idx = idx.cpu().numpy()
        out[idx] = y.cpu().numpy()
        ok[idx] = good.cpu().numpy()
    if out is None:
        out = np.zeros((0, 0), dtype=np.float32)
    return out, ok
