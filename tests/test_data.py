import numpy as np
import torch

from app import runtime
from app.data import EpochShuffleSampler, ImageDataset, eval_transform

PRE = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}


def test_small_dev_shm_sends_worker_batches_as_numpy(tiny, monkeypatch):
    """Docker's 64 MB /dev/shm: batches must not travel as shared-memory tensors."""
    monkeypatch.setattr(runtime, "shm_free_bytes", lambda: 64 << 20)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    ds = ImageDataset([tiny / "test" / "t00.jpg", tiny / "test" / "broken.jpg"], eval_transform(PRE), 32)
    batch = next(iter(runtime.make_loader(ds, 512, num_workers=1)))   # 6 MiB a batch x 8 processes
    assert all(isinstance(b, np.ndarray) for b in batch)
    x, idx, ok = runtime.as_tensors(batch, "cpu")
    assert x.shape == (2, 3, 32, 32) and idx.tolist() == [0, 1] and ok.tolist() == [True, False]
    assert torch.count_nonzero(x[1]) == 0          # the unreadable image is a blank input


def test_epoch_order_and_augmentation_depend_only_on_seed_epoch_index(tiny):
    s = EpochShuffleSampler(10, seed=3)
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(2)
    assert list(s) != first
    s.set_epoch(1)
    assert list(s) == first and sorted(first) == list(range(10))
    from app.data import train_transform
    ds = ImageDataset([tiny / "test" / "t00.jpg"], train_transform(PRE, (0.3, 1.0), True), 32, seed=5)
    ds.set_epoch(4)
    a = ds[0][0]
    torch.manual_seed(123)           # global RNG state must not matter
    assert torch.equal(ds[0][0], a)
    ds.set_epoch(5)
    assert not torch.equal(ds[0][0], a)


def test_prefetch_depth_keeps_queued_batches_within_half_of_dev_shm(monkeypatch):
    # 8 GPUs x 11 workers x batch 64 at 448 px (154 MB a batch) in a 16 GB /dev/shm
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    batch = 64 * 3 * 448 * 448 * 4
    depth = runtime.prefetch_depth(batch, 11, 16 << 30)
    assert depth == 0                       # not even one batch per worker fits: through a pipe
    depth = runtime.prefetch_depth(batch // 4, 11, 16 << 30)
    assert depth >= 1 and 8 * 11 * depth * batch // 4 <= (16 << 30) * runtime.SHM_SHARE
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert runtime.prefetch_depth(batch, 4, 16 << 30) == runtime.MAX_PREFETCH
    assert runtime.prefetch_depth(batch, 4, None) == runtime.MAX_PREFETCH


def test_auto_workers_use_the_cores_per_process(monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert runtime.resolve_workers("auto") == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert runtime.resolve_workers("auto") == runtime.MAX_AUTO_WORKERS
    monkeypatch.setattr(runtime, "available_cpus", lambda: 2)
    assert runtime.resolve_workers("auto") == 1
    assert runtime.resolve_workers(0) == 0 and runtime.resolve_workers(3) == 3


def test_precision_auto_keeps_each_dtypes_best_time_and_wants_bf16_clearly_faster(monkeypatch):
    """A first fp32 timing slowed by another process must not pick bf16 (several times slower on
    AVX2-only CPUs); on a CPU where bf16 is clearly faster every time, bf16 is picked."""
    def clock(durations):                 # perf_counter pairs (start, end) giving these durations
        ticks, now = [], 0.0
        for d in durations:
            ticks += [now, now + d]
            now += d + 1.0
        return iter(ticks).__next__

    # timed in turns: fp32, bf16, fp32, bf16, ... ; fp32's first timing 10x too slow
    monkeypatch.setattr(runtime.time, "perf_counter", clock([10, 3, 1, 3, 1, 3, 1, 3, 1, 3]))
    assert runtime.cpu_bf16_is_faster.__wrapped__() is False
    monkeypatch.setattr(runtime.time, "perf_counter", clock([1, 0.3] * 5))
    assert runtime.cpu_bf16_is_faster.__wrapped__() is True
    monkeypatch.setattr(runtime.time, "perf_counter", clock([1, 0.9] * 5))     # within the margin: fp32
    assert runtime.cpu_bf16_is_faster.__wrapped__() is False
