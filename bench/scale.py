"""TECH_REPORT.md section 4.6, the scale table and its figure (stage times against N).

Scale study: the whole product pipeline on a competition-sized synthetic set, on this CPU.

A tiny random backbone (proxy format, 32 px input, 2 blocks of width 64, but 512-d output like ViT-B/32)
keeps the model cheap, so what is timed is the pipeline itself: scanning + hashing, the frozen pass and
its cache, the noise stage and the head warmup on 512-d features of 1,500 classes, one LoRA epoch,
export, and inference. Each size runs `run_train.sh` + `run_infer.sh` as a user would.

    python bench/scale.py data                    # generate /work/scale-data once (reused when present)
    python bench/scale.py run                     # train + infer at 15k, 50k and all ~152k images
    python bench/scale.py report                  # fit t = a N^b per stage -> bench/results/scale/scale.*
    python bench/scale.py all                     # the three in order
Options: --data DIR (default /work/scale-data), --sizes 15000 50000 0 (0 = every train file),
--epochs 1, --code DIR (the checkout whose run_train.sh runs; default this one), --force (rerun sizes);
--threads 1 (OMP_NUM_THREADS), --workers N, --pin-core K (taskset); after `--`, more run_train.sh
options (e.g. `-- --set input.image_size=native`: the tiny backbone's own 32 px, not a resampled 448).
The runs in bench/results/scale: `python bench/scale.py run --code SNAPSHOT --threads 1 --workers 2
--pin-core 0 -- --set input.image_size=native` (SNAPSHOT = `git archive HEAD` of the measured commit).

The data: 1,500 class folders `0000`..`1499`, long-tailed 5..250 images per class (a polynomial tail,
~101 per class on average), 64-96 px JPEGs of random gratings + noise + a class-coloured shape (every
file distinct), ~2% byte-identical copies filed under another class, a few truncated, undecodable and
empty files; a flat test folder of ~20k files (a few undecodable). The smaller sizes are hard-linked
subsets: the first round(f * n_c) files of every class (at least one), so all 1,500 classes stay.
Results: bench/results/scale/{runs.json, scale.json, scale.md, scale.png, reports/}; the runs themselves
(caches, checkpoints, models) stay under DATA/runs/.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path("/work/scale-data")
RESULTS = ROOT / "bench" / "results" / "scale"
NLOGN_LIMIT = 1.1      # N log N over 15k..150k has a fitted exponent of ~1.09: above this grows faster
MIN_SECONDS = 5.0      # stages shorter than this at the largest size are too noisy to flag
STAGES = ["scan", "backbone", "features", "noise", "warmup", "finetune", "export"]


# ============================================================================ the synthetic set
@dataclass(frozen=True)
class Spec:
    classes: int = 1500
    train: int = 152_000            # files in train/ (duplicates and broken files included)
    test: int = 20_200
    lo: int = 5                     # images in the smallest / largest class (stage 2: 5..248)
    hi: int = 250
    min_px: int = 64
    max_px: int = 96
    dup_frac: float = 0.02          # byte-identical copy of an image of another class
    truncated_frac: float = 0.002   # first 60% of a JPEG's bytes (decodes partly)
    garbage_frac: float = 0.0005    # a JPEG header and random bytes (undecodable)
    empty_frac: float = 0.0002      # 0-byte file (skipped by the scan)
    test_garbage_frac: float = 0.001
    seed: int = 0


def class_counts(spec: Spec) -> np.ndarray:
    """Images per class: lo + (hi - lo) (1 - r)^p over the rank r in [0, 1], p solved so that the counts
    add up to spec.train; ranks are assigned to the classes in a seeded random order."""
    r = np.linspace(0.0, 1.0, spec.classes)

    def total(p):
        return int(np.round(spec.lo + (spec.hi - spec.lo) * (1 - r) ** p).sum())
    lo_p, hi_p = 1e-3, 1e3
    for _ in range(100):                       # total(p) decreases in p
        mid = math.sqrt(lo_p * hi_p)
        lo_p, hi_p = (mid, hi_p) if total(mid) > spec.train else (lo_p, mid)
    counts = np.round(spec.lo + (spec.hi - spec.lo) * (1 - r) ** hi_p).astype(np.int64)
    counts[0] += spec.train - counts.sum()     # exact total (the largest class absorbs the rounding)
    return counts[np.random.default_rng([spec.seed, 1]).permutation(spec.classes)]


def _class_style(spec: Spec, c: int) -> dict:
    r = np.random.default_rng([spec.seed, 7, c])
    return dict(bg=r.integers(0, 256, 3), fg=r.integers(0, 256, 3), shape=int(r.integers(3)),
                rel=r.uniform(0.3, 0.7), freq=r.uniform(0.05, 0.25), theta=r.uniform(0, np.pi),
                colour=r.normal(0, 1, 3))


def _grating(h, w, freq, theta, phase):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)


def render(spec: Spec, c: int, k: int, namespace: int = 0) -> bytes:
    """JPEG bytes of image k of class c: random gratings + noise + a class grating and a class shape.
    A pure function of (spec.seed, namespace, c, k), so a duplicate is rendered again, not copied."""
    rng = np.random.default_rng([spec.seed, namespace, c, k])
    w, h = (int(v) for v in rng.integers(spec.min_px, spec.max_px + 1, 2))
    st = _class_style(spec, c)
    arr = np.broadcast_to(st["bg"] + rng.normal(0, 30, 3), (h, w, 3)).astype(np.float64)
    for _ in range(3):
        arr = arr + 50 * _grating(h, w, rng.uniform(0.03, 0.3), rng.uniform(0, np.pi),
                                  rng.uniform(0, 2 * np.pi))[..., None] * rng.normal(0, 1, 3)
    arr += 40 * _grating(h, w, st["freq"], st["theta"] + rng.normal(0, 0.1), rng.uniform(0, 2 * np.pi))[..., None] \
        * st["colour"]
    arr += rng.normal(0, 20, (h, w, 3))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    s = st["rel"] * min(w, h) * rng.uniform(0.7, 1.3)
    x0, y0 = rng.uniform(-s / 4, w - 3 * s / 4), rng.uniform(-s / 4, h - 3 * s / 4)
    colour = tuple(int(v) for v in (st["fg"] + rng.normal(0, 20, 3)).clip(0, 255))
    draw = ImageDraw.Draw(img)
    if st["shape"] == 0:
        draw.ellipse([x0, y0, x0 + s, y0 + s], fill=colour)
    elif st["shape"] == 1:
        draw.rectangle([x0, y0, x0 + s, y0 + s], fill=colour)
    else:
        draw.polygon([(x0, y0 + s), (x0 + s / 2, y0), (x0 + s, y0 + s)], fill=colour)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def train_file(spec: Spec, counts: np.ndarray, c: int, k: int) -> tuple[str, bytes]:
    """(kind, bytes) of train/<c>/<k>.jpg: plain | duplicate | truncated | garbage | empty."""
    rng = np.random.default_rng([spec.seed, 11, c, k])
    u = rng.random()
    edges = np.cumsum([spec.dup_frac, spec.truncated_frac, spec.garbage_frac, spec.empty_frac])
    if u < edges[0]:                            # a copy of image k2 of another class c2
        c2 = int((c + 1 + rng.integers(spec.classes - 1)) % spec.classes)
        return "duplicate", render(spec, c2, int(rng.integers(counts[c2])))
    if u < edges[1]:
        data = render(spec, c, k)
        return "truncated", data[: len(data) * 3 // 5]
    if u < edges[2]:
        return "garbage", b"\xff\xd8\xff\xe0" + rng.bytes(200)
    if u < edges[3]:
        return "empty", b""
    return "plain", render(spec, c, k)


def _write_class(job) -> dict:
    spec, counts, root, c = job
    folder = Path(root) / "train" / f"{c:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    kinds: dict = {}
    for k in range(counts[c]):
        kind, data = train_file(spec, counts, c, k)
        (folder / f"{k:04d}.jpg").write_bytes(data)
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _write_test(job) -> list[tuple[str, str]]:
    spec, root, start, stop = job
    rows = []
    for i in range(start, stop):
        rng = np.random.default_rng([spec.seed, 13, i])
        c = int(rng.integers(spec.classes))
        data = (b"\xff\xd8\xff\xe0" + rng.bytes(200) if rng.random() < spec.test_garbage_frac
                else render(spec, c, i, namespace=1))
        name = f"t{i:06d}.jpg"
        (Path(root) / "test" / name).write_bytes(data)
        rows.append((name, f"{c:04d}"))
    return rows


def generate(root, spec: Spec = Spec(), processes: int = 2) -> dict:
    """Write root/train, root/test, root/test_labels.csv and root/manifest.json (last: its presence with
    the same spec means the set is complete, and it is reused)."""
    root = Path(root)
    manifest = root / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["spec"] == asdict(spec):
        return json.loads(manifest.read_text())
    for sub in ("train", "test", "subsets"):
        shutil.rmtree(root / sub, ignore_errors=True)
    (root / "test").mkdir(parents=True)
    counts = class_counts(spec)
    t0 = time.perf_counter()
    kinds: dict = {}
    rows = []
    with Pool(processes) as pool:
        jobs = [(spec, counts, str(root), c) for c in range(spec.classes)]
        for k in tqdm(pool.imap_unordered(_write_class, jobs, chunksize=8), total=len(jobs),
                      desc="scale data: train classes", mininterval=2):
            for kind, n in k.items():
                kinds[kind] = kinds.get(kind, 0) + n
        chunks = [(spec, str(root), s, min(spec.test, s + 500)) for s in range(0, spec.test, 500)]
        for r in tqdm(pool.imap_unordered(_write_test, chunks), total=len(chunks),
                      desc="scale data: test", mininterval=2):
            rows += r
    (root / "test_labels.csv").write_text("image,label\n" + "".join(f"{n},{c}\n" for n, c in sorted(rows)))
    info = {"spec": asdict(spec), "train_files": int(counts.sum()), "test_files": spec.test,
            "per_class": {"max": int(counts.max()), "median": int(np.median(counts)), "min": int(counts.min())},
            "train_kinds": kinds, "seconds": round(time.perf_counter() - t0, 1)}
    manifest.write_text(json.dumps(info, indent=2))
    return info


def subset(root, spec: Spec, n_train: int) -> tuple[Path, Path, int, int]:
    """(train dir, test dir, train files, test files) of about n_train images (0 or >= all: the full
    set), hard-linked from the full set; the test set shrinks in proportion."""
    root = Path(root)
    counts = class_counts(spec)
    if n_train <= 0 or n_train >= counts.sum():
        return root / "train", root / "test", int(counts.sum()), spec.test
    frac = n_train / counts.sum()
    take = np.maximum(1, np.round(frac * counts)).astype(int)
    n_test = max(1, round(spec.test * frac))
    train, test = root / "subsets" / f"train-{n_train}", root / "subsets" / f"test-{n_train}"
    done = root / "subsets" / f"{n_train}.done"
    if not done.exists():
        shutil.rmtree(train, ignore_errors=True)
        shutil.rmtree(test, ignore_errors=True)
        for c in range(spec.classes):
            (train / f"{c:04d}").mkdir(parents=True)
            for k in range(take[c]):
                os.link(root / "train" / f"{c:04d}" / f"{k:04d}.jpg", train / f"{c:04d}" / f"{k:04d}.jpg")
        test.mkdir(parents=True)
        for i in range(n_test):
            os.link(root / "test" / f"t{i:06d}.jpg", test / f"t{i:06d}.jpg")
        done.write_text("")
    return train, test, int(take.sum()), n_test


# ============================================================================ the tiny backbone
TINY_512 = dict(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0, output_dim=512)


def save_tiny_backbone(path, seed: int = 0) -> Path:
    """Proxy format {config, visual} (../shared/models/README.md) of a random tiny ViT with a 512-d output.
    Attention and MLP input weights are scaled x4: with the default init the CLS token is nearly the mean
    patch embedding and every feature pair has cosine ~0.9 (7% of pairs above the noise stage's 0.98
    near-duplicate line); scaled, cosines spread like CLIP's (median ~0.4, same class ~0.67)."""
    import torch
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(seed)
    visual = VisionTransformer(**TINY_512)
    with torch.no_grad():
        for block in visual.transformer.resblocks:
            block.attn.in_proj_weight.mul_(4.0)
            block.mlp.c_fc.weight.mul_(4.0)
    torch.save({"config": dict(TINY_512), "visual": visual.state_dict()}, path)
    return Path(path)


