import numpy as np
import torch
from open_clip.transform import image_transform
from torchvision import transforms as T

from app import runtime
from app.data import EpochShuffleSampler, ImageDataset, eval_transform, normalize, train_transform

PRE = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
CLIP_PRE = {"image_size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711]}


def test_small_dev_shm_sends_uint8_worker_batches_as_numpy(tiny, monkeypatch):
    """Docker's 64 MB /dev/shm: batches must not travel as shared-memory tensors; they are uint8
    crops, made the model's float input by as_tensors."""
    monkeypatch.setattr(runtime, "shm_free_bytes", lambda: 64 << 20)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    ds = ImageDataset([tiny / "test" / "t00.jpg", tiny / "test" / "broken.jpg"], eval_transform(PRE), 32)
    batch = next(iter(runtime.make_loader(ds, 2048, num_workers=1)))   # 6 MiB of uint8 a batch x 8 processes
    assert all(isinstance(b, np.ndarray) for b in batch) and batch[0].dtype == np.uint8
    x, idx, ok = runtime.as_tensors(batch, "cpu")
    assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32)
    assert idx.tolist() == [0, 1] and ok.tolist() == [True, False]
    assert torch.count_nonzero(x[1]) == 0          # the unreadable image is a blank input
    assert torch.equal(x[0], (torch.from_numpy(batch[0][0]).float() / 255 - 0.5) / 0.5)


def test_prefetch_depth_counts_uint8_bytes(tiny, monkeypatch):
    """A batch whose uint8 crops fit in half of /dev/shm goes through shared memory, although its
    float32 form (4x the bytes) would not fit."""
    monkeypatch.setattr(runtime, "shm_free_bytes", lambda: 64 << 20)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    seen = []
    depth = runtime.prefetch_depth
    monkeypatch.setattr(runtime, "prefetch_depth", lambda *a: seen.append(a) or depth(*a))
    ds = ImageDataset([tiny / "test" / "t00.jpg"], eval_transform(PRE), 32)
    batch = next(iter(runtime.make_loader(ds, 1024, num_workers=1)))   # 3 MiB uint8, 12 MiB float32
    assert seen[0][0] == 1024 * 3 * 32 * 32
    assert depth(4 * seen[0][0], 1, 64 << 20) == 0 and depth(*seen[0]) == 1
    assert isinstance(batch[0], torch.Tensor) and batch[0].dtype == torch.uint8


def test_uint8_path_equals_the_float_path(tiny):
    """Crops made uint8 in the workers and normalised on the device are the float pipeline's input
    exactly: open_clip's eval transform, and the train augmentation with its random draws."""
    paths = sorted((tiny / "train" / "0000").iterdir())[:4] + [tiny / "train" / "0001" / "truncated.jpg"]
    clip = image_transform(32, is_train=False, mean=tuple(CLIP_PRE["mean"]), std=tuple(CLIP_PRE["std"]),
                           interpolation="bicubic", resize_mode="shortest")
    ds = ImageDataset(paths, eval_transform(CLIP_PRE), 32)
    from app.data import load_image
    reference = torch.stack([clip(load_image(p, min_side=32)) for p in paths])
    crops = torch.stack([ds[i][0] for i in range(len(paths))])
    assert crops.dtype == torch.uint8
    assert torch.equal(normalize(crops, ds.stats), reference)

    augmented = ImageDataset(paths, train_transform(CLIP_PRE, (0.3, 1.0), True), 32, seed=7)
    float_train = T.Compose([T.RandomResizedCrop(32, scale=(0.3, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                             T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_PRE["mean"], CLIP_PRE["std"])])
    old = ImageDataset(paths, augmented.transform, 32, seed=7)
    old.transform = float_train                     # the same seeded draws, the float pipeline
    for i in range(len(paths)):
        assert torch.equal(normalize(augmented[i][0][None], augmented.stats)[0], old[i][0])


def test_batched_pass_gets_the_float_pipelines_input_through_shm_and_pipe(tiny, monkeypatch):
    """The frozen pass, validation and inference (runtime.batched_pass) see exactly what open_clip's
    float preprocessing gives, whichever way the uint8 batches travel; unreadable files blank."""
    from accelerate import Accelerator
    from app.data import load_image
    paths = sorted((tiny / "test").iterdir())             # broken.jpg among them
    clip = image_transform(32, is_train=False, mean=tuple(CLIP_PRE["mean"]), std=tuple(CLIP_PRE["std"]),
                           interpolation="bicubic", resize_mode="shortest")
    expected = torch.stack([clip(load_image(p, min_side=32)) if p.name != "broken.jpg" else torch.zeros(3, 32, 32)
                            for p in paths]).flatten(1).numpy()
    acc = Accelerator(cpu=True)
    for shm, processes, batch in ((64 << 20, "8", 4096), (16 << 30, "1", 4)):    # pipe, then /dev/shm
        monkeypatch.setattr(runtime, "shm_free_bytes", lambda shm=shm: shm)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
        ds = ImageDataset(paths, eval_transform(CLIP_PRE), 32)
        out, ok = runtime.batched_pass(lambda x: x.flatten(1), ds, acc, batch, 1, "test", autocast=False)
        assert ok.tolist() == [p.name != "broken.jpg" for p in paths]
        assert np.array_equal(out, expected)


def test_epoch_order_and_augmentation_depend_only_on_seed_epoch_index(tiny):
    s = EpochShuffleSampler(10, seed=3)
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(2)
    assert list(s) != first
    s.set_epoch(1)
    assert list(s) == first and sorted(first) == list(range(10))
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

    monkeypatch.setattr(runtime.torch, "randn", lambda *shape: torch.ones(2, 2))    # the clock decides: small products
    # two quick turns (one product each), then five turns of 8, each timed in turns: fp32, bf16, ...
    quick = [1, 3, 1, 3]                          # bf16 3x slower on one product: not plain, timed on
    # fp32's first full timing 10x too slow
    monkeypatch.setattr(runtime.time, "perf_counter", clock(quick + [10, 3, 1, 3, 1, 3, 1, 3, 1, 3]))
    assert runtime.cpu_bf16_is_faster.__wrapped__() is False
    monkeypatch.setattr(runtime.time, "perf_counter", clock(quick + [1, 0.3] * 5))
    assert runtime.cpu_bf16_is_faster.__wrapped__() is True
    monkeypatch.setattr(runtime.time, "perf_counter", clock(quick + [1, 0.9] * 5))     # within the margin: fp32
    assert runtime.cpu_bf16_is_faster.__wrapped__() is False
    # emulated bf16 (AVX2), 30x slower in both quick turns: nothing more is timed (the clock would run out)
    monkeypatch.setattr(runtime.time, "perf_counter", clock([1, 30, 1, 30]))
    assert runtime.cpu_bf16_is_faster.__wrapped__() is False
    # the quick turns keep their best: 7x once is not plainly slower, whichever turn it came in
    for first, second in ((30, 7), (7, 30)):
        monkeypatch.setattr(runtime.time, "perf_counter", clock([1, first, 1, second] + [1, 0.5] * 5))
        assert runtime.cpu_bf16_is_faster.__wrapped__() is True
