"""Stages shared between training runs (config: shared_dir): the scan, the frozen features, the noise
stage and the head warmup are stored once in SHARED_DIR/<stage>-<key>/ and reused by every run whose
settings feeding that stage are the same. A stage's key hashes exactly those settings and its upstream
stage's key (the scan's: the train folder's listing, i.e. paths, sizes and modification times), so a
change upstream recomputes that stage and every one after it. The scan's key also holds the code
version, so that a run of other code recomputes every stage. The frozen features live in the feature
cache (features.cache_dir, keyed by image content, weights, image size and the pass's precision);
their entry here only records that a run with these settings filled it, and the seconds it took.

`python -m app sweep` points every run of a grid at OUT_ROOT/shared; one run at a time writes it.
"""
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pandas as pd

from .. import code_version, validation

log = logging.getLogger("app")
STAGE_FILE = "stage.json"
UPSTREAM = {"scan": None, "features": "scan", "noise": "features", "warmup": "noise"}


def stage_settings(stage: str, cfg: dict, **extra) -> dict:
    """The settings that feed `stage` (besides its upstream stage), as hashed into its key."""
    if stage == "scan":
        return {"code_version": code_version(), **extra}
    if stage == "features":            # the frozen pass runs in fp32 whatever the run's precision
        return {"image_size": cfg["features"]["image_size"], **extra}
    if stage == "noise":
        return {"noise": {k: v for k, v in cfg["noise"].items() if k != "enabled"}, "seed": cfg["seed"],
                "detector_runs": bool(cfg["noise"]["enabled"] or validation.enabled(cfg)), **extra}
    if stage == "warmup":
        return {"warmup": cfg["warmup"], "validation": cfg["validation"], "seed": cfg["seed"],
                "noise_weights": bool(cfg["noise"]["enabled"]), "prior_correction": cfg["prior_correction"],
                **extra}
    raise KeyError(f"no shared stage {stage!r}")


def listing_digest(listing) -> str:
    """A digest of list_train_files' (classes, files): names, labels, sizes, modification times."""
    classes, files = listing
    rows = pd.util.hash_pandas_object(files[["path", "label", "size", "mtime_ns"]], index=False)
    return hashlib.sha256(json.dumps(classes).encode() + rows.to_numpy().tobytes()).hexdigest()


class SharedStages:
    """The store as one run sees it: the key of each stage it has reached, and for the report which
    stages it reused (and the seconds their computing run spent) or computed and stored. Without a
    folder (no shared_dir, or a process other than the main one) nothing is stored: every stage is
    computed."""

    def __init__(self, folder=None):
        self.folder = Path(folder) if folder else None
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

    def reuse_or_run(self, stage: str, cfg: dict, files: dict[str, Path], compute, kept: bool = False, **extra):
        """Key `stage` (cfg and `extra`: stage_settings), then take it from the store or run it:
        - kept: the run's own output of the stage (a resumed run's) stays: nothing else is done;
        - stored under this key: its files are copied to `files` (name -> path);
        - else compute(), which writes `files`; they are stored with its seconds.
        A stage whose output lives elsewhere (no `files`: the features, in their cache) runs compute()
        either way, and is stored as a record of the run that computed it. Returns compute()'s result,
        None when it did not run. Without a folder: compute() unless kept."""
        if self.folder is None:
            return None if kept else compute()
        self.key(stage, cfg, **extra)
        if kept:
            return None
        stored = self.fetch(stage, files)
        if stored and files:
            log.info("shared: the %s stage reused from %s", stage, self.folder)
            return None
        t0 = time.perf_counter()
        result = compute()
        if not stored:
            self.publish(stage, files, time.perf_counter() - t0)
        return result

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