# ============================================================================ measured runs
def _sampler(proc, seen: dict, timeline: list, peaks: dict, stop: threading.Event, every: float = 0.25) -> None:
    """Every `every` s: the process tree's CPU seconds so far (processes that ended keep their last
    sample) as (epoch time, CPU s) in `timeline`, and peak RSS of the tree (sum) and of its largest process."""
    import psutil
    try:
        top = psutil.Process(proc.pid)
    except psutil.Error:
        return
    while not stop.is_set():
        try:
            rss = []
            for p in [top] + top.children(recursive=True):
                try:
                    with p.oneshot():
                        t = p.cpu_times()
                        seen[p.pid] = t.user + t.system
                        rss.append(p.memory_info().rss)
                except psutil.Error:
                    pass
            timeline.append((time.time(), sum(seen.values())))
            peaks["tree_gib"] = max(peaks.get("tree_gib", 0.0), sum(rss) / 2**30)
            peaks["largest_process_gib"] = max(peaks.get("largest_process_gib", 0.0), max(rss, default=0) / 2**30)
        except psutil.Error:
            pass
        stop.wait(every)


def run_measured(cmd: list[str], log_file: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run cmd (in cwd) with its output in log_file: wall and CPU seconds, a CPU-time timeline of its
    process tree, sampled tree memory, the 1-min load average at start and end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    seen, timeline, peaks = {}, [], {}
    stop = threading.Event()
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env=dict(os.environ, PYTHON=sys.executable, **(env or {})))
        sampler = threading.Thread(target=_sampler, args=(proc, seen, timeline, peaks, stop), daemon=True)
        sampler.start()
        rc = proc.wait()
        stop.set()
        sampler.join()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}; see {log_file}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "cpu_per_wall": round(cpu / max(wall, 1e-9), 2),
            "sampled_peak_gib": {k: round(v, 3) for k, v in peaks.items()},
            "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)], "timeline": timeline}


