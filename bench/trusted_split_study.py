"""How to draw and score the validation split (issue 13): which estimates a model's clean,
class-balanced top-1 best? Cheap and offline: frozen-feature linear probes (the head warmup, app/warmup.py) on a
finished run's cached features and noise scores; the reference is a stratified 15% of the truly
clean train images (truth file) held out of everything. The test split is never read.

    python bench/trusted_split_study.py --run OUT_DIR --truth DATA/train_truth.csv [--draws 10]

OUT_DIR: a training (or audit) run with work/scan.csv, work/noise.csv and its features cache.
Rules, each drawn per_class images per class from the images outside the reference:
  top_score      the highest clean scores (where the frozen features already agree with the label)
  posterior      in proportion to the clean posterior, among every image but dropped duplicate copies
  kept_uniform   uniformly among the clean-held images (weight > 0), scored plainly: the first design
  weighted       app.validation (the product's): uniformly among all the class's images, scored by
                 validation.estimate_top1 (clean score over class mean score, pooled); the same
                 draw also scored by the alternatives it was chosen among: weighted_class_ratio
                 (per-class sum(score x right) / sum(score)), weighted_pooled (score only),
                 weighted_known (per-class mean(score x right) / class mean score)
  noisy_random   as many images uniformly from all, scored against their given labels (what teams did)
Every rule draws from the same pool; three probes per draw (noise-weighted, 60 epochs; unweighted,
60 epochs; noise-weighted, 4 epochs) are trained on what no rule took. Prints each rule's error against the reference (points), its spread,
and how often it orders the three probes as the reference does.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.studies.make_noisy import read_truth  # noqa: E402
from app.model import log_class_prior  # noqa: E402
from app.validation import class_mean_scores, estimate_top1, validation_split  # noqa: E402
from app.warmup import train_head  # noqa: E402
from bench.audit_run import load_audit  # noqa: E402

WARMUP = {"epochs": 60, "batch_size": 512, "lr": 0.01, "weight_decay": 1e-4}
PROBES = {"noise_weighted": (True, 60), "unweighted": (False, 60), "noise_weighted_4ep": (True, 4)}


def load(run: Path, truth_csv: Path):
    images, feats, _ = load_audit(run)
    truth = read_truth(truth_csv)
    clean = images[["path"]].merge(truth, on="path", how="left")["noise"].eq("clean").to_numpy()
    return images, feats, clean


def draw(rule: str, images: pd.DataFrame, pool: np.ndarray, per_class: int, rng, seed: int) -> np.ndarray:
    labels, rows = images["label"].to_numpy(), np.flatnonzero(pool)
    if rule == "weighted":
        vcfg = {"per_class": per_class, "max_class_share": 1.0, "max_fraction": 1.0}
        return rows[validation_split(labels[rows], labels.max() + 1, vcfg, seed)]
    score = images["clean_score"].to_numpy(float)
    kept = images["weight"].to_numpy(float) > 0
    chosen = []
    for c in np.unique(labels[rows]):
        members = rows[labels[rows] == c]
        if rule == "top_score":
            chosen.append(members[np.argsort(-score[members], kind="stable")[:per_class]])
        elif rule == "kept_uniform":
            chosen.append(rng.choice(members[kept[members]], min(per_class, int(kept[members].sum())), replace=False))
        else:                                                             # posterior
            p = np.where(images["flag"].to_numpy()[members] == "duplicate", 0.0, score[members])
            chosen.append(rng.choice(members, min(per_class, int((p > 0).sum())), replace=False, p=p / p.sum()))
    return np.concatenate(chosen)


def product(correct, labels, score, class_mean_score) -> float:
    """app.validation.estimate_top1: u = score / (count in the split x class mean score), sum(u x right) / sum(u)."""
    return estimate_top1(correct, labels, score, class_mean_score)[0]


def class_ratio(correct, labels, score, class_mean_score) -> float:
    """Per class sum(score x right) / sum(score), mean over the classes (commit 83da1a1; a class's
    only image: its weight cancels)."""
    frame = pd.DataFrame({"label": labels, "hit": score * correct, "w": score}).groupby("label").sum()
    frame = frame[frame["w"] > 0]
    return float((frame["hit"] / frame["w"]).mean())


def pooled_ratio(correct, labels, score, class_mean_score) -> float:
    """sum(u x right) / sum(u), u = score / (count in the split): classes weighed by how clean they are."""
    u = score / np.bincount(labels)[labels]
    return float(np.sum(u * correct) / np.sum(u))


def known_mean(correct, labels, score, class_mean_score) -> float:
    """Per class mean(score x right) / the class's mean score, mean over the classes."""
    return float(pd.Series(score * correct / class_mean_score[labels]).groupby(labels).mean().mean())


