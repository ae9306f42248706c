"""TECH_REPORT.md section 4.5, the photos' part: training against test photos (+0.7 point).

Are a dataset's training photos easier than its test photos?

The estimate of the test top-1 is computed from held-out TRAINING photos; if those are easier than
the test photos, no figure of the training set can see it. This study measures that part alone, with
no label noise and no model luck in it: the truly clean training photos (truth file) with their TRUE
labels, a frozen linear probe (the product's head warmup, app.warmup.train_head, on the frozen
backbone features) cross-fitted over K folds, so every clean training photo is predicted by a probe
that saw neither it nor a byte copy of it, and every test photo by each fold's probe.

    shift = class-balanced top-1 on the held-out clean training photos
          - class-balanced top-1 on the test photos (the same probes)

with a 95% bootstrap interval (photos resampled within each class, both sets). Beside it, the
nearest-training-photo cosine of both sets (each fold's pool: what its probe was fitted on), and the
shift left once the training photos are re-weighted to the test photos' distribution of that cosine
(deciles): how much of the shift is test photos having fewer close siblings among the training photos.
Reads the truth file and the test labels: a diagnosis, never an input of the estimator.

    python bench/photo_shift.py --data ../shared/data/flowers102-noisy \
        --weights ../shared/models/proxy-vit-s8-64.pt --out bench/results/photo_shift/flowers.json
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accelerate import Accelerator  # noqa: E402

from app.backbone import load_backbone  # noqa: E402
from app.config import load_config  # noqa: E402
from app.data import ImageDataset, eval_transform  # noqa: E402
from app.model import log_class_prior  # noqa: E402
from app.report import write_json  # noqa: E402
from app.runtime import batched_pass  # noqa: E402
from app.scan import scan_train_dir  # noqa: E402
from app.studies.make_noisy import read_truth  # noqa: E402
from app.warmup import train_head  # noqa: E402



def features(backbone, paths, accelerator, desc, batch_size=256):
    """The frozen pass of app/features.py (L2-normalised visual features), uncached."""
    dataset = ImageDataset(paths, eval_transform(backbone.preprocess), backbone.config["image_size"])
    with torch.no_grad():
        return batched_pass(lambda x: F.normalize(backbone.visual(x), dim=-1), dataset, accelerator,
                            batch_size, 0, desc)[0]

def class_balanced(right: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean over the classes present of the class's top-1."""
    sums = np.bincount(labels, weights=right.astype(float), minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    return float((sums[counts > 0] / counts[counts > 0]).mean())


def folds_by_hash(hashes: np.ndarray, labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold of every photo: byte copies (in any class) in one fold, the fold of their first row; each
    class's photos dealt round-robin over the folds in a random order."""
    rng = np.random.default_rng(seed)
    first = pd.Series(np.arange(len(hashes))).groupby(hashes).transform("min").to_numpy()
    groups = rng.permutation(np.unique(first))
    groups = groups[np.argsort(labels[groups], kind="stable")]       # by class, random within
    rank = pd.Series(labels[groups]).groupby(labels[groups]).cumcount().to_numpy()
    fold_of = dict(zip(groups, rank % k))
    return np.array([fold_of[g] for g in first])


def cross_fitted(f_train, y_train, fold, f_test, y_test, num_classes, wcfg, seed):
    """(right of every train photo by the probe not fitted on its fold, right of every test photo by
    each fold's probe [k x n_test], nearest pool-photo cosine of the same)."""
    right_train = np.zeros(len(y_train), dtype=bool)
    nn_train = np.zeros(len(y_train))
    right_test, nn_test = [], []
    for k in np.unique(fold):
        pool, out = fold != k, fold == k
        counts = torch.bincount(torch.as_tensor(y_train[pool]), minlength=num_classes)
        w, b, _ = train_head(f_train[pool], y_train[pool], np.ones(pool.sum()), log_class_prior(counts),
                             wcfg, seed + int(k), show_progress=False)
        predict = lambda f: (torch.as_tensor(f) @ w.T + b).argmax(1).numpy()   # noqa: E731 - balanced: no prior
        right_train[out] = predict(f_train[out]) == y_train[out]
        nn_train[out] = (f_train[out] @ f_train[pool].T).max(1)
        right_test.append(predict(f_test) == y_test)
        nn_test.append((f_test @ f_train[pool].T).max(1))
    return right_train, np.stack(right_test), nn_train, np.stack(nn_test)


def reweighted_to(nn_train, nn_test, right_train, y_train, num_classes, bins=10) -> float:
    """Class-balanced top-1 of the train photos with each weighted by (test share / train share) of its
    nearest-photo-cosine decile (deciles of the test photos' cosines)."""
    edges = np.quantile(nn_test, np.linspace(0, 1, bins + 1)[1:-1])
    b_train, b_test = np.digitize(nn_train, edges), np.digitize(nn_test, edges)
    share_test = np.bincount(b_test, minlength=bins) / len(b_test)
    share_train = np.bincount(b_train, minlength=bins) / len(b_train)
    w = share_test[b_train] / np.maximum(share_train[b_train], 1e-12)
    sums = np.bincount(y_train, weights=w * right_train, minlength=num_classes)
    norms = np.bincount(y_train, weights=w, minlength=num_classes)
    return float((sums[norms > 0] / norms[norms > 0]).mean())


def bootstrap_shift(right_train, y_train, right_test, y_test, num_classes, draws, seed):
    """95% interval of the shift, photos resampled within each class in both sets."""
    rng = np.random.default_rng(seed)
    by_class_train = [np.flatnonzero(y_train == c) for c in range(num_classes)]
    by_class_test = [np.flatnonzero(y_test == c) for c in range(num_classes)]
    mean_test = right_test.mean(0)              # each test photo: right by how many fold probes
    out = []
    for _ in range(draws):
        tr = np.concatenate([rng.choice(r, len(r)) for r in by_class_train if len(r)])
        te = np.concatenate([rng.choice(r, len(r)) for r in by_class_test if len(r)])
        out.append(class_balanced(right_train[tr], y_train[tr], num_classes)
                   - class_balanced(mean_test[te], y_test[te], num_classes))
    return [float(np.quantile(out, 0.025)), float(np.quantile(out, 0.975))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder with train/, test/, test_labels.csv")
    ap.add_argument("--truth", help="truth file (default DATA/train_truth.csv)")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--out", required=True, help="JSON file for the figures")
    ap.add_argument("--cache", help="NPZ file for the frozen features (written once, then reused)")
    a = ap.parse_args()
    data = Path(a.data)
    classes, train, _ = scan_train_dir(data / "train")
    truth = read_truth(a.truth or data / "train_truth.csv").set_index("path")
    train = train[train["path"].isin(truth.index)]
    clean = train[(truth.loc[train["path"], "noise"] == "clean").to_numpy()].reset_index(drop=True)
    index = {c: i for i, c in enumerate(classes)}
    y_train = truth.loc[clean["path"], "true_label"].map(index).to_numpy()
    test = pd.read_csv(data / "test_labels.csv", dtype=str)
    y_test = test["label"].map(index).to_numpy()

    if a.cache and Path(a.cache).exists():                # the frozen pass of an earlier run
        f_train, f_test = (np.load(a.cache)[k] for k in ("train", "test"))
    else:
        backbone = load_backbone({"weights": a.weights, "allow_nonstandard": True})
        backbone.visual.eval()
        accelerator = Accelerator()
        f_train = features(backbone, [data / "train" / p for p in clean["path"]], accelerator, "clean train photos")
        f_test = features(backbone, [data / "test" / n for n in test["image"]], accelerator, "test photos")
        if a.cache:
            np.savez(a.cache, train=f_train, test=f_test)
    fold = folds_by_hash(clean["hash"].to_numpy(), y_train, a.folds, a.seed)
    wcfg = load_config(None)["warmup"]
    right_train, right_test, nn_train, nn_test = cross_fitted(f_train, y_train, fold, f_test, y_test,
                                                              len(classes), wcfg, a.seed)
    held = class_balanced(right_train, y_train, len(classes))
    on_test = float(np.mean([class_balanced(r, y_test, len(classes)) for r in right_test]))
    matched = reweighted_to(nn_train, nn_test.ravel(), right_train, y_train, len(classes))
    result = {
        "what": __doc__.split("\n\n")[0],
        "data": str(data), "weights": str(a.weights), "folds": a.folds, "seed": a.seed,
        "clean_train_photos": int(len(clean)), "test_photos": int(len(test)),
        "held_out_train_top1": round(held, 4), "test_top1": round(on_test, 4),
        "shift_points": round(100 * (held - on_test), 2),
        "shift_interval95_points": [round(100 * x, 2) for x in
                                    bootstrap_shift(right_train, y_train, right_test, y_test, len(classes),
                                                    a.bootstrap, a.seed)],
        "nearest_train_photo_cosine_median": {"held_out_train": round(float(np.median(nn_train)), 4),
                                              "test": round(float(np.median(nn_test)), 4)},
        "held_out_train_top1_at_test_cosines": round(matched, 4),
        "shift_left_at_test_cosines_points": round(100 * (matched - on_test), 2),
    }
    print(json.dumps(result, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)


if __name__ == "__main__":
    main()
