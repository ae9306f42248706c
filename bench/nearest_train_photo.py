"""Diagnosis for issue 13: are held-out train photos closer to the training set than test photos?

For a run's validation split, the cosine of each held-out photo's nearest training photo (the split
and its byte-identical copies excluded from the pool), beside the same for every dev-test photo and
for 1,000 other training photos, in frozen backbone features. A near-duplicate leak would show as
held-out photos far closer than test photos. Reads the test photos, never their labels.

With --truth (diagnosis only), also whether that closeness explains why a run's held-out photos read
above the dev-test photos (estimate_gap's `shift`): the class-balanced top-1 of the run's model on its
held-out photos against their TRUE labels (off-topic ones left out) minus its dev-test top-1 (the
run's submission.csv against DATA/test_labels.csv), as is, with the held-out photos re-weighted to the
test photos' nearest-photo-cosine deciles (photo_shift.reweighted_to), and without the held-out photos
whose nearest training photo is above 0.95.

    python bench/nearest_train_photo.py --data ../shared/data/flowers102-noisy \
        --weights ../shared/models/proxy-vit-s8-64.pt --run OUT/recipe/seed2 [--run ...] \
        [--truth ../shared/data/flowers102-noisy/train_truth.csv]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.backbone import load_backbone  # noqa: E402
from app.data import ImageDataset, eval_transform  # noqa: E402
from app.runtime import batched_pass  # noqa: E402
from app.scan import scan_train_dir  # noqa: E402
from app.studies.make_noisy import read_truth  # noqa: E402


def features(backbone, paths, accelerator, desc, batch_size=256):
    """The frozen pass of app/features.py (L2-normalised visual features), uncached."""
    dataset = ImageDataset(paths, eval_transform(backbone.preprocess), backbone.config["image_size"])
    with torch.no_grad():
        return batched_pass(lambda x: F.normalize(backbone.visual(x), dim=-1), dataset, accelerator,
                            batch_size, 0, desc)[0]


def summary(nn):
    return {"n": int(len(nn)), "median": round(float(np.median(nn)), 3), "mean": round(float(nn.mean()), 3),
            "above_0.95": round(float((nn > 0.95).mean()), 3), "above_0.9": round(float((nn > 0.9).mean()), 3)}


def training_pool(train: pd.DataFrame, held: set) -> np.ndarray:
    """The photos a model trained with this split saw: not held out, and no byte copy of one."""
    held_hash = set(train.loc[train["path"].isin(held), "hash"])
    return ~train["hash"].isin(held_hash).to_numpy()


def shift_parts(run: Path, held_paths, nn_held, nn_test, test_names, truth: pd.DataFrame, data: Path,
                classes) -> dict:
    """The run's held-out-minus-dev-test top-1 (points): as is, re-weighted to the test photos'
    nearest-photo cosines, and without the held-out photos that have a near copy (cosine > 0.95)."""
    from bench.photo_shift import class_balanced, reweighted_to
    index = {c: i for i, c in enumerate(classes)}
    split = pd.read_csv(run / "validation_split.csv", dtype=str).set_index("path").loc[held_paths]
    true = truth.set_index("path").loc[held_paths]
    keep = (true["noise"] != "off_topic").to_numpy()
    y = true["true_label"].map(index).to_numpy()[keep].astype(int)          # off-topic (-1) left out
    right = (split["predicted"].to_numpy() == true["true_label"].to_numpy())[keep]
    labels = pd.read_csv(data / "test_labels.csv", dtype=str).set_index("image")["label"]
    submitted = pd.read_csv(run / "submission.csv", header=None, names=["image", "label"], dtype=str,
                            skipinitialspace=True).set_index("image")["label"]
    test_rows = np.flatnonzero(np.isin(test_names, labels.index))
    names = np.asarray(test_names)[test_rows]
    test = class_balanced(submitted.loc[names].to_numpy() == labels.loc[names].to_numpy(),
                          labels.loc[names].map(index).to_numpy(), len(classes))
    near = nn_held[keep] > 0.95
    held_out = class_balanced(right, y, len(classes))
    return {"held_out_true_top1": round(100 * held_out, 2), "dev_test_top1": round(100 * test, 2),
            "shift_points": round(100 * (held_out - test), 2),
            "shift_reweighted_to_test_cosines_points": round(
                100 * (reweighted_to(nn_held[keep], nn_test[test_rows], right, y, len(classes)) - test), 2),
            "shift_without_near_copies_points": round(
                100 * (class_balanced(right[~near], y[~near], len(classes)) - test), 2),
            "held_out_with_near_copy": round(float(near.mean()), 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder with train/ and test/ (+ test_list.txt)")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--run", nargs="+", required=True, help="run folders holding validation_split.csv")
    ap.add_argument("--out", help="JSON file for the figures")
    ap.add_argument("--truth", help="train_truth.csv: also the runs' held-out-minus-dev-test top-1 (diagnosis)")
    a = ap.parse_args()
    data = Path(a.data)
    backbone = load_backbone({"weights": a.weights, "allow_nonstandard": True})
    backbone.visual.eval()
    accelerator = Accelerator()
    classes, train, _ = scan_train_dir(data / "train")     # the files training reads, with their hashes
    test = sorted(p for p in (data / "test").iterdir() if p.is_file())
    f_train = features(backbone, [data / "train" / p for p in train["path"]], accelerator, "train photos")
    f_test = features(backbone, test, accelerator, "test photos")
    truth = read_truth(a.truth) if a.truth else None
    result = {}
    for run in a.run:
        held = set(pd.read_csv(Path(run) / "validation_split.csv")["path"])
        pool = training_pool(train, held)
        held_rows = np.flatnonzero(train["path"].isin(held).to_numpy())
        pool_rows = np.flatnonzero(pool)
        others = np.random.default_rng(0).choice(pool_rows, min(1000, len(pool_rows)), replace=False)
        s_others = f_train[others] @ f_train[pool_rows].T
        same = train["hash"].to_numpy()[others][:, None] == train["hash"].to_numpy()[pool_rows][None, :]
        s_others[same] = -1  # itself and its copies
        nn_held, nn_test = (f_train[held_rows] @ f_train[pool_rows].T).max(1), (f_test @ f_train[pool_rows].T).max(1)
        result[run] = {"held_out": summary(nn_held), "test": summary(nn_test), "other_train": summary(s_others.max(1))}
        if truth is not None:
            result[run]["shift"] = shift_parts(Path(run), train["path"].to_numpy()[held_rows], nn_held, nn_test,
                                               [p.name for p in test], truth, data, classes)
        print(run, json.dumps(result[run]))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
