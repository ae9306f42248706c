"""Stages shared between training runs (config: shared_dir): the scan, the frozen features, the noise
stage and the head warmup are stored once in SHARED_DIR/<stage>-<key>/ and reused by every run whose
settings feeding that stage are the same. A stage's key hashes exactly those settings and its upstream
stage's key (the scan's: the train folder's listing, i.e. paths, sizes and modification times), so a
change upstream recomputes that stage and every one after it. The frozen features live in the feature
cache (features.cache_dir, keyed by image content and weights); their entry here only records that a
run with these settings filled it, and the seconds it took.

`python -m app sweep` points every run of a grid at OUT_ROOT/shared; one run at a time writes it.
"""
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd

from .. import validation

STAGE_FILE = "stage.json"
UPSTREAM = {"scan": None, "features": "scan", "noise": "features", "warmup": "noise"}


def stage_settings(stage: str, cfg: dict, **extra) -> dict:
    """The settings that feed `stage` (besides its upstream stage), as hashed into its key."""
    if stage == "features":
        return {"image_size": cfg["features"]["image_size"], "precision": cfg["precision"], **extra}
    if stage == "noise":
        return {"noise": {k: v for k, v in cfg["noise"].items() if k != "enabled"}, "seed": cfg["seed"],
                "detector_runs": bool(cfg["noise"]["enabled"] or validation.enabled(cfg)), **extra}
    if stage == "warmup":
        return {"warmup": cfg["warmup"], "validation": cfg["validation"], "seed": cfg["seed"],
                "noise_weights": bool(cfg["noise"]["enabled"]), "prior_correction": cfg["prior_correction"],
                **extra}
    return dict(extra)


def listing_digest(listing) -> str:
    """A digest of list_train_files' (classes, files): names, labels, sizes, modification times."""
    classes, files = listing
    rows = pd.util.hash_pandas_object(files[["path", "label", "size", "mtime_ns"]], index=False)
    return hashlib.sha256(json.dumps(classes).encode() + rows.to_numpy().tobytes()).hexdigest()


class SharedStages:
    """The store as one run sees it: the key of each stage it has reached, and for the report which
    stages it reused (and the seconds their computing run spent) or computed and stored."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.keys: dict[str, str] = {}
        self.used: dict[str, dict] = {}

    def key(self, stage: str, cfg: dict, **extra) -> str:
        """Key `stage` for this run (its upstream stage keyed first)."""
        upstream = UPSTREAM[stage]
        settings = {"stage": stage, "upstream": self.keys[upstream] if upstream else None,
                    "settings": stage_settings(stage, cfg, **extra)}
        text = json.dumps(settings, sort_keys=True, default=str)
        self.keys[stage] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self.keys[stage]

    def _dir(self, stage: str) -> Path:
        return self.folder / f"{stage}-{self.keys[stage]}"

    def fetch(self, stage: str, dest: dict[str, Path]) -> bool:
        """Copy the stored files of `stage` to `dest` (file name -> path); False when not stored."""
        folder = self._dir(stage)
        if not (folder / STAGE_FILE).is_file():
            return False
        record = json.loads((folder / STAGE_FILE).read_text())
        for name, path in dest.items():
            if name in record["files"]:
                shutil.copyfile(folder / name, path)
        self.used[stage] = {"key": self.keys[stage], "reused": True, "seconds_when_computed": record["seconds"]}
        return True

    def publish(self, stage: str, files: dict[str, Path], seconds: float) -> None:
        """Store `files` (name -> path; missing ones left out) as `stage` for this run's key: written
        to a temporary folder, renamed into place whole."""
        folder = self._dir(stage)
        tmp = self.folder / f".{folder.name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        present = {name: path for name, path in files.items() if Path(path).is_file()}
        for name, path in present.items():
            shutil.copyfile(path, tmp / name)
        (tmp / STAGE_FILE).write_text(json.dumps({"stage": stage, "key": self.keys[stage], "files": sorted(present),
                                                  "seconds": round(seconds, 2), "created": time.time()}))
        try:
            tmp.rename(folder)
        except OSError:                           # stored meanwhile by another run: theirs stays
            shutil.rmtree(tmp, ignore_errors=True)
        self.used[stage] = {"key": self.keys[stage], "reused": False, "seconds_when_computed": round(seconds, 2)}
