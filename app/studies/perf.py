"""Throughput benchmark, `python -m app perf`: images per second of the product's three hot paths,
each against a naive reference measured in the same run (same images, batch size, torch threads).

  a  frozen feature pass  product: ImageDataset + eval_transform + make_loader (config num_workers)
                          through runtime.batched_pass, inference_mode, resolve_precision('auto')
                          naive: Image.open().convert('RGB') + torchvision Resize/CenterCrop/ToTensor/
                          Normalize, num_workers=0, fp32 visual under no_grad
  b  fine-tuning step     product: LoRA (config lora section) + 1000-class head, weighted GCE + delta
                          penalty, AdamW on LoRA + head, grad clip, train_transform loader
                          naive: fp32 FULL fine-tuning (every weight, plain CE, AdamW on everything)
  c  inference end to end product: infer.infer() from JPEG files to submission.csv (model file load
                          included); naive: load the model file, naive data path, fp32, argmax, rows
  model_only              the product's forward / LoRA step on random tensors (no decoding, same
                          precision and batch size): the ceiling its data pipeline should reach
  d  memory at scale      scan table + feature cache of 300k images (synthetic, 1,500 classes):
                          peak RSS of fresh child processes running features.extract_features, once
                          writing the cache (the frozen pass replaced by random features) and once
                          with every hash cached

`--data-path` measures only the training data path instead: images/s that the loader delivers into
the training process as the model's float input (`data_path`).

Reading the ratios: a_vs_naive, b_vs_naive_full_ft, c_vs_naive > 1 mean the product beats the naive
script. a_vs_model_only near 1 means decoding keeps up with the model; well below 1 means the data
pipeline is the bottleneck. Train rates are taken after WARM_STEPS untimed steps; on a GPU use many
more --train-steps than num_workers * 4 (the loader's prefetch) or the data cost is hidden.
"""
import argparse
import hashlib
import multiprocessing as mp
import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch import nn
from torchvision import transforms as T
from tqdm import tqdm

from .. import code_version
from ..backbone import VIT_B_32, Backbone, arch_name, build_visual
from ..config import load_config
from ..data import EpochShuffleSampler, ImageDataset, eval_transform, normalize, train_transform
from ..finetune import make_trainable, train_step
from ..infer import infer
from ..model import Classifier, load_model_file, log_class_prior, save_model_file
from ..report import cpu_name, peak_rss_gib, write_json
from .. import runtime
from ..runtime import as_tensors, batched_pass, make_accelerator, make_loader, resolve_precision

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# ViT-B-32 is open_clip.create_model('ViT-B-32').visual's architecture; tiny is for tests.
ARCHS = {"ViT-B-32": VIT_B_32, "tiny": dict(image_size=32, patch_size=8, width=64, layers=2, heads=2,
                                             mlp_ratio=4.0, output_dim=32, act="gelu")}
DEFAULT_DATA = "/work/shared/data/flowers102-noisy/train"
NUM_CLASSES, WARM_STEPS, MODEL_ONLY_BATCHES = 1000, 2, 8
BICUBIC = T.InterpolationMode.BICUBIC


@dataclass
class Bench:
    cfg: dict
    acc: object              # accelerate.Accelerator, made like the product makes it
    backbone: Backbone       # random weights
    paths: list              # N image files (cycled)
    batch_size: int
    train_steps: int

    @property
    def size(self) -> int:              # the model's input size: every data path resizes to it
        return self.backbone.config["image_size"]


