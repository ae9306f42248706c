"""TECH_REPORT.md section 4.4 (noise-detection table): the baselines' rows, helpers of bench/score_noise.py.

Proxy feature extraction (train images, or the dev-test images for --devtest) and the simple
detectors the noise stage is compared with. Not part of the package: `bench/score_noise.py` imports these.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- features of the proxy backbone
def _load_image(path: Path, size: int) -> torch.Tensor | None:
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    except Exception as e:  # undecodable file: the scan stage drops these
        print(f"skip {path}: {e}")
        return None
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def extract_proxy_features(train_dir: str, weights: str, out_npz: str, batch: int = 256,
                           test_labels_csv: str | None = None) -> None:
    """Frozen proxy-backbone features of every decodable image under train_dir/<class>/<img>
    (or, with test_labels_csv, of the flat test folder train_dir/<img> listed there)."""
    from open_clip.transformer import VisionTransformer
    import pandas as pd

    train_dir = Path(train_dir)
    if test_labels_csv is None:
        classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
        files = [(c, f) for c in classes for f in sorted((train_dir / c).iterdir()) if f.is_file()]
    else:
        tl = pd.read_csv(test_labels_csv, dtype=str)
        classes = sorted(tl.label.unique())
        files = [(c, train_dir / im) for im, c in zip(tl.image, tl.label)]
    ck = torch.load(weights, map_location="cpu", weights_only=True)
    model = VisionTransformer(**ck["config"])
    model.load_state_dict(ck["visual"])
    model.eval()
    size = ck["config"]["image_size"]
    torch.set_num_threads(os.cpu_count() or 1)
    paths, labels, hashes, feats = [], [], [], []
    buf, t0 = [], time.time()

    def flush():
        if not buf:
            return
        x = torch.stack([b for b in buf])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            f = model(x)
        f = torch.nn.functional.normalize(f.float(), dim=-1)
        feats.append(f.numpy().astype(np.float16))
        buf.clear()

    for c, f in files:
        x = _load_image(f, size)
        if x is None:
            continue
        paths.append(f"{c}/{f.name}")
        labels.append(classes.index(c))
        hashes.append(hashlib.sha1(f.read_bytes()).hexdigest())
        buf.append(x)
        if len(buf) == batch:
            flush()
    flush()
    feats = np.concatenate(feats)
    Path(out_npz).parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_npz, features=feats, labels=np.asarray(labels, np.int64), paths=np.asarray(paths),
             hashes=np.asarray(hashes), class_names=np.asarray(classes))
    print(f"features {feats.shape} in {time.time() - t0:.1f}s -> {out_npz}")


# ----------------------------------------------------------------------------- simple detectors
def _standardise(features: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(features.astype(np.float32))
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-6)


def _train_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int = 200, wd: float = 1e-4,
                 lr: float = 1e-2, seed: int = 0) -> torch.nn.Linear:
    """Full-batch multinomial logistic regression (Adam, tiny L2), plain CE."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(head(x), y) + wd * head.weight.pow(2).sum()
        loss.backward()
        opt.step()
    return head


def probe_in_sample(features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0) -> np.ndarray:
    """Softmax probabilities of ONE probe trained with plain CE on ALL data, evaluated on the same data."""
    x = _standardise(features)
    head = _train_probe(x, torch.from_numpy(labels), num_classes, seed=seed)
    with torch.no_grad():
        return torch.softmax(head(x), dim=1).numpy()


def probe_oof(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Reference: K-fold out-of-fold probabilities of the same plain-CE probe (class-stratified folds)."""
    x = _standardise(features)
    y = torch.from_numpy(labels)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        rng.shuffle(idx)
        fold[idx] = (np.arange(len(idx)) + rng.integers(folds)) % folds
    out = np.zeros((len(labels), num_classes), np.float32)
    for f in range(folds):
        tr, te = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
        head = _train_probe(x[tr], y[tr], num_classes, seed=seed + f)
        with torch.no_grad():
            out[te] = torch.softmax(head(x[te]), dim=1).numpy()
    return out


def small_loss_flags(prob: np.ndarray, labels: np.ndarray, rate: float) -> np.ndarray:
    """Small-loss rule: flag the `rate` fraction of samples with the highest CE loss."""
    loss = -np.log(np.clip(prob[np.arange(len(labels)), labels], 1e-12, None))
    k = int(round(rate * len(labels)))
    flags = np.zeros(len(labels), bool)
    flags[np.argsort(-loss, kind="stable")[:k]] = True
    return flags


def estimate_noise_rate_gmm(loss: np.ndarray, iters: int = 200) -> float:
    """Weight of the high-mean component of a 2-component 1-d GMM on the per-sample losses."""
    x = np.asarray(loss, np.float64)
    lo, hi = np.quantile(x, [0.25, 0.9])
    mu = np.array([lo, hi])
    var = np.array([x.var(), x.var()]) + 1e-6
    pi = np.array([0.7, 0.3])
    for _ in range(iters):
        ll = -0.5 * (x[:, None] - mu) ** 2 / var - 0.5 * np.log(2 * np.pi * var) + np.log(pi)
        ll -= ll.max(1, keepdims=True)
        r = np.exp(ll)
        r /= r.sum(1, keepdims=True)
        nk = r.sum(0) + 1e-9
        pi = nk / nk.sum()
        mu = (r * x[:, None]).sum(0) / nk
        var = (r * (x[:, None] - mu) ** 2).sum(0) / nk + 1e-6
    return float(pi[np.argmax(mu)])