def stage_cpu_seconds(timeline, stage_seconds: dict, end_time: float) -> dict:
    """CPU seconds of the whole process tree (main process + decoding workers) in each stage. The stages
    run back to back (resume.Timer) and end when train_report.json is written (its mtime, end_time), so
    their boundaries are counted back from there; the tree's CPU time is interpolated at each one."""
    t = np.array([p[0] for p in timeline])
    c = np.array([p[1] for p in timeline])
    out, stop = {}, end_time
    for name in reversed(list(stage_seconds)):
        start = stop - stage_seconds[name]
        out[name] = round(float(np.interp(stop, t, c) - np.interp(start, t, c)), 2)
        stop = start
    return dict(reversed(list(out.items())))


def code_commit(code: Path) -> str:
    """The commit the code was taken from: a snapshot's SNAPSHOT_OF file (`git archive` has no .git), or git."""
    marker = Path(code) / "SNAPSHOT_OF"
    if marker.exists():
        return marker.read_text().strip()
    out = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+uncommitted changes" if dirty else "")


def top1(submission: Path, labels_csv: Path) -> float:
    """Share of test rows whose prediction matches test_labels.csv (sanity only: random backbone)."""
    truth = dict(line.split(",") for line in labels_csv.read_text().splitlines()[1:])
    rows = [line.split(", ") for line in submission.read_text().splitlines()]
    return sum(truth.get(n) == p for n, p in rows) / max(1, len(rows))