def seconds(fn):
    """(wall seconds, result) of fn(), queued GPU work included."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def loop_rate(step, batches, desc: str, warm: int = 0) -> float:
    """images/s of step(batch) -> n_images over a finite iterable, its first `warm` batches untimed."""
    it = iter(batches)
    for _ in range(warm):
        step(next(it))
    total = len(batches) - warm if hasattr(batches, "__len__") else None
    sec, n = seconds(lambda: sum(step(b) for b in tqdm(it, desc=desc, total=total, unit="batch", mininterval=2)))
    return n / sec


def random_batches(b: Bench, count: int):
    """Loader batches (as make_loader gives them: uint8 crops, index, ok, mean/std) of random pixels,
    already on the device."""
    x = torch.randint(0, 256, (b.batch_size, 3, b.size, b.size), dtype=torch.uint8, device=b.acc.device)
    idx = torch.arange(b.batch_size, device=b.acc.device)
    stats = np.array([b.backbone.preprocess["mean"], b.backbone.preprocess["std"]], np.float32)
    return [(x, idx, torch.ones_like(idx, dtype=torch.bool), stats)] * count


def model_only_rate(fn, b: Bench, desc: str) -> float:
    """Forward-only rate of fn on random tensors at the product's precision (the data-free ceiling)."""
    def step(batch):
        x = as_tensors(batch, b.acc.device)[0]
        with torch.inference_mode(), b.acc.autocast():
            fn(x)
        return len(x)
    return loop_rate(step, random_batches(b, 1 + MODEL_ONLY_BATCHES), desc, warm=1)


class NaiveDataset(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = [str(p) for p in paths], transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(Image.open(self.paths[i]).convert("RGB")), i


def naive_loader(b: Bench, paths, train: bool):
    """Full-size PIL decode + plain torchvision transforms, in the main process, fp32."""
    pre = b.backbone.preprocess
    head = ([T.RandomResizedCrop(b.size, interpolation=BICUBIC), T.RandomHorizontalFlip()] if train
            else [T.Resize(b.size, interpolation=BICUBIC), T.CenterCrop(b.size)])
    transform = T.Compose([*head, T.ToTensor(), T.Normalize(pre["mean"], pre["std"])])
    return torch.utils.data.DataLoader(NaiveDataset(paths, transform), batch_size=b.batch_size,
                                       shuffle=train, drop_last=train, num_workers=0)


def measure_features(b: Bench) -> dict:
    """(a) the frozen feature pass: batched_pass over ImageDataset vs naive loop vs random tensors."""
    visual = b.backbone.visual.to(b.acc.device).eval()
    fn = lambda x: F.normalize(visual(x), dim=-1)  # noqa: E731 - what features.py runs
    model_only = model_only_rate(fn, b, "a: model only")
    dataset = ImageDataset(b.paths, eval_transform(b.backbone.preprocess), b.size)
    sec, _ = seconds(lambda: batched_pass(fn, dataset, b.acc, b.batch_size, b.cfg["num_workers"], "a: product"))

    def naive_step(batch):
        with torch.no_grad():
            visual(batch[0].to(b.acc.device))
        return len(batch[0])
    naive = loop_rate(naive_step, naive_loader(b, b.paths, train=False), "a: naive")
    return {"naive": naive, "product": len(b.paths) / sec, "model_only": model_only}


def measure_precisions(b: Bench) -> dict:
    """Model-only forward rate in fp32 and under bf16 autocast on this device: why `precision: auto`
    chose what it chose (bf16 is several times faster on GPUs and AMX/AVX512-BF16 CPUs, slower on AVX2)."""
    visual, dev = b.backbone.visual.to(b.acc.device).eval(), b.acc.device
    rates = {}
    for name, dtype in (("fp32", None), ("bf16_autocast", torch.bfloat16)):
        def step(batch):
            x = as_tensors(batch, dev)[0]
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                visual(x)
            return len(x)
        rates[name] = loop_rate(step, random_batches(b, 2), f"precision: {name}", warm=1)
    return rates


def measure_finetune(b: Bench) -> dict:
    """(b) one training step: the product's LoRA step (data / random tensors) vs naive full FT."""
    fcfg, dev = b.cfg["finetune"], b.acc.device
    n = (WARM_STEPS + b.train_steps) * b.batch_size      # the loaders run out exactly after the steps
    paths = [b.paths[i % len(b.paths)] for i in range(n)]
    labels = torch.randint(0, NUM_CLASSES, (n,), device=dev)
    weights = torch.ones(n, device=dev)                    # the noise stage's sample weights

    model = Classifier(build_visual(b.backbone.config), NUM_CLASSES, torch.zeros(NUM_CLASSES))
    adapters, optimizer = make_trainable(model, b.cfg)
    dataset = ImageDataset(paths, train_transform(b.backbone.preprocess, fcfg["crop_scale"], fcfg["hflip"]),
                           b.size, seed=b.cfg["seed"])
    loader = make_loader(dataset, b.batch_size, b.cfg["num_workers"],
                         sampler=EpochShuffleSampler(n, b.cfg["seed"]), drop_last=True)
    model, optimizer, loader = b.acc.prepare(model, optimizer, loader)
    model.train()

    def lora_step(batch):                                  # the product's own training step
        train_step(model, adapters, optimizer, [batch], labels, weights, fcfg, b.acc)
        return len(batch[0])
    product = loop_rate(lora_step, loader, "b: product LoRA step", warm=WARM_STEPS)
    model_only = loop_rate(lora_step, random_batches(b, WARM_STEPS + b.train_steps), "b: model only",
                           warm=WARM_STEPS)

    visual = build_visual(b.backbone.config).to(dev).train()
    head = nn.Linear(visual.output_dim, NUM_CLASSES).to(dev)
    full_opt = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=1e-5)

    def full_step(batch):
        x, i = batch[0].to(dev), batch[1].to(dev)
        loss = F.cross_entropy(head(visual(x)), labels[i])
        full_opt.zero_grad(set_to_none=True)
        loss.backward()
        full_opt.step()
        return len(x)
    naive = loop_rate(full_step, naive_loader(b, paths, train=True), "b: naive full FT", warm=WARM_STEPS)
    return {"naive": naive, "product": product, "model_only": model_only}


