"""TECH_REPORT.md section 4.6, the GPU projection table.

PROJECTION (no GPU measured): wall time of the default recipe on the contest's stage sizes on one and
on eight H100s, from measured, published and assumed inputs (each printed in the output, labelled).

  (a) decode: this CPU's measured cost per image, per core, of the product's own data path
      (app.data.ImageDataset + eval_transform / train_transform) at 224 and 448 px on real photos:
      flowers102-noisy train JPEGs as they are (256 px long side) and the same re-encoded at 500 px
      long side (JPEG q90; the contest's web photos are up to ~500 px). `decode` measures it.
  (b) model: published rates (../shared/FIELD_NOTES.md, timm's benchmark tables) carried to an H100
      by the stated assumptions (ASSUMPTIONS below; every factor is printed in the output).
  (c) CPU stages: scan/hash, noise stage and head warmup, fitted t = a N^b in the scale run
      (bench/scale.py, bench/results/scale/scale.json) and extrapolated to the stage sizes.
  (d) host floor of a fine-tuning step: the operators one step issues, counted by bench/step_ops.py
      (bench/results/step_ops/*-vit-b-32.json), times an ASSUMED host cost per operator in eager PyTorch
      (dispatcher, autograd, CUDA launch). Kernels launch asynchronously, so a step costs the larger of
      the GPU's arithmetic and that floor. At 4 images a device (8 GPUs, global batch 32) the floor binds.
  (e) transport: the uint8 batches' rate into the training process, measured by
      `python -m app perf --data-path` (bench/results/data-path/data_path.json) on the development CPU
      with one decoding worker; the main rows assume a 16-core server does not bind there, a column
      shows the totals if each process were held to the measured rate.

    python bench/project_gpu_time.py decode    # -> bench/results/scale/decode.json (~1-3 min, 1 core)
    python bench/project_gpu_time.py project   # -> bench/results/scale/projection.{json,md}
    python bench/project_gpu_time.py all

The recipe is read from app/defaults.yaml (finetune.epochs, num_workers, warmup.epochs) and projected
twice: at 224 px with those epochs, and at 448 px with 10 epochs (the resolution lever of the field notes).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "scale"
PHOTOS = ROOT.parent / "shared" / "data" / "flowers102-noisy" / "train"

STAGE_SIZES = [  # (name, train images, classes, test images)
    ("stage 2: 148,695 images / 750 classes", 148_695, 750, 37_444),
    ("contest text: 297,282 images / 1,500 classes", 297_282, 1_500, 74_888),
]

ASSUMPTIONS = {
    "published_inference_224_rtx4090": 12_000,   # img/s, ViT-B/32 CLIP, AMP (FIELD_NOTES, timm tables)
    "published_inference_448_rtx4090": 3_100,
    "published_training_224_rtx3090": 1_700,     # img/s, full training step (forward + backward + AdamW)
    "h100_over_rtx4090_inference": 2.0,          # assumed; H100 SXM has ~6x the 4090's dense bf16 tensor
                                                 # FLOPS, but a ViT-B/32 batch is not all big matmuls
    "h100_over_rtx3090_training": 3.0,           # assumed; cross-check: training ~3x a forward gives
                                                 # 24k / 3 = 8k img/s, above the 5.1k used (conservative)
    "cost_448_over_224": 12_000 / 3_100,         # the published inference ratio (4x tokens, attention small)
    "lora_step_as_full_step": True,              # conservative: a LoRA step on the last 4 blocks skips
                                                 # most of the backward (~0.55x the cost), not counted
    "ddp_efficiency_8_gpus": 0.9,                # of the fine-tuning rate on 8 GPUs
    "cores_per_gpu": 16,
    "auto_workers_cap": 12,                      # num_workers: auto = cores per process - 1, at most 12
    "web_photo_variant": "web-500",              # decode costs of the 500-px re-encoded photos
    "hash_threads": 8,                           # app/scan.py's thread pool
    "disk_read_mb_s": 1000,                      # first read of the train files (local NVMe; network
                                                 # storage is slower), counted in the scan
    "fixed_overhead_s": 60,                      # start-up of train + infer, backbone load, export, checkpoints
    "warmup_gpu_step_s": 0.5e-3,                 # one warmup step on an H100 (launch-bound at 512 x 512 x C)
    "warmup_gpu_flops": 30e12,                   # sustained fp32 FLOP/s for the warmup's matmuls
    "host_us_per_operator": 8.0,                 # assumed: eager PyTorch's CPU cost per operator on a server
    "host_us_per_operator_range": [5.0, 10.0],   # core (dispatcher, autograd, CUDA launch), 5-10 us
    "transport_row": ["large", 1, "transfer"],   # data_path.json row: /dev/shm large (--shm-size=16g), uint8
}
STEP_OPS = ROOT / "bench" / "results" / "step_ops"
DATA_PATH = ROOT / "bench" / "results" / "data-path" / "data_path.json"


# ============================================================================ (a) decode, measured here
def _web_copies(paths, folder: Path, long_side: int = 500) -> list[Path]:
    """The photos upscaled (bicubic) to long_side px and re-encoded at JPEG quality 90."""
    from PIL import Image
    out = []
    for i, p in enumerate(paths):
        q = folder / f"{i:04d}.jpg"
        with Image.open(p) as im:
            im = im.convert("RGB")
            s = long_side / max(im.size)
            im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC).save(q, "JPEG", quality=90)
        out.append(q)
    return out


def _time_dataset(dataset, passes: int = 2) -> dict:
    """Per-image CPU ms and wall ms of dataset[i] over all i; the fastest of `passes` (the first warms
    the page cache)."""
    best = None
    for _ in range(passes):
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        if best is None or cpu < best[0]:
            best = (cpu, wall)
    return {"cpu_ms_per_image": round(1e3 * best[0] / len(dataset), 3),
            "wall_ms_per_image": round(1e3 * best[1] / len(dataset), 3)}


def measure_decode(n: int = 300, sizes=(224, 448), photos: Path = PHOTOS) -> dict:
    """Per-core decode + transform cost of the product's ImageDataset, one thread, in this process."""
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from app.config import load_config
    from app.data import ImageDataset, eval_transform, train_transform
    torch.set_num_threads(1)
    files = sorted(p for p in Path(photos).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise FileNotFoundError(f"no JPEG photos under {photos}")
    files = files[:: max(1, len(files) // n)][:n]
    fcfg = load_config()["finetune"]
    result = {"photos": str(photos), "images": len(files), "threads": 1, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="decode-500-") as tmp:
        variants = {"flowers-256": files, "web-500": _web_copies(files, Path(tmp))}
        for name, paths in variants.items():
            sizes_px = []
            for p in paths[:50]:
                from PIL import Image
                with Image.open(p) as im:
                    sizes_px.append(im.size)
            entry = {"mean_bytes": float(np.mean([p.stat().st_size for p in paths])),
                     "typical_size_px": max(set(sizes_px), key=sizes_px.count)}
            for px in tqdm(sizes, desc=f"decode {name}"):
                pre = {"image_size": px, "mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}
                entry[f"eval_{px}"] = _time_dataset(ImageDataset(paths, eval_transform(pre), px))
                entry[f"train_{px}"] = _time_dataset(ImageDataset(
                    paths, train_transform(pre, fcfg["crop_scale"], fcfg["hflip"]), px, seed=0))
            result["variants"][name] = entry
    buf = np.random.default_rng(0).bytes(64 << 20)
    t0 = time.process_time()
    hashlib.sha1(buf).hexdigest()
    result["sha1_mb_per_s_per_core"] = round(64 / (time.process_time() - t0), 1)
    from app.report import cpu_name
    result["cpu"] = cpu_name()
    return result


# ============================================================================ (b) + (c) the projection
def model_rates(px: int) -> dict:
    """Projected H100 images/s at px: inference (frozen pass, test) and a training step."""
    a = ASSUMPTIONS
    scale = 1.0 if px == 224 else a["cost_448_over_224"] * (px / 448) ** 2
    return {"inference": a["published_inference_224_rtx4090"] * a["h100_over_rtx4090_inference"] / scale,
            "training": a["published_training_224_rtx3090"] * a["h100_over_rtx3090_training"] / scale}


KEY = "cpu_"   # fits of CPU seconds (one thread): wall seconds on a shared 2-core machine vary with its load


def extrapolation_exponent(row: dict) -> float:
    """Conservative: the larger of the fitted b, the last local slope, and 1 (a stage whose fixed costs
    make it look sub-linear at 15k-150k is taken as linear beyond)."""
    return max(1.0, row[f"{KEY}b"], row[f"{KEY}local_slopes"][-1])


def cpu_stage(growth: dict, name: str, n: int) -> float:
    """CPU seconds (one thread) of one stage at n images: the scale run's largest measurement, carried to
    n with extrapolation_exponent."""
    row = growth[name]
    return row[f"{KEY}values"][-1] * (n / row["n"][-1]) ** extrapolation_exponent(row)


def workers_per_gpu(cfg: dict) -> int:
    """num_workers of defaults.yaml on a server with cores_per_gpu cores per GPU process."""
    a = ASSUMPTIONS
    nw = cfg["num_workers"]
    return min(a["auto_workers_cap"], a["cores_per_gpu"] - 1) if nw == "auto" else int(nw)


def _px(value, native: int = 224) -> int:
    return native if value in (None, "native") else int(value)


def recipe_of(cfg: dict) -> dict:
    """What defaults.yaml runs: fine-tuning / inference px (input.image_size), frozen-pass px
    (features.image_size; both the backbone's 224 when absent or native), epochs, and the inference
    cost in single 'views' at the inference px (test-time augmentation)."""
    infer = cfg["infer"]
    tta = infer.get("tta", "flip" if infer.get("flip_tta") else "none")
    views = {"none": 1.0, "flip": 2.0}.get(tta, 2.0 * sum(x * x for x in infer.get("tta_scales", [1.0])))
    return {"px": _px(cfg.get("input", {}).get("image_size")), "features_px": _px(cfg["features"].get("image_size")),
            "epochs": int(cfg["finetune"]["epochs"]), "tta": tta, "infer_views": views}


def warmup_on_accelerator() -> bool:
    """Does the product run the head warmup on the accelerator (app.warmup.train_head takes a device)?"""
    from app.warmup import train_head
    return "device" in inspect.signature(train_head).parameters


def project_one(n: int, classes: int, n_test: int, gpus: int, px: int, epochs: int, workers: int,
                cfg: dict, decode: dict, growth: dict, scale_warmup_epochs: int, warmup_gpu: bool,
                features_px: int = 224, infer_views: float = 1.0, decode_factor: float = 1.0,
                operators: int = 0, host_us: float | None = None, transport: float | None = None) -> dict:
    """Seconds of each stage. operators x host_us: the host floor of one fine-tuning step (0: none);
    transport: img/s one training process receives at most (None: not a limit)."""
    a = ASSUMPTIONS
    host_us = a["host_us_per_operator"] if host_us is None else host_us
    var = decode["variants"][a["web_photo_variant"]]
    per_core = lambda key: 1e3 / (decode_factor * var[key]["cpu_ms_per_image"])   # noqa: E731 - img/s
    eff = a["ddp_efficiency_8_gpus"] if gpus > 1 else 1.0
    feed = {"features": per_core(f"eval_{features_px}") * workers * gpus,
            "finetune": per_core(f"train_{px}") * workers * gpus,
            "infer": per_core(f"eval_{px}") * workers}          # run_infer.sh: one process, one GPU
    global_batch = cfg["finetune"]["batch_size"]
    gpu_step = global_batch / (model_rates(px)["training"] * gpus * eff)      # arithmetic of one step
    host_step = operators * host_us * 1e-6                                    # launching its operators
    model = {"features": model_rates(features_px)["inference"] * gpus,
             "finetune": global_batch / max(gpu_step, host_step),
             "infer": model_rates(px)["inference"] / infer_views}
    if transport is not None:       # a 224-px batch has a quarter of the bytes: the 448-px rate is a floor
        feed = {k: min(v, transport * (1 if k == "infer" else gpus)) for k, v in feed.items()}
    work = {"features": n, "finetune": epochs * n, "infer": n_test}
    t, bound = {}, {}
    hash_s = n * var["mean_bytes"] / (decode["sha1_mb_per_s_per_core"] * 2**20 * a["hash_threads"])
    read_s = n * var["mean_bytes"] / (a["disk_read_mb_s"] * 2**20)
    t["scan"] = cpu_stage(growth, "scan", n) + hash_s + read_s
    t["noise"] = cpu_stage(growth, "noise", n)
    warm_epochs = cfg["warmup"]["epochs"]
    if warmup_gpu:
        steps = warm_epochs * math.ceil(n / cfg["warmup"]["batch_size"])
        flops = warm_epochs * n * 6 * 512 * classes
        t["warmup"] = max(steps * a["warmup_gpu_step_s"], flops / a["warmup_gpu_flops"])
    else:
        t["warmup"] = cpu_stage(growth, "warmup", n) * warm_epochs / scale_warmup_epochs
    for k in ("features", "finetune", "infer"):
        rate = min(feed[k], model[k])
        t[k] = work[k] / rate
        bound[k] = "decode" if feed[k] < model[k] else "model"
    if bound["finetune"] == "model" and host_step > gpu_step:
        bound["finetune"] = "host"
    t["overhead"] = a["fixed_overhead_s"]
    total = sum(t.values())
    groups = {"decode": sum(t[k] for k in bound if bound[k] == "decode"),
              "model": sum(t[k] for k in bound if bound[k] == "model"),
              "host": sum(t[k] for k in bound if bound[k] == "host"),
              "CPU stages": t["scan"] + t["noise"] + (0 if warmup_gpu else t["warmup"])}
    # the slowest training rate (img/s, one GPU's share) that still ends within the hour
    rest = total - t["finetune"]
    breakeven = work["finetune"] / max(1.0, 3600 - rest) / (gpus * eff)
    return {"seconds": {k: round(v, 1) for k, v in t.items()}, "total_seconds": round(total, 1),
            "one_hour_needs_training_img_s_per_gpu": round(breakeven),
            "total_minutes": round(total / 60, 1), "bound_by_stage": bound,
            "finetune_step_ms": {"gpu": round(1e3 * gpu_step, 2), "host": round(1e3 * host_step, 2)},
            "seconds_by_bound": {k: round(v, 1) for k, v in groups.items()},
            "bounded_by": max(groups, key=groups.get),
            "rates_img_s": {"decode_feed": {k: round(v) for k, v in feed.items()},
                            "model": {k: round(v) for k, v in model.items()}}}


def read_step_ops(folder: Path = STEP_OPS) -> dict:
    """Operators per fine-tuning step at 4 images a device (bench/step_ops.py, ViT-B/32): the product's
    grouped LoRA ('after') and the per-block LoRA it replaced ('before', a reference)."""
    out = {}
    for name in ("after", "before"):
        f = Path(folder) / f"{name}-vit-b-32.json"
        if f.is_file():
            d = json.loads(f.read_text())
            out[name] = {k: d[k] for k in ("operators", "images_per_device", "code", "cpu", "torch")}
    return out


def read_transport(path: Path = DATA_PATH) -> dict | None:
    """The uint8 batches' measured rate into the training process (as they arrive, crops decoded
    beforehand), 448 px, for each /dev/shm case of `python -m app perf --data-path`."""
    if not Path(path).is_file():
        return None
    d = json.loads(Path(path).read_text())
    rows = {f"{r['shm']}/{r['local_processes']}": {"via": r["transport"], "img_s": r["images_per_s_as_they_arrive"]}
            for r in d["rows"] if r["path"] == "uint8" and r["mode"] == "transfer"}
    shm, procs, _ = ASSUMPTIONS["transport_row"]
    return {"rows": rows, "used": rows[f"{shm}/{procs}"]["img_s"], "used_row": f"{shm}/{procs}",
            "image_size": d["image_size"], "batch_size": d["batch_size"], "workers": d["workers"],
            "machine": d["machine"]}


def project(decode: dict, scale: dict, cfg: dict, step_ops: dict | None = None,
            transport: dict | None = None) -> dict:
    """The projection's rows. step_ops / transport: read_step_ops() / read_transport() (None: the
    committed results)."""
    step_ops = read_step_ops() if step_ops is None else step_ops
    transport = read_transport() if transport is None else transport
    ops = step_ops.get("after", {}).get("operators", 0)
    growth = scale["growth"]
    scale_warmup_epochs = scale["runs"][-1]["warmup_epochs"]
    warmup_gpu = warmup_on_accelerator()
    rec = recipe_of(cfg)
    recipes = {(rec["px"], rec["epochs"]): f"{rec['px']} px, {rec['epochs']} epochs (defaults.yaml)"}
    recipes.setdefault((224, rec["epochs"]), f"224 px, {rec['epochs']} epochs")
    recipes.setdefault((448, 10), "448 px, 10 epochs")
    configured = workers_per_gpu(cfg)
    worker_sets = [(configured, f"{cfg['num_workers']}: {configured} per GPU")]
    rows = []
    for stage, n, classes, n_test in STAGE_SIZES:
        for (px, epochs), recipe in recipes.items():
            for workers, wname in worker_sets:
                for gpus in (1, 8):
                    args = (n, classes, n_test, gpus, px, epochs, workers, cfg, decode, growth,
                            scale_warmup_epochs, warmup_gpu, rec["features_px"], rec["infer_views"])
                    r = project_one(*args, operators=ops)
                    slow = project_one(*args, decode_factor=1.5, operators=ops)
                    host = {us: project_one(*args, operators=ops, host_us=us)["seconds"]["finetune"] / 60
                            for us in ASSUMPTIONS["host_us_per_operator_range"]}
                    extra = {"total_minutes_if_decode_1.5x": slow["total_minutes"],
                             "finetune_minutes_at_host_us": {f"{us:g}": round(m, 1) for us, m in host.items()}}
                    if transport:
                        extra["total_minutes_if_transport_as_measured"] = project_one(
                            *args, operators=ops, transport=transport["used"])["total_minutes"]
                    if "before" in step_ops:
                        extra["finetune_minutes_per_block_lora"] = round(project_one(
                            *args, operators=step_ops["before"]["operators"])["seconds"]["finetune"] / 60, 1)
                    rows.append({"stage": stage, "images": n, "classes": classes, "test_images": n_test,
                                 "recipe": recipe, "px": px, "epochs": epochs, "workers": wname,
                                 "gpus": gpus, **r, **extra})
    goal = [r for r in rows if r["images"] == 148_695 and r["gpus"] == 1]
    # the same recipe with 2 decoding workers and the warmup on one CPU thread, for reference
    n, classes, n_test = STAGE_SIZES[0][1:]
    before = project_one(n, classes, n_test, 1, rec["px"], rec["epochs"], 2, cfg, decode, growth,
                         scale_warmup_epochs, False, rec["features_px"], rec["infer_views"], operators=ops)
    return {"label": "PROJECTION: no GPU was measured; see assumptions",
            "assumptions": ASSUMPTIONS, "model_rates_h100_img_s": {px: model_rates(px) for px in (224, 448)},
            "decode_ms_per_image_per_core": {k: {m: v[m]["cpu_ms_per_image"] for m in v if "_" in m and m[-1].isdigit()}
                                             for k, v in decode["variants"].items()},
            "decode_cpu": decode["cpu"], "sha1_mb_per_s_per_core": decode["sha1_mb_per_s_per_core"],
            "cpu_stage_fits": {k: {"a": growth[k][f"{KEY}a"], "b": growth[k][f"{KEY}b"],
                                   "last_local_slope": growth[k][f"{KEY}local_slopes"][-1],
                                   "at_n": growth[k]["n"][-1], "cpu_seconds": growth[k][f"{KEY}values"][-1],
                                   "extrapolation_exponent": extrapolation_exponent(growth[k])}
                               for k in ("scan", "noise", "warmup")},
            "warmup_on_accelerator": warmup_gpu, "step_operators": step_ops, "transport": transport,
            "global_batch": cfg["finetune"]["batch_size"],
            "recipe_from_defaults": {**rec, "num_workers": cfg["num_workers"],
                                     "warmup.epochs": cfg["warmup"]["epochs"]},
            "rows": rows,
            "reference_2_workers_warmup_on_cpu": {"stage": STAGE_SIZES[0][0], "gpus": 1, **before},
            "one_hour_on_one_h100_149k": {f"{r['recipe']} / {r['workers']}": r["total_minutes"] <= 60 for r in goal}}


def markdown(p: dict) -> str:
    a, rec = p["assumptions"], p["recipe_from_defaults"]
    lo, hi = (f"{us:g}" for us in a["host_us_per_operator_range"])
    lines = ["**PROJECTION, not a measurement** (no GPU was measured): minutes of `run_train.sh` + "
             "`run_infer.sh` on H100s. What limits a stage: (decode) the decoding workers, (model) the GPU's "
             "arithmetic, (host) launching the step's operators.", "",
             "| stage | recipe | GPUs | scan | frozen pass | noise | warmup | fine-tune | "
             f"inference | other | **total min** | if decode 1.5x | if transport as measured | "
             f"fine-tune at {lo} / {hi} us per operator | bound by |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        s, b = r["seconds"], r["bound_by_stage"]
        host = r["finetune_minutes_at_host_us"]
        lines.append(f"| {r['stage']} | {r['recipe']} | {r['gpus']} | "
                     + " | ".join(f"{s[k] / 60:.1f}" + (f" ({b[k]})" if k in b else "")
                                  for k in ("scan", "features", "noise", "warmup", "finetune", "infer", "overhead"))
                     + f" | **{r['total_minutes']:.0f}** | {r['total_minutes_if_decode_1.5x']:.0f}"
                     + f" | {r.get('total_minutes_if_transport_as_measured', float('nan')):.0f}"
                     + f" | {host[lo]:.1f} / {host[hi]:.1f} | {r['bounded_by']} |")
    r224, r448 = p["model_rates_h100_img_s"][224], p["model_rates_h100_img_s"][448]
    dec = p["decode_ms_per_image_per_core"]
    fits = p["cpu_stage_fits"]
    lines += [
        "", "Inputs:",
        f"- Recipe (app/defaults.yaml): fine-tuning and inference at {rec['px']} px, frozen pass at "
        f"{rec['features_px']} px, {rec['epochs']} epochs, test-time views {rec['tta']} "
        f"(cost x{rec['infer_views']:g}), warmup {rec['warmup.epochs']} epochs, num_workers {rec['num_workers']}.",
        f"- (a) Decode + transform per image on one core of this CPU ({p['decode_cpu']}), the product's "
        "ImageDataset, measured: " + "; ".join(f"{k}: " + ", ".join(f"{m} {v:.2f} ms" for m, v in d.items())
                                               for k, d in dec.items())
        + f". Used: `{a['web_photo_variant']}` (flowers photos re-encoded at 500 px); {a['cores_per_gpu']} cores "
        f"per GPU; hashing at {p['sha1_mb_per_s_per_core']:.0f} MB/s per core x {a['hash_threads']} threads, "
        f"the files read once at {a['disk_read_mb_s']:,} MB/s. "
        "Collation and the copy into the training process are not in these figures (see (e)); the 1.5x "
        "column covers heavier real photos.",
        f"- (b) H100 model rates, img/s: inference {r224['inference']:,.0f} at 224 px, {r448['inference']:,.0f} "
        f"at 448; training step {r224['training']:,.0f} at 224, {r448['training']:,.0f} at 448. From the "
        f"published {a['published_inference_224_rtx4090']:,} / {a['published_inference_448_rtx4090']:,} img/s "
        f"(RTX 4090, AMP inference) x {a['h100_over_rtx4090_inference']:g} (assumed H100 / 4090) and "
        f"{a['published_training_224_rtx3090']:,} img/s (RTX 3090, training) x {a['h100_over_rtx3090_training']:g} "
        f"(assumed H100 / 3090); 448 px costs {a['cost_448_over_224']:.2f}x 224 px (the published inference "
        "ratio; 4x the tokens, attention a small share); a LoRA step costed as a full training step "
        f"(LoRA on all 12 blocks back-propagates through all of them); fine-tuning on 8 GPUs at "
        f"{a['ddp_efficiency_8_gpus']:.0%} scaling; inference (`run_infer.sh`) on one GPU.",
        "- (c) CPU stages, from the scale run on this CPU (one thread, 1,500 classes; CPU seconds): the largest "
        "run's seconds carried to N with the larger of the fitted exponent, the last local slope and 1: "
        + ", ".join(f"{k} {v['cpu_seconds']:.0f} s at {v['at_n']:,} (b = {v['b']:.2f}, last slope "
                    f"{v['last_local_slope']:.2f}, used {v['extrapolation_exponent']:.2f})" for k, v in fits.items())
        + ". The noise stage at 750 classes does less than at 1,500 (not credited); one thread is what "
        "8 processes under `accelerate launch` get (OMP_NUM_THREADS=1), a single process uses more"
        + ". The head warmup " + ("runs on the GPU (app.warmup.train_head takes the accelerator's device): "
                                  f"max({a['warmup_gpu_step_s'] * 1e3:g} ms a step, {a['warmup_gpu_flops'] / 1e12:g} "
                                  "TFLOP/s)" if p["warmup_on_accelerator"] else "runs on the CPU, as measured") + ".",
        host_floor_line(p), transport_line(p),
        f"- Other: {a['fixed_overhead_s']} s of start-up, weights loading, export and checkpoints.",
        f"- For reference, the defaults' recipe on the 148,695-image stage and one H100 with 2 decoding "
        f"workers and the warmup on one CPU thread: "
        f"**{p['reference_2_workers_warmup_on_cpu']['total_minutes']:.0f} min**, bound by "
        f"{p['reference_2_workers_warmup_on_cpu']['bounded_by']}.",
        "", "One hour on one H100, 148,695-image stage: "
        + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in p["one_hour_on_one_h100_149k"].items()) + ". "
        + "It stays met as long as one H100 trains at least "
        + "; ".join(f"{r['one_hour_needs_training_img_s_per_gpu']:,} img/s at {r['px']} px ({r['recipe']})"
                    for r in p["rows"] if r["images"] == 148_695 and r["gpus"] == 1)
        + f" (projected: {r224['training']:,.0f} at 224, {r448['training']:,.0f} at 448; the published RTX 3090 "
        f"rate is {a['published_training_224_rtx3090']:,} at 224, "
        f"~{a['published_training_224_rtx3090'] / a['cost_448_over_224']:,.0f} at 448)."]
    return "\n".join(lines) + "\n"


def host_floor_line(p: dict) -> str:
    a, ops = p["assumptions"], p["step_operators"]
    if "after" not in ops:
        return "- (d) No operator count (bench/results/step_ops): no host floor on the fine-tuning step."
    after = ops["after"]
    rows = [r for r in p["rows"] if r["images"] == 148_695 and r["px"] == 448]
    step = {r["gpus"]: r["finetune_step_ms"] for r in rows}
    text = (f"- (d) Host floor of a fine-tuning step: {after['operators']:,} operators a step at "
            f"{after['images_per_device']} images a device, MEASURED by `bench/step_ops.py` ({after['code']}, "
            f"ViT-B/32 architecture, DDP, torch profiler on the {after['cpu']} CPU; the count does not depend on "
            f"the batch), x {a['host_us_per_operator']:g} us per operator, ASSUMED (eager PyTorch on a server "
            f"core: dispatcher, autograd, CUDA launch; {a['host_us_per_operator_range'][0]:g}-"
            f"{a['host_us_per_operator_range'][1]:g} us in the column). A step costs the larger of the GPU's "
            f"arithmetic and this floor (launches are asynchronous); global batch {p['global_batch']}.")
    if step:
        text += " At 448 px: " + "; ".join(f"{g} GPU{'s' if g > 1 else ''}: arithmetic {v['gpu']:.1f} ms, "
                                             f"floor {v['host']:.1f} ms" for g, v in sorted(step.items())) + "."
    if "before" in ops:
        per_block = {r["gpus"]: r["finetune_minutes_per_block_lora"] for r in rows}
        text += (f" For reference, the per-block LoRA's {ops['before']['operators']:,} operators would give "
                 + ", ".join(f"{m:.1f} min of fine-tuning on {g} GPU{'s' if g > 1 else ''}"
                             for g, m in sorted(per_block.items())) + " (448 px, 148,695 images).")
    return text


def transport_line(p: dict) -> str:
    t = p["transport"]
    if not t:
        return "- (e) No data-path measurement (bench/results/data-path): transport not checked."
    m = t["machine"]
    def case(key: str) -> str:
        shm, procs = key.split("/")
        return f"/dev/shm {shm.split('_')[0]} with {procs} process{'es' if procs != '1' else ''} a machine"
    cases = "; ".join(f"{case(k)}: {v['img_s']:,.0f} img/s (via {v['via']})" for k, v in t["rows"].items())
    return (f"- (e) Transport: uint8 batches of {t['batch_size']} at {t['image_size']} px as they arrive in the "
            f"training process, MEASURED by `python -m app perf --data-path` on the {m['cpu']} "
            f"({m['cores_usable']} cores, {t['workers']} decoding worker, crops decoded beforehand): {cases}. "
            f"The main rows ASSUME a 16-core server with {ASSUMPTIONS['auto_workers_cap']} workers per process "
            f"is not limited there; the column 'if transport as measured' holds each process to "
            f"{t['used']:,.0f} img/s (the `{t['used_row']}` row: --shm-size=16g; the 224-px frozen pass at the "
            "448-px rate, a floor since its batches have a quarter of the bytes).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["decode", "project", "all"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--photos", type=Path, default=PHOTOS, help="folder of real JPEG photos (recursive)")
    ap.add_argument("--images", type=int, default=300, help="photos timed in the decode measurement")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step in ("decode", "all"):
        decode = measure_decode(args.images, photos=args.photos)
        (args.out / "decode.json").write_text(json.dumps(decode, indent=2))
        print(json.dumps(decode, indent=2))
    if args.step in ("project", "all"):
        from app.config import load_config
        p = project(json.loads((args.out / "decode.json").read_text()),
                    json.loads((args.out / "scale.json").read_text()), load_config())
        (args.out / "projection.json").write_text(json.dumps(p, indent=2))
        (args.out / "projection.md").write_text(markdown(p))
        print(markdown(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
