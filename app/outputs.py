"""Writing outputs safely: OUT_DIR is checked for writability before any work, and every output
file is written whole or not at all (temp file, fsync, rename), with an error naming the path.
"""
import contextlib
import errno
import os
from pathlib import Path

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