def naive_infer(b: Bench, model_file, test_dir: Path, out_csv: Path) -> None:
    """What a naive script does: load the model file, fp32 forward in no_grad, argmax, one row each."""
    model, meta = load_model_file(model_file)
    model = model.to(b.acc.device)
    names = sorted(os.listdir(test_dir))
    with torch.no_grad(), open(out_csv, "w") as f:
        for x, idx in tqdm(naive_loader(b, [test_dir / n for n in names], train=False), desc="c: naive",
                           unit="batch", mininterval=2):
            pred = model(x.to(b.acc.device)).argmax(1).tolist()
            f.writelines(f"{names[i]}, {meta['classes'][p]}\n" for i, p in zip(idx.tolist(), pred))


def measure_infer(b: Bench) -> dict:
    """(c) JPEG files -> CSV rows: infer.infer() vs a naive script, both from the saved model file."""
    n = len(b.paths)
    model = Classifier(b.backbone.visual.cpu(), NUM_CLASSES, log_class_prior(torch.ones(NUM_CLASSES)))
    cfg = load_config(overrides={"infer.batch_size": b.batch_size})
    with tempfile.TemporaryDirectory(prefix="perf-infer-") as tmp:
        tmp = Path(tmp)
        (tmp / "test").mkdir()
        for i, p in enumerate(b.paths):
            (tmp / "test" / f"{i:07d}{Path(p).suffix.lower()}").symlink_to(Path(p).resolve())
        save_model_file(tmp / "model.pt", model, b.backbone, [f"{c:04d}" for c in range(NUM_CLASSES)],
                        cfg, code_version())
        product, _ = seconds(lambda: infer(tmp / "test", tmp / "out", cfg, model_path=tmp / "model.pt"))
        naive, _ = seconds(lambda: naive_infer(b, tmp / "model.pt", tmp / "test", tmp / "naive.csv"))
    model = model.to(b.acc.device).eval()
    model_only = model_only_rate(lambda x: model.balanced_logits(x, cfg["infer"]["tau"]).argmax(1), b,
                                 "c: model only")
    return {"naive": n / naive, "product": n / product, "model_only": model_only}


