"""Diagnosis for issue 13: are held-out train photos closer to the training set than test photos?

For a run's validation split, the cosine of each held-out photo's nearest training photo (the split
and its byte-identical copies excluded from the pool), beside the same for every dev-test photo and
for 1,000 other training photos, in frozen backbone features. A near-duplicate leak would show as
held-out photos far closer than test photos. Reads the test photos, never their labels.

    python bench/nearest_train_photo.py --data ../shared/data/flowers102-noisy \
        --weights ../shared/models/proxy-vit-s8-64.pt --run OUT/recipe/seed2 [--run ...]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder with train/ and test/ (+ test_list.txt)")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--run", nargs="+", required=True, help="run folders holding validation_split.csv")
    ap.add_argument("--out", help="JSON file for the figures")
    a = ap.parse_args()
    data = Path(a.data)
    backbone = load_backbone({"weights": a.weights, "allow_nonstandard": True})
    backbone.visual.eval()
    accelerator = Accelerator()
    _, train, _ = scan_train_dir(data / "train")           # the files training reads, with their hashes
    test = sorted(p for p in (data / "test").iterdir() if p.is_file())
    f_train = features(backbone, [data / "train" / p for p in train["path"]], accelerator, "train photos")
    f_test = features(backbone, test, accelerator, "test photos")
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
        result[run] = {"held_out": summary((f_train[held_rows] @ f_train[pool_rows].T).max(1)),
                       "test": summary((f_test @ f_train[pool_rows].T).max(1)),
                       "other_train": summary(s_others.max(1))}
        print(run, json.dumps(result[run]))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