# ways to score the "weighted" draw: the product's first, then the alternatives it was chosen among
WEIGHTED_SCORINGS = {"weighted": product, "weighted_class_ratio": class_ratio, "weighted_pooled": pooled_ratio,
                     "weighted_known": known_mean}


def balanced_top1(correct, labels, rows) -> float:
    return float(np.mean([correct[rows][labels[rows] == c].mean() for c in np.unique(labels[rows])]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--truth", required=True, type=Path)
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    images, feats, clean = load(args.run, args.truth)
    labels, num_classes = images["label"].to_numpy(), images["label"].max() + 1
    score = images["clean_score"].to_numpy(float)
    class_mean_score = class_mean_scores(labels, score)        # over every image: what the product divides by
    rows = []
    for d in range(args.draws):
        rng = np.random.default_rng(100 + d)
        reference = np.concatenate([rng.choice(m, max(1, int(0.15 * len(m))), replace=False)
                                    for c in range(num_classes) if len(m := np.flatnonzero((labels == c) & clean))])
        pool = np.ones(len(labels), bool)
        pool[reference] = False
        # every rule draws from the same pool (their splits may overlap); all of them are held out
        splits = {rule: draw(rule, images, pool, args.per_class, rng, seed=d)
                  for rule in ("top_score", "posterior", "kept_uniform", "weighted")}
        splits["noisy_random"] = rng.choice(np.flatnonzero(pool), len(splits["weighted"]), replace=False)
        avail = pool.copy()
        avail[np.concatenate(list(splits.values()))] = False
        for probe, (weighted, epochs) in PROBES.items():
            w = images["weight"].to_numpy(float) if weighted else np.ones(len(labels))
            train = avail & (w > 0)
            prior = log_class_prior(torch.from_numpy(np.bincount(labels[train], weights=w[train], minlength=num_classes)))
            head_w, head_b, _ = train_head(feats[train], labels[train], w[train], prior, {**WARMUP, "epochs": epochs},
                                           d, show_progress=False)
            correct = (torch.from_numpy(feats) @ head_w.T + head_b).argmax(1).numpy() == labels   # tau = 1
            result = {"draw": d, "probe": probe, "reference": balanced_top1(correct, labels, reference)}
            for rule, split in splits.items():
                if rule == "weighted":
                    for name, scoring in WEIGHTED_SCORINGS.items():
                        result[name] = scoring(correct[split], labels[split], score[split], class_mean_score)
                        result[f"{name}_truly_clean"] = clean[split].mean()
                    continue
                result[rule] = correct[split].mean() if rule == "noisy_random" else balanced_top1(correct, labels, split)
                result[f"{rule}_truly_clean"] = clean[split].mean()
            rows.append(result)
    df = pd.DataFrame(rows)
    rules = [r for r in splits if r != "weighted"] + list(WEIGHTED_SCORINGS)
    errors = pd.DataFrame({rule: 100 * (df[rule] - df["reference"]) for rule in rules}).assign(probe=df["probe"])
    print(f"{args.draws} draws x {len(PROBES)} probes, {args.per_class} per class; reference top-1 by probe: "
          + ", ".join(f"{p} {100 * v:.1f}%" for p, v in df.groupby("probe", sort=False)["reference"].mean().items()))
    print("\nerror against the reference, points (mean / sd over draws):")
    print(errors.groupby("probe", sort=False).agg(["mean", "std"]).round(2).T.to_string())
    print("\nMAE over all:", errors[rules].abs().mean().round(2).to_dict())
    print("share of truly clean images:", {r: round(df[f"{r}_truly_clean"].mean(), 3) for r in rules})
    order = list(PROBES)
    for rule in ["reference", *rules]:
        table = df.pivot(index="draw", columns="probe", values=rule)[order]
        same = (table.rank(axis=1).to_numpy() == df.pivot(index="draw", columns="probe", values="reference")[order]
                .rank(axis=1).to_numpy()).all(1).mean()
        print(f"{rule}: orders the probes as the reference does in {same:.0%} of draws")


if __name__ == "__main__":
    main()
