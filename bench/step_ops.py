"""TECH_REPORT.md section 4.6, the table "Per optimisation step" (operators a step, what eight GPUs buy).

Operators per optimisation step of the LoRA fine-tuning, counted with torch's profiler on the CPU.

On eight GPUs at the global batch of 32, each device runs 4 images a step: the step is then bound by
how many kernels it launches (forward, backward, the LoRA deltas and their penalty, DDP, gradient
clipping, AdamW, the weight average), not by arithmetic. This counts the operators one step issues,
the product's own step (make_trainable, train_step, the scheduler and WeightAverage of the `app`
package under --app-root), in one process under DistributedDataParallel (a one-process gloo group:
DDP's per-step work is counted too), fp32.

    python bench/step_ops.py --arch vit-b-32 --out bench/results/step_ops/after-vit-b-32.json
    mkdir -p /tmp/before && git archive <rev> app | tar -x -C /tmp/before
    python bench/step_ops.py --arch vit-b-32 --app-root /tmp/before --label <rev> --out bench/results/step_ops/before-vit-b-32.json

--arch vit-b-32: the contest's tower (12 blocks, width 768) at --image-size px (64: 4 patches, a CPU
step in seconds); --arch narrow: the same 12 blocks and 12 heads at width 96 (the same operators, milliseconds).
Counted on the third step (the first ones allocate the optimizer's state and DDP's buckets):
`operators`, every aten operator not called from inside another one (forward, backward and
optimizer alike: what a GPU launches one or more kernels for, views included); `autograd_nodes`, the
backward functions run; `all_aten`, every aten call, nested ones included.
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = {"vit-b-32": 768, "narrow": 96}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def _photos(folder: Path, n: int) -> list[Path]:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count(prof) -> dict:
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]

    def top_level(e):
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True
    operators = [e.name for e in aten if top_level(e)]
    return {"operators": len(operators),
            "autograd_nodes": sum(e.name.startswith("autograd::engine::evaluate_function") for e in events),
            "all_aten": len(aten),
            "most_frequent": dict(collections.Counter(operators).most_common(12))}


def count_step_ops(app_root=ROOT, arch: str = "narrow", image_size: int = 64, batch: int = 4,
                   ddp: bool = True, steps: int = 3, label: str | None = None) -> dict:
    """Operators of the `steps`-th optimisation step at `batch` images a device (see the module doc)."""
    sys.path.insert(0, str(app_root))
    import torch
    from accelerate import Accelerator
    from torch.profiler import ProfilerActivity, profile

    from app.backbone import VIT_B_32, build_visual
    from app.config import load_config
    from app.data import ImageDataset, train_transform
    from app.finetune import WeightAverage, make_trainable, train_step, warmup_cosine
    from app.model import Classifier
    from app.runtime import make_loader

    torch.manual_seed(0)
    cfg = load_config()
    fcfg = cfg["finetune"]
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    visual = build_visual({**VIT_B_32, "image_size": image_size, "width": WIDTHS[arch]})
    classes = 100
    model = Classifier(visual, classes, torch.zeros(classes))
    adapters, optimizer = make_trainable(model, cfg)
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    group = None
    if ddp:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        group = dist.group.WORLD
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = accelerator.prepare_optimizer(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(100, fcfg["warmup_frac"]))
    average = WeightAverage(trained, fcfg["ema_decay"])
    targets = torch.randint(0, classes, (batch * steps,))
    weights = torch.ones(batch * steps)
    with tempfile.TemporaryDirectory() as tmp:
        pre = {"image_size": image_size, "mean": [0.5] * 3, "std": [0.25] * 3}
        dataset = ImageDataset(_photos(Path(tmp), batch * steps), train_transform(pre, fcfg["crop_scale"],
                                                                                  fcfg["hflip"]), image_size, seed=0)
        batches = list(make_loader(dataset, batch, 0))        # decoded before the count

    def step(b):
        train_step(model, adapters, optimizer, [b], targets, weights, fcfg, accelerator)
        scheduler.step()
        average.update()

    model.train()
    for b in batches[:-1]:
        step(b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batches[-1])
    if group is not None:
        import torch.distributed as dist
        dist.destroy_process_group()
    return {"cpu": cpu_name(), "torch": torch.__version__, "code": label or str(app_root), "arch": arch,
            "image_size": image_size, "images_per_device": batch, "ddp": ddp, "precision": "fp32",
            "adapters": len(adapters), "trained_tensors": len(trained), "step": steps, **_count(prof)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--app-root", default=str(ROOT), help="folder holding the `app` package to measure")
    p.add_argument("--arch", choices=sorted(WIDTHS), default="vit-b-32")
    p.add_argument("--image-size", type=int, default=64, help="px, a multiple of 32")
    p.add_argument("--batch", type=int, default=4, help="images per device")
    p.add_argument("--no-ddp", action="store_true", help="count without DistributedDataParallel")
    p.add_argument("--label", help="what the code under --app-root is, for the JSON (default: its path)")
    p.add_argument("--out", help="JSON file to write (default: print only)")
    args = p.parse_args(argv)
    if args.image_size % 32 or args.image_size < 32 or args.batch < 1:
        print("error: --image-size must be a multiple of 32 and --batch at least 1", file=sys.stderr)
        return 1
    if not (Path(args.app_root) / "app" / "finetune.py").is_file():
        print(f"error: --app-root {args.app_root}: no app/finetune.py there", file=sys.stderr)
        return 1
    result = count_step_ops(Path(args.app_root).resolve(), args.arch, args.image_size, args.batch,
                            not args.no_ddp, label=args.label)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