def _feature_stage_child(folder: str, rows: int, classes: int, dim: int, encode: bool) -> dict:
    """In a fresh process: a scan table of `rows` images, then features.extract_features on it. With
    `encode` the frozen pass returns random fp32 features (as batched_pass does) so the product's own
    code writes the cache; without, every hash is cached and nothing is decoded. Peak RSS in GiB."""
    from .. import features
    base = peak_rss_gib()
    t0 = time.perf_counter()
    labels = np.sort(np.random.default_rng(0).integers(0, classes, rows))
    images = pd.DataFrame({"path": [f"{c:04d}/{i:08x}.jpg" for i, c in enumerate(labels)], "label": labels,
                           "hash": [hashlib.sha1(i.to_bytes(8, "little")).hexdigest() for i in range(rows)]})
    if encode:
        features.batched_pass = lambda fn, ds, *a, **k: (
            np.random.default_rng(1).standard_normal((len(ds), dim), dtype=np.float32), np.ones(len(ds), bool))
    backbone = Backbone(nn.Identity(), dict(VIT_B_32, output_dim=dim), "synthetic", "0" * 64, "synthetic")
    acc = SimpleNamespace(is_main_process=True, device="cpu", wait_for_everyone=lambda: None)
    feats, ok = features.extract_features(backbone, "/nonexistent", images, load_config(), acc, folder)
    assert feats.shape == (rows, dim) and feats.dtype == np.float16 and ok.all()
    return {"peak_rss_gib": peak_rss_gib(), "rss_after_imports_gib": base, "seconds": time.perf_counter() - t0}


def memory_at_scale(rows: int = 300_000, classes: int = 1_500, dim: int = 512, limit_gib: float = 4.0) -> dict:
    """(d) peak RSS of the scan table + feature cache at `rows` images, each phase in its own process."""
    result = {"rows": rows, "classes": classes, "dim": dim}
    with tempfile.TemporaryDirectory(prefix="perf-cache-") as tmp:
        for phase, encode in (("cache_write", True), ("cache_read", False)):
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
                result[phase] = pool.submit(_feature_stage_child, tmp, rows, classes, dim, encode).result()
    result["peak_gib"] = max(result[p]["peak_rss_gib"] for p in ("cache_write", "cache_read"))
    result[f"under_{limit_gib:g}_gib"] = result["peak_gib"] < limit_gib
    return result


# The data-path study (`--data-path`): what the training loader delivers into the training process.
# /dev/shm figures the prefetch decision is made with: Docker's default, and a large one.
SHM_SETTINGS = {"64MB": (64 << 20, 1), "64MB_8_processes": (64 << 20, 8), "large": (64 << 30, 1)}
TRANSFER_REPEATS = 2       # transfer-only passes serve each decoded crop this many times


class DecodedCrops(torch.utils.data.Dataset):
    """The crops an ImageDataset gives, decoded once in this process (forked workers share them): a
    loader over it measures the way into the training process alone (collation, /dev/shm or pipe,
    the conversion to float), not decoding. `as_float`: the crop normalised in the worker instead."""

    def __init__(self, dataset, repeats: int, as_float: bool, crops=None):
        self.crops = crops if crops is not None else [dataset[i][0] for i in range(len(dataset))]
        self.stats, self.image_size, self.repeats, self.as_float = dataset.stats, dataset.image_size, repeats, as_float

    def __len__(self):
        return len(self.crops) * self.repeats

    def __getitem__(self, i):
        x = self.crops[i % len(self.crops)]
        return (normalize(x[None], self.stats)[0] if self.as_float else x), i, True