def run_size(code: Path, data: Path, spec: Spec, n_train: int, runs: Path, weights: Path, epochs: int,
             extra: list[str], reports: Path, force: bool = False, threads: int = 1, workers: int | None = None,
             pin_core: int | None = None) -> dict:
    """run_train.sh + run_infer.sh on one subset; returns the numbers read from their reports (a copy of
    which goes to `reports`) and the CPU seconds per stage. `threads`: OMP_NUM_THREADS of the runs
    (0 = the product's own choice): on a shared machine, a multi-threaded stage whose threads wait for
    each other burns and loses time unevenly; one thread keeps per-stage CPU seconds comparable.
    `workers`: --num-workers of both commands (None: the product's); `pin_core`: run on that one core
    (taskset), so that stages which take every core (the noise stage) run on one thread too."""
    train_dir, test_dir, n_files, n_test = subset(data, spec, n_train)
    out = runs / f"n{n_files}"
    record = out / "scale_record.json"
    if record.exists() and not force:
        return json.loads(record.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pin = ["taskset", "-c", str(pin_core)] if pin_core is not None else []
    nw = ["--num-workers", str(workers)] if workers is not None else []
    train_cmd = [*pin, str(code / "run_train.sh"), str(train_dir), str(out), "--weights", str(weights),
                 "--allow-nonstandard-backbone", "--epochs", str(epochs), *nw, *extra]
    infer_cmd = [*pin, str(code / "run_infer.sh"), str(test_dir), str(out), *nw]
    print(f"scale: {n_files} train files, {n_test} test files -> {out}", flush=True)
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    # in the code's folder: `python -m app` takes the package from the working directory first
    m_train = run_measured(train_cmd, out / "train.log", env, cwd=code)
    m_infer = run_measured(infer_cmd, out / "infer.log", env, cwd=code)
    tr = json.loads((out / "train_report.json").read_text())
    inf = json.loads((out / "infer_report.json").read_text())
    stage_cpu = stage_cpu_seconds(m_train.pop("timeline"), tr["stage_seconds"],
                                  (out / "train_report.json").stat().st_mtime)
    infer_cpu = stage_cpu_seconds(m_infer.pop("timeline"), {"infer": inf["seconds"]},
                                  (out / "infer_report.json").stat().st_mtime)["infer"]
    result = {
        "train_files": n_files, "test_files": n_test,
        "images_used": tr["images"]["used"], "images_skipped": tr["images"]["skipped"],
        "trained_on": tr["images"]["trained_on"], "flags": tr["images"]["flags"], "classes": tr["classes"],
        "stage_seconds": tr["stage_seconds"], "stage_cpu_seconds": stage_cpu,
        "train_total_seconds": tr["total_seconds"], "train_total_cpu_seconds": round(sum(stage_cpu.values()), 2),
        "train_peak_rss_gib": tr["peak_rss_gib"], "train_process": m_train,
        "infer_seconds": inf["seconds"], "infer_cpu_seconds": infer_cpu, "infer_peak_rss_gib": inf["peak_rss_gib"],
        "infer_unreadable": len(inf["unreadable"]), "infer_process": m_infer,
        "test_top1_sanity": round(top1(out / "submission.csv", data / "test_labels.csv"), 4),
        "commands": [" ".join(train_cmd), " ".join(infer_cmd)],
        "warmup_epochs": len(tr.get("warmup_losses", [])), "finetune_epochs": epochs, "omp_threads": threads,
        "pinned_core": pin_core, "num_workers": workers if workers is not None else "product default",
        "torch_threads": tr.get("torch_threads"), "precision": tr.get("precision"),
        "code": str(code), "code_commit": code_commit(code),
    }
    record.write_text(json.dumps(result, indent=2))
    reports.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "train_report.json", reports / f"n{n_files}_train_report.json")
    shutil.copy(out / "infer_report.json", reports / f"n{n_files}_infer_report.json")
    return result


