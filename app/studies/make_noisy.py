"""Make a competition-like noisy training set, with its truth file, from any clean class-folder dataset.

    python -m app make-noisy CLEAN_DIR OUT_DIR --symmetric 0.1 --pair 0.15 --off-topic DIR 0.08 \\
        --duplicates 0.02 --imbalance 20 --seed 0

Input: CLEAN_DIR/<class>/<image files>; the class folder names are kept verbatim as labels.
Noise model, applied in this order with one seeded generator (same inputs + seed => same output):
  imbalance   classes are put in a seeded random order (the largest class moved first) and subsampled to
              an exponential long tail n_max * RATIO**(-rank/(C-1)): the first keeps all its images, the
              last about n_max/RATIO, each class at least 1 (and never more than it has).
  pair        a fraction of the kept images gets the label of its class's fixed partner ("confusable").
              Partners are a seeded random pairing of the classes (a 3-cycle when C is odd): the tool
              cannot know which classes really look alike, so the pairing stands in for that.
  symmetric   a disjoint fraction of the kept images gets a uniformly random other label. One kept
              image per class is never relabelled, so every class keeps a correctly labelled example.
  duplicates  byte-identical copies of clean images filed under a second, different class
              (noise "duplicate_other_class"; the original stays as a clean image).
  off-topic   images found recursively in DIR filed under random classes (true label -1); count =
              FRAC x kept images, drawn without replacement when DIR has enough, else with replacement.
Fractions are of the kept in-class images. Output, in the layout of flowers102-noisy:
  OUT_DIR/train/<class>/<16 random hex>.<original extension>   (hard links when possible, else copies)
  OUT_DIR/train_truth.csv   path,given_label,true_label,noise   (noise: clean, confusable, symmetric,
                            off_topic, duplicate_other_class, the benchmark's names)
  OUT_DIR/stats.json        counts per noise kind, per-class max/median/min, the arguments, the seed.
"""
import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def _images(folder: Path, recursive: bool = False) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _partners(classes: list[int], rng) -> dict[int, int]:
    """Seeded random pairing a<->b; with an odd count the last three form a cycle a->b->c->a."""
    c = [int(x) for x in rng.permutation(classes)]
    groups = [c[i:i + 2] for i in range(0, len(c) - 3 if len(c) % 2 else len(c), 2)]
    if len(c) % 2:
        groups.append(c[-3:])
    return {g[i]: g[(i + 1) % len(g)] for g in groups for i in range(len(g))}


def read_truth(truth_csv) -> pd.DataFrame:
    """A truth file (this tool's, or flowers102-noisy's) with `path` as the run tables name an image,
    <class>/<file> under the train folder (the file says train/<class>/<file>)."""
    truth = pd.read_csv(truth_csv, dtype=str, keep_default_na=False)
    truth["path"] = truth["path"].map(truth_key)
    return truth


def truth_key(path) -> str:
    """<class>/<file>: the last two parts of any path to a train image."""
    return "/".join(str(path).replace("\\", "/").split("/")[-2:])


def _summary(counts) -> list[int]:
    counts = np.asarray(counts)
    return [int(counts.max()), int(np.median(counts)), int(counts.min())]


