"""Stage 3, frozen features: one pass of the frozen visual tower over every train image.

Cached on disk in fp16 under a folder keyed by the weights' SHA-256, the image size and the
precision of the pass (fp32), one row per image content hash, so a re-run, a resumed run or a
later stage with overlapping images skips the pass.
"""
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch.nn.functional as F

from .data import ImageDataset, eval_transform
from .outputs import atomic_write
from .runtime import batched_pass

log = logging.getLogger("app")
# the frozen pass runs in fp32, whatever the mixed precision of the other stages: the noise stage's
# thresholds were set on fp32 features. Part of the cache folder's name: a cache of another precision
# is not reused.
PASS_PRECISION = "fp32"


def cache_folder(cache_dir, backbone) -> Path:
    return Path(cache_dir) / f"features-{backbone.sha256[:16]}-{backbone.config['image_size']}px-{PASS_PRECISION}"


def _read_cache(folder: Path):
    if not (folder / "index.csv").exists():
        return pd.DataFrame({"hash": [], "ok": []}), None
    index = pd.read_csv(folder / "index.csv", dtype={"hash": str, "ok": bool})
    return index, np.load(folder / "features.npy", mmap_mode="r")


def extract_features(backbone, root, images: pd.DataFrame, cfg: dict, accelerator, cache_dir):
    """L2-normalised frozen features (fp16, one row per row of `images`) and a decoded-ok mask.
    Only images whose content hash is not cached yet are decoded and encoded."""
    folder = cache_folder(cache_dir, backbone)
    index, feats = _read_cache(folder)
    row_of = dict(zip(index["hash"], range(len(index))))
    todo = images.loc[~images["hash"].isin(row_of)].drop_duplicates("hash")
    if accelerator.is_main_process:
        log.info("features: %d images, %d unique contents to encode, the rest cached (%s)",
                 len(images), len(todo), folder)
    if len(todo):
        visual = backbone.visual.to(accelerator.device).eval()
        dataset = ImageDataset([Path(root) / p for p in todo["path"]], eval_transform(backbone.preprocess),
                               backbone.config["image_size"])
        new, ok = batched_pass(lambda x: F.normalize(visual(x), dim=-1), dataset, accelerator,
                               cfg["features"]["batch_size"], cfg["num_workers"], "features: frozen pass",
                               autocast=False)          # PASS_PRECISION
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            old = np.asarray(feats) if feats is not None else np.zeros((0, new.shape[1]), np.float16)
            merged = np.concatenate([old, new.astype(np.float16)])
            index = pd.concat([index, pd.DataFrame({"hash": todo["hash"].values, "ok": ok})],
                              ignore_index=True)
            with atomic_write(folder / "features.npy", "wb") as f:    # the index last: it names the rows
                np.save(f, merged)
            with atomic_write(folder / "index.csv") as f:
                index.to_csv(f, index=False)
        accelerator.wait_for_everyone()
        index, feats = _read_cache(folder)
        row_of = dict(zip(index["hash"], range(len(index))))
    rows = images["hash"].map(row_of).to_numpy()
    return np.asarray(feats[rows], dtype=np.float16), index["ok"].to_numpy()[rows]
