"""Writing outputs safely: OUT_DIR is checked for writability before any work, and every output
file is written whole or not at all (temp file, fsync, rename), with an error naming the path. A new
training run moves the outputs of the model an OUT_DIR held before into a folder of their own, so that
no submission.csv of an earlier model sits next to a new model.pt.
"""
import contextlib
import errno
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("app")
# What a training run (and run_infer.sh after it) leaves in OUT_DIR about its model, once its noise stage
# has rewritten noise_scores.csv and noise_report.png; the frozen-feature cache/ and work/ are not the
# model's (keyed by content; rewritten by the next scan).
MODEL_OUTPUTS = ("model.pt", "train_report.json", "train_curves.png", "validation_split.csv", "submission.csv",
                 "infer_report.json", "checkpoints")

NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class OutputError(ValueError):
    """An output that cannot be written: the run stops with this message (exit code 1)."""


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e`: torch.save, for one, reports a failed write as a RuntimeError whose
    context is the file object's OSError."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _reason(e: OSError) -> str:
    if e.errno in NO_SPACE:
        return f"disk full / no space left on the device, or a quota or file-size limit ({e.strerror})"
    return e.strerror or str(e)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def check_writable(out_dir) -> Path:
    """Create OUT_DIR if needed and write a probe file in it, so that an unwritable OUT_DIR stops
    the run at its start, not when the first output is due an hour later."""
    out_dir = Path(out_dir)
    probe = out_dir / f".write_probe.{os.getpid()}"
    blocking = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking == out_dir:
        raise OutputError(f"output folder {out_dir} is a file, not a folder: pass a folder (it is created if "
                          "missing), or move the file away.")
    if blocking is not None:
        raise OutputError(f"output folder {out_dir} cannot be created: {blocking} is a file, not a folder. "
                          "Pass another folder.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        _remove(probe)
        uid, gid = os.getuid(), os.getgid()
        owner = ""
        with contextlib.suppress(OSError):
            st = out_dir.stat()
            owner = f" (owned by uid {st.st_uid}, mode {st.st_mode & 0o777:o})"
        if e.errno in (errno.EACCES, errno.EPERM):
            fix = ('In Docker, run the container as the owner of the mounted host folder: docker run '
                   f'--user "$(id -u):$(id -g)" ...; or make the host folder writable for uid {uid}: '
                   f"sudo chown {uid}:{gid} HOST_FOLDER (or chmod a+rwx HOST_FOLDER). Or pass another OUT_DIR.")
        elif e.errno == errno.EROFS:
            fix = "Mount it read-write (no :ro in `docker run -v`), or pass another OUT_DIR."
        elif e.errno in NO_SPACE:
            fix = "Free space there or pass another OUT_DIR."
        else:
            fix = "Pass another OUT_DIR."
        raise OutputError(f"output folder {out_dir}{owner} cannot be written by this process "
                          f"(uid {uid}, gid {gid}): {_reason(e)}. {fix}") from e
    return out_dir


@contextlib.contextmanager
def atomic_write(path, mode: str = "w"):
    """`with atomic_write(path, "w" or "wb") as f:` writes `path` whole or not at all.

    The content goes to PATH.tmp, is flushed to disk and renamed over PATH only when complete.
    On any failure PATH.tmp is removed and an existing PATH is left as it was; a failed write
    (disk full, quota, permissions) becomes an OutputError that names PATH. Text is UTF-8 with
    "\\n" line ends.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    try:
        with open(tmp, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as e:
        _remove(tmp)
        cause = _os_error(e)
        if cause is None:
            raise
        kept = "the previous file there is unchanged" if path.exists() else "nothing was written there"
        fix = " Free space on that disk or pass another OUT_DIR, then rerun." if cause.errno in NO_SPACE else ""
        raise OutputError(f"cannot write {path}: {_reason(cause)}; {kept}.{fix}") from e


def set_aside_earlier_outputs(out_dir, names=MODEL_OUTPUTS) -> Path | None:
    """Move the `names` that exist in OUT_DIR into OUT_DIR/earlier-run-<date>-<time>/ (a rename: no
    copy), with a warning naming them. Returns that folder, or None when there was nothing to move."""
    out_dir = Path(out_dir)
    found = [name for name in names if (out_dir / name).exists()]
    if not found:
        return None
    folder = out_dir / time.strftime("earlier-run-%Y%m%d-%H%M%S")
    while folder.exists():
        folder = folder.with_name(folder.name + "+")
    try:
        folder.mkdir()
        for name in found:
            (out_dir / name).rename(folder / name)
    except OSError as e:
        raise OutputError(f"cannot move the earlier run's outputs of {out_dir} into {folder}: {_reason(e)}. "
                          "Pass another OUT_DIR, or move them yourself.") from e
    log.warning("%s held the outputs of an earlier model (%s): moved to %s, so that none of them is taken "
                "for this run's; delete that folder when you no longer need it", out_dir, ", ".join(found), folder)
    return folder
