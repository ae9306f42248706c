"""What the studies read from an audit or training run (`python -m app audit TRAIN OUT`): its scored
images and their cached frozen features, aligned as app.train.prepare aligns them."""
import json
from pathlib import Path

import numpy as np
import pandas as pd


def load_audit(run: Path) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """(images: work/scan.csv's rows the feature pass decoded, with work/noise.csv's columns beside
    them, row for row; their frozen features from the run's cache, float32; the class list). The
    files that could not be decoded are in scan.csv but have no noise score: they are left out here
    as training leaves them out."""
    images = pd.read_csv(run / "work" / "scan.csv", dtype={"path": str, "hash": str})
    (cache,) = (run / "cache").glob("features-*")
    index = pd.read_csv(cache / "index.csv", dtype={"hash": str})
    row = images["hash"].map(dict(zip(index["hash"], range(len(index))))).to_numpy()
    ok = index["ok"].to_numpy(bool)[row]
    noise = pd.read_csv(run / "work" / "noise.csv")
    images = pd.concat([images.loc[ok].reset_index(drop=True), noise], axis=1)
    feats = np.load(cache / "features.npy")[row[ok]].astype(np.float32)
    return images, feats, json.loads((run / "work" / "classes.json").read_text())