def make_noisy(clean_dir, out_dir, symmetric=0.1, pair=0.15, off_topic_dir=None, off_topic_frac=0.0,
               duplicates=0.02, imbalance=1.0, seed=0) -> dict:
    clean, out = Path(clean_dir), Path(out_dir)
    if not clean.is_dir():
        raise ValueError(f"clean dataset folder not found: {clean}")
    for name, v in [("symmetric", symmetric), ("pair", pair), ("off-topic", off_topic_frac),
                    ("duplicates", duplicates)]:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"--{name} must be a fraction in [0, 1], got {v}")
    if symmetric + pair > 1.0:
        raise ValueError(f"--symmetric + --pair must be <= 1 (disjoint sets of images), got {symmetric + pair}")
    if imbalance < 1.0:
        raise ValueError(f"--imbalance is a max/min count ratio and must be >= 1, got {imbalance}")
    if (out / "train").exists():
        raise ValueError(f"{out / 'train'} already exists: choose a new output folder")
    classes = sorted(p.name for p in clean.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{clean} needs at least 2 class folders, found {len(classes)}")
    per_class = {c: _images(clean / c) for c in classes}
    empty = [c for c, f in per_class.items() if not f]
    if empty:
        raise ValueError(f"class folders without images in {clean}: {empty[:5]}")
    off_files = []
    if off_topic_frac > 0:
        if off_topic_dir is None or not Path(off_topic_dir).is_dir():
            raise ValueError(f"off-topic folder not found: {off_topic_dir}")
        off_files = _images(Path(off_topic_dir), recursive=True)
        if not off_files:
            raise ValueError(f"no images (jpg/jpeg/png/webp/bmp) under the off-topic folder {off_topic_dir}")
    rng = np.random.default_rng(seed)
    C = len(classes)

    # imbalance: exponential long tail over a seeded class order, the largest class first and kept whole
    order = [int(i) for i in rng.permutation(C)]
    order.insert(0, order.pop(int(np.argmax([len(per_class[classes[i]]) for i in order]))))
    n_max = max(len(f) for f in per_class.values())
    src, true = [], []
    for rank, ci in enumerate(order):
        files = per_class[classes[ci]]
        keep = max(1, min(len(files), round(n_max * float(imbalance) ** (-rank / (C - 1)))))
        for j in sorted(rng.choice(len(files), keep, replace=False)):
            src.append(files[j])
            true.append(ci)
    true = np.array(true)
    n = len(true)

    # pair and symmetric label noise: disjoint random subsets of the kept images, except one clean
    # anchor image per class (so no class folder ends up empty or without a correct example)
    partner = _partners(list(range(C)), rng)
    given, noise = true.copy(), np.array(["clean"] * n, dtype=object)
    perm = rng.permutation(np.setdiff1d(np.arange(n), np.unique(true, return_index=True)[1]))
    n_pair = min(round(pair * n), len(perm))
    n_sym = min(round(symmetric * n), len(perm) - n_pair)
    ip, isym = perm[:n_pair], perm[n_pair:n_pair + n_sym]
    given[ip] = [partner[int(t)] for t in true[ip]]
    noise[ip] = "confusable"
    given[isym] = (true[isym] + rng.integers(1, C, len(isym))) % C
    noise[isym] = "symmetric"

    # duplicates of clean images under another class; off-topic images under random classes
    clean_idx = np.flatnonzero(noise == "clean")
    dup = rng.choice(clean_idx, min(round(duplicates * n), len(clean_idx)), replace=False)
    n_off = round(off_topic_frac * n) if off_files else 0
    off = rng.choice(len(off_files), n_off, replace=n_off > len(off_files)) if n_off else []
    src += [src[i] for i in dup] + [off_files[i] for i in off]
    given = np.r_[given, (true[dup] + rng.integers(1, C, len(dup))) % C, rng.integers(0, C, n_off)]
    true = np.r_[true, true[dup], np.full(n_off, -1)]
    noise = np.r_[noise, ["duplicate_other_class"] * len(dup), ["off_topic"] * n_off]

    # random names (nothing in a name leaks the class), then copy
    names, seen = [], set()
    while len(names) < len(src):
        h = rng.bytes(8).hex()
        if h not in seen:
            seen.add(h)
            names.append(h)
    rel = [f"train/{classes[g]}/{nm}{s.suffix}" for g, nm, s in zip(given, names, src)]
    for c in classes:
        (out / "train" / c).mkdir(parents=True, exist_ok=True)
    for s, r in tqdm(list(zip(src, rel)), desc="make-noisy: copying", unit="file", mininterval=1):
        try:
            os.link(s, out / r)
        except OSError:
            shutil.copy2(s, out / r)
    truth = pd.DataFrame({"path": rel, "given_label": [classes[g] for g in given],
                          "true_label": [classes[t] if t >= 0 else "-1" for t in true], "noise": noise})
    truth.sort_values("path").to_csv(out / "train_truth.csv", index=False)

    kinds = ["clean", "confusable", "symmetric", "off_topic", "duplicate_other_class"]
    stats = {
        "classes": C,
        "train_images": len(truth),
        "noise_kinds": {k: int((truth["noise"] == k).sum()) for k in kinds},
        "noisy_fraction": round(float((truth["noise"] != "clean").mean()), 4),
        "train_per_class_max_median_min": _summary(truth["given_label"].value_counts().reindex(classes, fill_value=0)),
        "kept_per_class_max_median_min": _summary(np.bincount(true[:n], minlength=C)),
        "pair_partners": {classes[a]: classes[b] for a, b in sorted(partner.items())},
        "arguments": {"clean_dir": str(clean), "out_dir": str(out), "symmetric": symmetric, "pair": pair,
                      "off_topic_dir": None if off_topic_dir is None else str(off_topic_dir),
                      "off_topic_frac": off_topic_frac, "duplicates": duplicates, "imbalance": imbalance},
        "seed": seed,
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("clean_dir", help="clean dataset: CLEAN_DIR/<class>/<images>")
    p.add_argument("out_dir", help="new folder for train/, train_truth.csv, stats.json")
    p.add_argument("--symmetric", type=float, default=0.1, metavar="FRAC",
                   help="fraction relabelled to a uniformly random other class (default 0.1)")
    p.add_argument("--pair", type=float, default=0.15, metavar="FRAC",
                   help="fraction relabelled to the class's partner in a seeded random pairing (default 0.15)")
    p.add_argument("--off-topic", nargs=2, metavar=("DIR", "FRAC"),
                   help="add FRAC x kept images drawn from the images under DIR, under random classes")
    p.add_argument("--duplicates", type=float, default=0.02, metavar="FRAC",
                   help="byte-identical copies of clean images under a second class (default 0.02)")
    p.add_argument("--imbalance", type=float, default=1.0, metavar="RATIO",
                   help="max/min class-count ratio of an exponential long tail (default 1: no subsampling)")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> dict:
    off_dir, off_frac = None, 0.0
    if args.off_topic:
        off_dir = args.off_topic[0]
        try:
            off_frac = float(args.off_topic[1])
        except ValueError:
            raise ValueError(f"--off-topic DIR FRAC: FRAC must be a number, got {args.off_topic[1]!r}") from None
    stats = make_noisy(args.clean_dir, args.out_dir, args.symmetric, args.pair, off_dir, off_frac,
                       args.duplicates, args.imbalance, args.seed)
    print(json.dumps(stats["noise_kinds"]), "->", Path(args.out_dir) / "train_truth.csv")
    return stats