class FloatImageDataset(ImageDataset):
    """The float32 data path, for comparison: each crop converted to float and normalised in the
    worker (torchvision's ToTensor + Normalize after the same geometry), 4x the uint8 bytes."""

    def __getitem__(self, i):
        x, i, ok = super().__getitem__(i)
        return normalize(x[None], self.stats, torch.tensor([ok]))[0], i, ok


def float32_loader(dataset, batch_size: int, num_workers: int):
    """The loader of the float32 data path: prefetch depth from float32 batch bytes, default collation
    into /dev/shm, or numpy through a pipe when not even one batch per worker fits."""
    batch_bytes = batch_size * 3 * dataset.image_size ** 2 * 4
    depth = runtime.prefetch_depth(batch_bytes, num_workers, runtime.shm_free_bytes()) if num_workers else None
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), collate_fn=runtime.numpy_collate if depth == 0 else None,
        prefetch_factor=max(1, depth) if num_workers else None), depth


def delivered_rate(loader, device, uint8: bool | None) -> float:
    """images/s from the loader into this process, from the first batch's arrival (worker start-up
    left out) to the last: as the model's float input on `device` (uint8 True: through as_tensors,
    False: the float32 batch moved there), or, uint8 None, the batches as they arrive (a pipe's
    batch unpickled), untouched. On a CPU device the uint8 path's conversion is CPU work in this
    process; on a GPU it is GPU work."""
    def take(batch):
        if uint8 is None:
            return batch[0]
        return as_tensors(batch, device)[0] if uint8 else torch.as_tensor(batch[0]).to(device)
    it = iter(loader)
    take(next(it))

    def rest():
        n = 0
        for batch in it:
            n += len(take(batch))
        return n
    sec, n = seconds(rest)
    return n / sec


def data_path(paths, pre: dict, fcfg: dict, batch_size: int, num_workers, device) -> dict:
    """images/s delivered into the training process at pre['image_size'] px: the float32 path and the
    uint8 path (decode workers return uint8 crops, as_tensors normalises them on the device), each
    with /dev/shm taken as 64 MB and as large (the free-space figure faked for the prefetch decision;
    64MB_8_processes: as if 8 training processes shared the machine). `decode`: the train transform
    decoding the files (fcfg's RandomResizedCrop and flip); `transfer`: crops decoded beforehand, served again,
    the way into the process alone. Each rate twice (delivered_rate): as the model's input on the
    device, and as the batches arrive."""
    from unittest import mock
    workers = runtime.resolve_workers(num_workers)
    transform = train_transform(pre, fcfg["crop_scale"], fcfg["hflip"])
    crops = DecodedCrops(ImageDataset(paths, transform, pre["image_size"], seed=0), TRANSFER_REPEATS, False).crops
    rows = []
    for setting, (shm, processes) in SHM_SETTINGS.items():
        with mock.patch.object(runtime, "shm_free_bytes", lambda shm=shm: shm), \
                mock.patch.dict(os.environ, {"LOCAL_WORLD_SIZE": str(processes)}):
            for mode in ("decode", "transfer"):
                for path in ("float32", "uint8"):
                    uint8 = path == "uint8"
                    kind = ImageDataset if uint8 else FloatImageDataset
                    dataset = kind(paths, transform, pre["image_size"], seed=0)
                    if mode == "transfer":
                        dataset = DecodedCrops(dataset, TRANSFER_REPEATS, as_float=not uint8, crops=crops)
                    if uint8:
                        loader = make_loader(dataset, batch_size, workers)
                        depth = 0 if loader.collate_fn.keywords["through_pipe"] else loader.prefetch_factor
                    else:
                        loader, depth = float32_loader(dataset, batch_size, workers)
                    arrival = delivered_rate(loader, device, None)
                    rate = delivered_rate(loader, device, uint8)
                    transport = "in-process" if not workers else "pipe" if depth == 0 else "shm"
                    rows.append({"shm": setting, "local_processes": processes, "mode": mode, "path": path,
                                 "transport": transport, "prefetch_depth": depth,
                                 "batch_bytes": batch_size * 3 * pre["image_size"] ** 2 * (1 if uint8 else 4),
                                 "images": len(dataset), "images_per_s": round(rate, 1),
                                 "images_per_s_as_they_arrive": round(arrival, 1)})
                    print(f"data path: shm {setting:17s} {mode:8s} {path:7s} via {transport:4s} "
                          f"{rate:8.1f} img/s as the model's input on {device} ({arrival:.1f} img/s as they arrive)")
    return {"rows": rows, "workers": workers, "batch_size": batch_size, "image_size": pre["image_size"],
            "source_images": len(paths)}