# ============================================================================ growth fit and report
def fit_exponent(n, t) -> tuple[float, float]:
    """(a, b) of t = a * N^b by least squares on log t = log a + b log N."""
    b, log_a = np.polyfit(np.log(np.asarray(n, float)), np.log(np.maximum(np.asarray(t, float), 1e-3)), 1)
    return float(math.exp(log_a)), float(b)


def growth_table(runs: list[dict]) -> dict:
    """Per stage: wall and CPU seconds at each size, t = a N^b fitted to each, local slopes, and whether
    the CPU seconds grow faster than N log N. N = images used (train stages) or test files (inference).
    The flag reads CPU seconds: on a shared machine they do not depend on what else runs."""
    runs = sorted(runs, key=lambda r: r["train_files"])
    n_train = [r["images_used"] for r in runs]
    series = {s: (n_train, [r["stage_seconds"].get(s, 0.0) for r in runs],
                  [r["stage_cpu_seconds"].get(s, 0.0) for r in runs]) for s in STAGES}
    series["train total"] = (n_train, [r["train_total_seconds"] for r in runs],
                             [r["train_total_cpu_seconds"] for r in runs])
    series["inference"] = ([r["test_files"] for r in runs], [r["infer_seconds"] for r in runs],
                           [r["infer_cpu_seconds"] for r in runs])
    series["train peak RSS (GiB)"] = (n_train, [r["train_peak_rss_gib"] for r in runs], None)
    table = {}
    for name, (n, wall, cpu) in series.items():
        row = {"n": n, "values": wall}
        for key, t in (("", wall), ("cpu_", cpu)):
            if t is None:
                continue
            a, b = fit_exponent(n, t)
            row[f"{key}a"], row[f"{key}b"] = a, round(b, 3)
            row[f"{key}local_slopes"] = [round(math.log(max(t[i + 1], 1e-3) / max(t[i], 1e-3))
                                               / math.log(n[i + 1] / n[i]), 3) for i in range(len(n) - 1)]
        if cpu is not None:
            row["cpu_values"] = cpu
        basis, b = (cpu, row["cpu_b"]) if cpu is not None else (wall, row["b"])
        row["faster_than_nlogn"] = bool("RSS" not in name and b > NLOGN_LIMIT and max(basis) >= MIN_SECONDS)
        table[name] = row
    return table


