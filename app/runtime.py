"""Devices, processes and mixed precision, through accelerate; and the one batched-pass helper
that the feature stage and inference share."""
import functools
import logging
import os
import time

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

log = logging.getLogger("app")


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_faster() -> bool:
    """Measured, not assumed: CPUs with AVX512-BF16/AMX run bf16 matmuls several times faster than
    fp32, AVX2-only CPUs several times slower. Time both once (~0.1 s) and pick."""
    a = torch.randn(256, 512)
    b = torch.randn(512, 512)
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        t0 = time.perf_counter()
        for _ in range(8):
            x @ y
        rates[dtype] = time.perf_counter() - t0
    return rates[torch.bfloat16] < rates[torch.float32]


def resolve_precision(precision: str) -> str:
    """auto: bf16 on GPUs that have it, else fp16; on CPU bf16 autocast where it measures faster."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16_is_faster() else "no"


def make_accelerator(cfg: dict) -> Accelerator:
    # cpu=True without CUDA: several processes on a CPU-only machine then join with gloo (MULTI_CPU)
    acc = Accelerator(mixed_precision=resolve_precision(cfg["precision"]), cpu=not torch.cuda.is_available())
    set_seed(cfg["seed"])
    return acc


@functools.lru_cache(maxsize=1)
def shm_is_small(limit_bytes: int = 1 << 30) -> bool:
    """Docker's default /dev/shm is 64 MB: too small for worker batches passed as shared tensors."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < limit_bytes


def numpy_collate(batch):
    """Collate to numpy: batches travel from the workers through a pipe instead of /dev/shm."""
    return tuple(np.stack([np.asarray(sample[i]) for sample in batch]) for i in range(len(batch[0])))


def as_tensors(batch, device):
    """A loader batch (tensors, or numpy from numpy_collate) on `device`."""
    return tuple(torch.as_tensor(b).to(device, non_blocking=True) for b in batch)


def make_loader(dataset, batch_size: int, num_workers: int, sampler=None, drop_last=False):
    collate = numpy_collate if num_workers and shm_is_small() else None
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), collate_fn=collate,
        persistent_workers=False, prefetch_factor=4 if num_workers else None)


@torch.inference_mode()
def batched_pass(fn, dataset, accelerator: Accelerator, batch_size: int, num_workers: int, desc: str):
    """Run fn(images) over an ImageDataset on every process (data parallel), gather to all.
    Returns (outputs as float32 numpy in dataset order, decoded-ok mask)."""
    loader = accelerator.prepare_data_loader(make_loader(dataset, batch_size, num_workers))
    out, ok = None, np.zeros(len(dataset), dtype=bool)
    bar = tqdm(loader, desc=desc, unit="batch", disable=not accelerator.is_main_process, mininterval=2)
    for batch in bar:
        x, idx, good = as_tensors(batch, accelerator.device)
        with accelerator.autocast():
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
