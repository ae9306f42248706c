"""What a resumed run (--resume) needs from the interrupted one: the checks that it may continue (the
same train folder, the same settings that shape the model, the same data), and the records kept in
OUT_DIR/work for its report (the seconds of every stage, the head warmup's losses).

The records are read and written by the main process only, each written whole (outputs.atomic_write);
one that cannot be read counts as absent.
"""
import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path

import pandas as pd

from .config import differences, shaping
from .finetune import latest_checkpoint
from .outputs import atomic_write

log = logging.getLogger("app")


def read_record(path: Path, default):
    """The JSON record at `path`; `default` when it is absent or unreadable (with a warning then)."""
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("resume: %s cannot be read (%s): the report starts without it", path, e)
        return default


def write_record(path: Path, record) -> None:
    """Write the JSON `record` to `path` whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        json.dump(record, f)


class Timer:
    """Wall time per stage, for the report: `with timer("features"): ...`. With `record` (a file), the
    seconds are also written there as each stage ends, an interrupted stage's included; a resumed run
    (`resumed`) starts from that file's, so that its report counts the seconds of every run: a stage's
    seconds add up over the runs, and so does `elapsed`."""

    def __init__(self, record: Path | None = None, resumed: bool = False):
        self.record, self.t0 = record, time.perf_counter()
        earlier = read_record(record, {}) if resumed and record else {}
        self.times, self.before = earlier.get("stages", {}), earlier.get("elapsed", 0.0)

    @property
    def elapsed(self) -> float:
        return round(self.before + time.perf_counter() - self.t0, 2)

    @contextlib.contextmanager
    def __call__(self, name):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - t0, 2)
            if self.record:
                write_record(self.record, {"stages": self.times, "elapsed": self.elapsed})


def continues_checkpoint(out_dir: Path, resume: bool) -> bool:
    """Whether this run continues a checkpoint of OUT_DIR: --resume and one saved. Without one, a
    --resume run starts afresh."""
    return bool(resume and latest_checkpoint(Path(out_dir) / "checkpoints"))


def unchanged_since_scan(work: Path, listing) -> bool:
    """--resume: whether OUT_DIR/work holds the scan of this very train folder (the same classes and
    files, sizes and modification times). False when there is no scan to reuse or no checkpoint to
    resume (the run then starts afresh); a ValueError naming the differences when a checkpoint
    exists but the folder changed: resuming would continue a model on other data."""
    if not (work / "files.csv").exists() or not latest_checkpoint(work.parent / "checkpoints"):
        return False
    classes, now = listing
    before = pd.read_csv(work / "files.csv", dtype={"path": str})
    old_classes = json.loads((work / "classes.json").read_text())
    merged = before.merge(now, on="path", how="outer", suffixes=("_old", ""), indicator=True)
    added = merged.loc[merged["_merge"] == "right_only", "path"].tolist()
    removed = merged.loc[merged["_merge"] == "left_only", "path"].tolist()
    both = merged[merged["_merge"] == "both"]
    changed = both.loc[(both["size"] != both["size_old"]) | (both["mtime_ns"] != both["mtime_ns_old"]), "path"]
    if classes == old_classes and not (added or removed or len(changed)):
        return True
    examples = (added + removed + changed.tolist())[:5]
    raise ValueError(
        f"--resume: the train folder changed since the interrupted run ({len(added)} files added, "
        f"{len(removed)} removed, {len(changed)} modified"
        f"{', classes differ' if classes != old_classes else ''}; e.g. {examples}). A resumed run must "
        f"continue on the same data: restore the folder, or start afresh without --resume (or in a new OUT_DIR).")


def check_resumable(out_dir: Path, cfg: dict) -> None:
    """--resume: a ValueError naming every setting that shapes the model or its data (config.shaping)
    and differs from the checkpoint's, before any work. Nothing to check without a checkpoint (the run
    starts from the beginning)."""
    latest = latest_checkpoint(out_dir / "checkpoints")
    state_file = latest / "trainer_state.json" if latest else None
    if not (state_file and state_file.exists()):
        return
    changed = differences(json.loads(state_file.read_text()).get("settings", {}), shaping(cfg))
    if changed:
        raise ValueError(f"--resume: the checkpoint {latest} was trained with other settings ({'; '.join(changed)}). "
                         f"Resume with its settings, or start afresh: the same command without --resume "
                         f"(the earlier run's outputs are moved aside), or another OUT_DIR.")


def data_fingerprint(images: pd.DataFrame) -> dict:
    """What a checkpoint was trained on: image count and a digest of (path, label, content hash, weight)."""
    rows = pd.util.hash_pandas_object(images[["path", "label", "hash", "weight"]], index=False)
    return {"images": int(len(images)), "digest": hashlib.sha1(rows.to_numpy().tobytes()).hexdigest()}