def plot(table: dict, runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for name, row in table.items():
        if "RSS" in name or max(row.get("cpu_values", row["values"])) < 0.5:
            continue
        n = np.asarray(row["n"], float)
        key = "cpu_" if "cpu_values" in row else ""
        line, = ax.plot(n, row[f"{key}values"], "o", label=f"{name}  b={row[f'{key}b']:.2f}")
        ax.plot(n, row[f"{key}a"] * n ** row[f"{key}b"], "-", color=line.get_color(), lw=1)
    n0, n1 = min(table["scan"]["n"]), max(table["scan"]["n"])
    ref = np.array([n0, n1], float)
    ax.plot(ref, 20 * (ref / n0), "k:", lw=1, label="slope 1 (linear)")
    ax.plot(ref, 20 * (ref * np.log(ref)) / (n0 * np.log(n0)), "k--", lw=1, label="N log N")
    ax.set(xscale="log", yscale="log", xlabel="images (train; test for inference)",
           ylabel="CPU seconds (process tree)", title="stage CPU seconds vs N, fitted t = a N^b")
    ax.legend(fontsize=7)
    n = [r["images_used"] for r in sorted(runs, key=lambda r: r["train_files"])]
    rs = sorted(runs, key=lambda r: r["train_files"])
    ax2.plot(n, [r["train_peak_rss_gib"] for r in rs], "o-", label="training process (VmHWM)")
    ax2.plot(n, [r["train_process"]["sampled_peak_gib"].get("tree_gib", 0) for r in rs], "s--",
             label="training tree: launcher + workers, sum of RSS (shared pages per process)")
    ax2.plot(n, [r["infer_peak_rss_gib"] for r in rs], "^-", label="inference process")
    ax2.axhline(6.0, color="r", ls=":", label="6 GiB bar")
    ax2.set(xscale="log", xlabel="train images", ylabel="GiB", title="peak memory", ylim=(0, None))
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0]}


def markdown(result: dict) -> str:
    runs = result["runs"]
    sizes = " | ".join(f"{r['images_used']:,}" for r in runs)
    lines = [f"CPU seconds of the process tree (main + decoding workers) per stage; wall seconds in brackets. "
             f"N = images used: {sizes} (inference: test files).", "",
             "| stage | " + " | ".join(f"N = {r['images_used']:,}" for r in runs)
             + " | b (CPU) | b (wall) | local slopes (CPU) |", "|---|" + "---|" * len(runs) + "---|---|---|"]
    for name, row in result["growth"].items():
        flag = " **(> N log N)**" if row["faster_than_nlogn"] else ""
        if "cpu_values" in row:
            cells = [f"{c:.1f} ({w:.1f})" for c, w in zip(row["cpu_values"], row["values"])]
            slopes = ", ".join(f"{x:.2f}" for x in row["cpu_local_slopes"])
            tail = f"{row['cpu_b']:.2f}{flag} | {row['b']:.2f} | {slopes}"
        else:
            cells = [f"{w:.2f}" for w in row["values"]]
            tail = f"{row['b']:.2f} | {row['b']:.2f} | {', '.join(f'{x:.2f}' for x in row['local_slopes'])}"
        label = (name if name != "inference"
                 else "inference (N = " + ", ".join(f"{x:,}" for x in row["n"]) + " test files)")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {tail} |")
    big = runs[-1]
    lines += ["", f"Peak memory of the training process at {big['images_used']:,} images: "
              f"**{big['train_peak_rss_gib']:.2f} GiB** (bar 6 GiB: {'met' if result['memory_ok'] else 'NOT met'});"
              f" whole training tree (launcher + decoding workers, sampled every 0.25 s): "
              f"{big['train_process']['sampled_peak_gib'].get('tree_gib', float('nan')):.2f} GiB.",
              "", "| train files | used | skipped | trained on | flags | wall s train / infer | CPU / wall (train) "
              "| load avg (start, end) | test top-1 (sanity, random backbone) |", "|---" * 9 + "|"]
    for r in runs:
        tp = r["train_process"]
        lines.append(f"| {r['train_files']:,} | {r['images_used']:,} | {r['images_skipped']} | {r['trained_on']:,} | "
                     f"{', '.join(f'{k} {v}' for k, v in r['flags'].items())} | {tp['wall_seconds']:.0f} / "
                     f"{r['infer_process']['wall_seconds']:.0f} | {tp['cpu_per_wall']:.2f} | "
                     f"{tp['loadavg_1min'][0]}, {tp['loadavg_1min'][1]} | {r['test_top1_sanity']:.4f} |")
    return "\n".join(lines) + "\n"


