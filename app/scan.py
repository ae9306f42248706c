"""Stage 1, scan: the class folders, their files, and a content hash of every file."""
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from tqdm import tqdm

log = logging.getLogger("app")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".jfif"}


def file_hash(path, algorithm: str = "sha1") -> str:
    """Hex digest of the file's bytes. SHA-1 for images: byte-identical copies share it (cache key,
    duplicate finder); SHA-256 for weights files (provenance)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _hash_all(paths, desc: str) -> list[str]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(tqdm(pool.map(file_hash, paths, chunksize=64), total=len(paths), desc=desc,
                         unit="file", mininterval=2))


def scan_train_dir(train_dir) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    """Returns (classes, images, skipped).

    classes: the class folder names, sorted, kept verbatim (they are the output labels).
    images: one row per candidate file: path (relative to train_dir), label (class index), hash.
    skipped: files rejected before decoding (empty files), with the reason. Files that turn out
    undecodable are added to `skipped` by the feature pass, which decodes every image anyway.
    """
    root = Path(train_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"train folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"no class folders in {root}: expected TRAIN_DIR/<class>/<image>")
    rows, skipped = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            log.warning("class folder %s is empty: the class is kept but has no training images", name)
        for p in files:
            rel = p.relative_to(root).as_posix()
            if p.stat().st_size == 0:
                skipped.append((rel, "empty file"))
            else:
                rows.append((rel, label))
    images = pd.DataFrame(rows, columns=["path", "label"])
    images["hash"] = _hash_all([root / p for p in images["path"]], "scan: hashing train files")
    return classes, images, pd.DataFrame(skipped, columns=["path", "reason"])


def list_test_images(test_dir, list_file=None) -> list[str]:
    """Test image names (relative to test_dir): the lines of --list, else every image file in
    test_dir (by suffix, recursively), sorted."""
    root = Path(test_dir)
    if list_file:
        names = [ln.strip() for ln in Path(list_file).read_text().splitlines()]
        names = [n.split(",")[0].strip() for n in names if n and not n.startswith("#")]
        return sorted(dict.fromkeys(names))
    if not root.is_dir():
        raise FileNotFoundError(f"test folder not found: {root}")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