def plot_data_path(result: dict, path) -> None:
    table = pd.DataFrame(result["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, mode in zip(axes, ("decode", "transfer")):
        rows = table[table["mode"] == mode]
        part = pd.DataFrame({f"{path}, {what}": rows[rows["path"] == path].set_index("shm")[column]
                             for path in ("float32", "uint8")
                             for what, column in (("model input", "images_per_s"),
                                                  ("as they arrive", "images_per_s_as_they_arrive"))})
        part = part.reindex(list(SHM_SETTINGS))
        bars = part.plot.bar(ax=ax, rot=0)
        for container in bars.containers:
            ax.bar_label(container, fmt="%.0f", fontsize=8)
        ax.set(title=f"{mode}: {'files decoded + augmented' if mode == 'decode' else 'decoded crops served again'}",
               ylabel="images / s into the training process", xlabel="/dev/shm")
    fig.suptitle(f"data path at {result['image_size']} px, batch {result['batch_size']}, "
                 f"{result['workers']} worker(s): float32 vs uint8 batches")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_data_path(args) -> dict:
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]       # other work on the machine slows every rate
    cfg = load_config()
    acc = make_accelerator(cfg)
    pre = {"image_size": args.size, "mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}
    result = data_path(list_images(args.data, args.images), pre, cfg["finetune"], args.batch_size, cfg["num_workers"],
                       acc.device)
    result["machine"] = {"cpu": cpu_name(), "cores_usable": len(os.sched_getaffinity(0)), "device": str(acc.device),
                         "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                         "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                         "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "data_path.json", result)
    plot_data_path(result, out / "data_path.png")
    return result


def list_images(data_dir, n: int) -> list[Path]:
    files = sorted(p for p in Path(data_dir).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file())
    if not files:
        raise FileNotFoundError(f"no JPEG files under {data_dir}")
    for p in files[:n]:
        p.read_bytes()                                     # warm the page cache: time decoding, not disk
    return [files[i % len(files)] for i in range(n)]


def machine(b: Bench) -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "device": str(b.acc.device),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "precision": resolve_precision(b.cfg["precision"]), "torch_threads": torch.get_num_threads(),
            "num_workers": b.cfg["num_workers"], "batch_size": b.batch_size, "arch": arch_name(b.backbone.config),
            "images": len(b.paths), "train_steps": b.train_steps, "warm_steps": WARM_STEPS,
            "product_batch_sizes": {k: b.cfg[k]["batch_size"] for k in ("features", "finetune", "infer")}}


def peak_memory() -> dict:
    """Peak RSS in GiB. Forked loader workers start with the parent's peak (Linux copies it at fork),
    so the children's figure is at least the parent's RSS at fork time, not their own use."""
    out = {"rss_self_gib": peak_rss_gib(),
           "rss_children_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def plot(rates: dict, path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for k, kind in enumerate(("naive", "product", "model_only")):
        bars = ax.bar(np.arange(len(rates)) + (k - 1) * 0.27, [r[kind] for r in rates.values()], 0.27, label=kind)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(rates)), ["a: frozen features", "b: fine-tune step", "c: inference e2e"])
    ax.set(ylabel="images / s", title="naive vs product vs model-only (b naive = fp32 full fine-tuning)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(r: dict) -> str:
    m, mem = r["machine"], r["peak_memory"]
    lines = [f"perf: {m['arch']} on {m['device']} ({m['gpu'] or m['cpu']}, {m['torch_threads']} threads), precision "
             f"{m['precision']}, batch {m['batch_size']}, {m['images']} images, num_workers {m['num_workers']}"]
    lines += [f"  {name:16s}" + "".join(f"  {k} {v:8.1f}" for k, v in rate.items()) + "  img/s"
              for name, rate in r["rates"].items()]
    lines.append("  model-only forward: " + ", ".join(f"{k} {v:.1f}" for k, v in r["forward_by_precision"].items())
                 + " img/s")
    lines.append("  ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()))
    lines.append(f"  peak RSS {mem['rss_self_gib']:.2f} GiB, largest child {mem['rss_children_gib']:.2f} GiB")
    if r["memory"]:
        d = r["memory"]
        lines.append(f"  d: {d['rows']:,} images scan + feature cache: peak {d['peak_gib']:.2f} GiB "
                     f"(write {d['cache_write']['peak_rss_gib']:.2f}, read {d['cache_read']['peak_rss_gib']:.2f})")
    return "\n".join(lines)


def run(args) -> dict:
    t0 = time.perf_counter()
    if min(args.images, args.batch_size, args.train_steps, args.size) < 1:
        raise ValueError("--images, --batch-size, --train-steps and --size must be at least 1")
    if args.data_path:
        return run_data_path(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    memory = None if args.skip_memory else memory_at_scale()
    if args.memory_only:
        write_json(out / "perf_memory.json", memory)
        print(f"d: {memory['rows']:,} images scan + feature cache: peak {memory['peak_gib']:.2f} GiB")
        return memory
    cfg = load_config()
    acc = make_accelerator(cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    config = ARCHS[args.arch]
    backbone = Backbone(build_visual(config), dict(config), arch_name(config), "0" * 64, "random init")
    b = Bench(cfg, acc, backbone, list_images(args.data, args.images), args.batch_size, args.train_steps)
    rates = {"a_features": measure_features(b), "b_finetune_step": measure_finetune(b),
             "c_infer": measure_infer(b)}
    a, bb, c = rates.values()
    result = {"machine": machine(b), "rates": rates, "forward_by_precision": measure_precisions(b),
              "ratios": {"a_vs_naive": a["product"] / a["naive"], "a_vs_model_only": a["product"] / a["model_only"],
                         "b_vs_naive_full_ft": bb["product"] / bb["naive"], "c_vs_naive": c["product"] / c["naive"]},
              "peak_memory": peak_memory(),
              "memory": memory}
    result["seconds"] = time.perf_counter() - t0
    write_json(out / "perf.json", result)
    plot(rates, out / "perf.png")
    print(summary(result))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=2000, help="N images (the --data JPEGs cycled), default 2000")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of every measurement")
    p.add_argument("--train-steps", type=int, default=6, help=f"timed train steps after {WARM_STEPS} warm-up steps")
    p.add_argument("--out", default="outputs/perf", help="folder for perf.json and perf.png")
    p.add_argument("--data", default=DEFAULT_DATA, help="folder of JPEGs (searched recursively)")
    p.add_argument("--arch", choices=list(ARCHS), default="ViT-B-32", help="random-weight visual tower")
    p.add_argument("--size", type=int, default=448, help="--data-path: crop size in px (default 448)")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--data-path", action="store_true",
                     help="only the training data path: images/s into the training process, float32 vs uint8 "
                          "batches, /dev/shm 64 MB vs large, into OUT/data_path.json and .png")
    mem.add_argument("--skip-memory", action="store_true", help="skip (d), the 300k-image memory measurement")
    mem.add_argument("--memory-only", action="store_true", help="only (d), into OUT/perf_memory.json")