def report(out: Path = RESULTS) -> dict:
    runs = sorted(json.loads((out / "runs.json").read_text())["runs"], key=lambda r: r["train_files"])
    growth = growth_table(runs)
    result = {"machine": machine(), "runs": runs, "growth": growth,
              "faster_than_nlogn": [k for k, v in growth.items() if v["faster_than_nlogn"]],
              "memory_ok": runs[-1]["train_peak_rss_gib"] <= 6.0,
              "nlogn_limit": NLOGN_LIMIT, "min_seconds_to_flag": MIN_SECONDS}
    (out / "scale.json").write_text(json.dumps(result, indent=2))
    (out / "scale.md").write_text(markdown(result))
    plot(growth, runs, out / "scale.png")
    print(markdown(result))
    return result


def run_sizes(data: Path, spec: Spec, sizes, epochs: int, code: Path, out: Path, extra=(), force=False,
              threads: int = 1, workers: int | None = None, pin_core: int | None = None) -> list:
    """run_size for every size, smallest first; runs.json in `out` is rewritten after each."""
    out.mkdir(parents=True, exist_ok=True)
    weights = data / "tiny512.pt"
    if not weights.exists():
        save_tiny_backbone(weights)
    runs_file = out / "runs.json"
    done = json.loads(runs_file.read_text())["runs"] if runs_file.exists() else []
    for n in sorted(sizes, key=lambda v: v if v > 0 else float("inf")):
        r = run_size(code, data, spec, n, data / "runs", weights, epochs, list(extra), out / "reports", force,
                     threads, workers, pin_core)
        done = [d for d in done if d["train_files"] != r["train_files"]] + [r]
        runs_file.write_text(json.dumps({"machine": machine(), "spec": asdict(spec), "epochs": epochs,
                                         "runs": sorted(done, key=lambda d: d["train_files"])}, indent=2))
        print(f"scale: {r['train_files']} files: stages {r['stage_seconds']}, train peak "
              f"{r['train_peak_rss_gib']} GiB, infer {r['infer_seconds']} s", flush=True)
    return done


# ============================================================================ command line
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["data", "run", "report", "all"])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where the synthetic set lives (reused)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[15_000, 50_000, 0], help="train sizes; 0 = all")
    ap.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs of each run")
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose run_train.sh / run_infer.sh run")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (runs.json, scale.*)")
    ap.add_argument("--processes", type=int, default=2, help="processes for the data generator")
    ap.add_argument("--force", action="store_true", help="rerun sizes that have a record")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs (0: the product's choice)")
    ap.add_argument("--workers", type=int, help="--num-workers of train and infer (default: the product's)")
    ap.add_argument("--pin-core", type=int, help="run train and infer on this one core (taskset)")
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []      # after --: more run_train.sh options
    args = ap.parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])
    spec = Spec()
    if args.step in ("data", "run", "all"):
        info = generate(args.data, spec, args.processes)
        print(f"scale data: {info['train_files']:,} train files, {info['test_files']:,} test files in {args.data} "
              f"({info['train_kinds']})")
    if args.step in ("run", "all"):
        run_sizes(args.data, spec, args.sizes, args.epochs, args.code, args.out, extra, args.force, args.threads,
                  args.workers, args.pin_core)
    if args.step in ("report", "all"):
        report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
