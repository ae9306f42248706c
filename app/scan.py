"""Stage 1, scan: the class folders, their files, and a content hash of every file; and the test files."""
import hashlib
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from tqdm import tqdm

log = logging.getLogger("app")


def file_hash(path, algorithm: str = "sha1") -> str:
    """Hex digest of the file's bytes. SHA-1 for images: byte-identical copies share it (cache key,
    duplicate finder); SHA-256 for weights files (provenance)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _hash_all(paths, desc: str) -> list[str]:
    pool = ThreadPoolExecutor(max_workers=8)
    try:
        return list(tqdm(pool.map(file_hash, paths, chunksize=64), total=len(paths), desc=desc,
                         unit="file", mininterval=2))
    finally:        # Ctrl-C: the files not started yet are not hashed (the pool would finish them all)
        pool.shutdown(wait=False, cancel_futures=True)


def list_train_files(train_dir) -> tuple[list[str], pd.DataFrame]:
    """(classes, files): the class folder names, sorted, and one row per file in them (hidden ones
    left out): path relative to train_dir, label (class index), size and mtime_ns. No file is read."""
    root = Path(train_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"train folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"no class folders in {root}: expected TRAIN_DIR/<class>/<image>")
    rows, empty = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            empty.append(name)
        for p in files:
            st = p.stat()
            rows.append((p.relative_to(root).as_posix(), label, st.st_size, st.st_mtime_ns))
    if not rows:
        raise ValueError(f"no files in the {len(classes)} class folders of {root}: expected TRAIN_DIR/<class>/<image>")
    for name in empty:
        log.warning("class folder %s is empty: the class is kept but has no training images", name)
    return classes, pd.DataFrame(rows, columns=["path", "label", "size", "mtime_ns"])


def empty_files(files: pd.DataFrame) -> pd.Series:
    """True for the listed files (list_train_files) that the scan skips before decoding: empty ones."""
    return files["size"] == 0


def scan_train_dir(train_dir, listing=None) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    """Returns (classes, images, skipped).

    classes: the class folder names, sorted, kept verbatim (they are the output labels).
    images: one row per candidate file: path (relative to train_dir), label (class index), size,
    mtime_ns, hash.
    skipped: files rejected before decoding (empty files), with the reason. Files that turn out
    undecodable are added to `skipped` by the feature pass, which decodes every image anyway.
    `listing`: list_train_files(train_dir) when the caller has it already.
    """
    classes, files = listing or list_train_files(train_dir)
    empty = empty_files(files)
    skipped = files.loc[empty, ["path"]].assign(reason="empty file").reset_index(drop=True)
    images = files.loc[~empty].reset_index(drop=True)
    images["hash"] = _hash_all([Path(train_dir) / p for p in images["path"]], "scan: hashing train files")
    return classes, images, skipped


def train_folder_likeness(names) -> str | None:
    """For TEST_DIR's file names (relative paths): a description when they look like a training folder's
    (every file in a sub-folder, two sub-folders or more: class folders), else None."""
    folders = Counter(n.split("/", 1)[0] for n in names if "/" in n)
    if len(folders) < 2 or sum(folders.values()) < len(names):
        return None
    return (f"its {len(names)} files are all in {len(folders)} sub-folders ({some_names([f + '/' for f in sorted(folders)], 3)}), "
            f"like a training folder's classes, so the submission would name them {names[0]!r}")


class ToPredict(NamedTuple):
    names: list[str]        # one submission row each: paths relative to TEST_DIR, sorted, distinct
    hidden: list[str]       # hidden files skipped by the TEST_DIR scan
    duplicates: list[str]   # names --list gives more than once (still one row each)


def some_names(names, k: int = 5) -> str:
    return ", ".join(map(repr, names[:k])) + (f" and {len(names) - k} more" if len(names) > k else "")


def _read_list(list_file, root: Path) -> ToPredict:
    """The lines of --list, verbatim: no stripping, no comment or comma syntax; a name the CSV
    cannot hold is reported by infer. Lines end with \\n, \\r\\n or \\r; blank lines (empty or
    whitespace only) name no file; a leading UTF-8 byte-order mark is not part of the first name."""
    text = Path(list_file).read_text(encoding="utf-8-sig", errors="surrogateescape")
    counts = Counter(ln for ln in text.split("\n") if ln.strip())
    names = sorted(counts)
    duplicates = [n for n in names if counts[n] > 1]
    if duplicates:
        log.warning("--list %s gives %d name(s) more than once; each gets one row: %s", list_file,
                    len(duplicates), some_names(duplicates))
    missing = [n for n in names if not (root / n).is_file()]
    if names and len(missing) == len(names):
        raise FileNotFoundError(f"none of the {len(names)} names in --list {list_file} is a file in {root} "
                                f"(e.g. {some_names(names, 3)}): is TEST_DIR the folder they are relative to?")
    if missing:
        log.warning("%d name(s) in --list are not files in %s; each still gets a row (prediction for a "
                    "blank image) and is listed as unreadable in infer_report.json: %s", len(missing), root,
                    some_names(missing))
    return ToPredict(names, [], duplicates)


def list_test_images(test_dir, list_file=None) -> ToPredict:
    """The test files to predict: the names in --list, else every file under test_dir (any suffix,
    any sub-folder, by its path relative to test_dir); an undecodable file still gets its row.
    Hidden files (.DS_Store, ._photo.jpg) and files in hidden folders (.git/) are not test images:
    skipped, counted and logged."""
    root = Path(test_dir)
    if list_file:
        return _read_list(list_file, root)
    if not root.is_dir():
        raise FileNotFoundError(f"test folder not found: {root}")
    names, hidden = [], []
    for p in root.rglob("*"):
        if p.is_file():
            rel = p.relative_to(root)
            (hidden if any(part.startswith(".") for part in rel.parts) else names).append(rel.as_posix())
    hidden.sort()
    if hidden:
        log.info("skipped %d hidden file(s) in %s (listed in infer_report.json): %s", len(hidden), root,
                 some_names(hidden))
    return ToPredict(sorted(names), hidden, [])
