"""Noise stage: per-image clean scores, cross-class duplicate resolution, off-topic detection.

Works on cached, L2-normalised frozen image features only (no images, no gradients through the
backbone), in bounded memory: nothing N x N is ever built; neighbours are searched blockwise (exact) or
through an inverted-file index (approximate, above knn_exact_max_n images); sample-by-class matrices are
built one block of rows at a time.

Signals (none of them comes from a model that was fitted on the image it scores):
  * cross-fitted linear probe: K-fold out-of-fold LDA (Gaussian classes with a shared, shrunk covariance,
    fitted in closed form from per-fold sufficient statistics) -> p(c | x). Its softmax temperature is fitted
    on the given labels with a uniform label-noise floor, P(given|x) = (1-rho) p(given|x) + rho/C, so the
    noise does not inflate it. (A softmax probe trained by AdamW is available; it measured worse.)
  * kNN label agreement: similarity-weighted votes of the k nearest neighbours, excluding the image's own
    exact / near duplicates -> q(c | x). Finds near duplicates, confirms relabel suggestions; mixed into the
    label evidence only with knn_weight > 0 (measured: no gain on the proxy benchmark).
  * robust class prototypes: per fold, trimmed weighted class means of the other folds -> the largest
    cosine to any prototype is the on-topic evidence (optionally also a softmax label vote, proto_weight).
Combination: z = (atanh(max prototype cosine), log p(given label | x)) is modelled by a Gaussian mixture
  with 2 components for clean images, 1 for mislabelled and 1 for off-topic ones (the off-topic one is
  dropped when the data do not support it), fitted by EM. clean_score = posterior of the clean components;
  flag when it is below flag_threshold; the flag says off_topic when the prototype evidence alone says so.
  rounds = 2 refits probe, prototypes and votes once with the round-1 clean posteriors as sample weights.
Duplicates: byte-identical files (content hash) and feature near-duplicates (cosine >= near_dup_cos) filed
  under different classes form groups (which also share a fold); a group keeps the copies of the label that
  the out-of-fold evidence clearly prefers (dup_keep_ratio) and drops the others, or drops all when unclear.
Measurements behind every default: bench/score_noise.py (--ablation), runs/noise/.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pandas as pd
import torch

NOISE_DEFAULTS: dict = {
    # cross-fitting
    "folds": 5,                    # K of the K-fold out-of-fold signals (duplicate groups share a fold)
    "rounds": 2,                   # 2: refit probe, prototypes and votes once with round-1 clean posteriors as weights
    # linear probe
    "probe": "lda",                # "lda" (closed form, shared shrunk covariance) | "logistic" (softmax, AdamW)
    "lda_shrinkage": 0.05,         # covariance shrinkage towards (trace/D) * I
    "lda_class_prior": True,       # add log class frequency to LDA logits
    "logistic_epochs": 20,         # only for probe == "logistic"
    "logistic_batch": 4096,
    "logistic_lr": 3e-3,
    "logistic_wd": 1e-4,
    "temperature_sample": 20000,   # rows used to fit the probe's softmax temperature (OOF NLL)
    "temperature_noise_floor": True,  # fit the temperature with a uniform label-noise floor (see _fit_temperature)
    # kNN
    "knn_k": 20,
    "knn_tau": 0.1,                # vote weight exp((cos - 1) / tau)
    "knn_exact_max_n": 20000,      # above this, approximate search (inverted file, spherical k-means)
    "knn_block": 1024,             # query rows per block
    "ivf_cell_size": 512,          # approximate mode: points per k-means cell
    "ivf_nprobe": 10,              # approximate mode: cells searched per query cell
    # prototypes
    "proto_trim": 0.2,             # fraction of lowest-cosine members dropped per class (2 passes)
    "proto_tau": 0.05,             # softmax temperature over prototype cosines (p_proto)
    # combination: label evidence p = (1 - a - b) p_lda + a q_knn + b p_proto
    "knn_weight": 0.0,             # a
    "proto_weight": 0.0,           # b
    "mixture_clean_components": 2, # Gaussian components for the clean images' (skewed) label support
    "class_prior_strength": 0.0,   # >0: per-class mixing weights (pseudo-count shrinkage to the global ones)
    "offtopic_min_sep": 1.5,       # off-topic component kept only if its atanh(max cos) mean is this many
                                   # clean-component SDs below the clean mean (and its labels look arbitrary)
    "flag_threshold": 0.333,       # flag when posterior(clean) < this: Bayes decision when wrongly removing a
                                   # clean image costs 2x keeping a noisy one (field notes: precision first)
    # duplicates
    "near_dup_cos": 0.98,          # feature cosine that counts as a near duplicate
    "dup_max_group": 32,           # larger connected groups are not treated as duplicate groups
    "dup_keep_ratio": 3.0,         # keep a group's copies of label a only if p(a|x) >= ratio x p(b|x) for
                                   # every other label b in the group (pairwise posterior >= 0.75); else drop all
    # outputs
    "relabel_min_prob": 0.9,       # suggested_label only where p(c|x) >= this and kNN majority agrees
    "weight_mode": "soft",         # "soft": weight = clean posterior (0 if flagged); "hard": 1 / 0
    "threads": 0,                  # torch CPU threads; 0 = auto: 1 below 20k images (thread sync costs more
                                   # than it saves there), else torch's current setting
    "verbose": False,
}

FLAGS = ("clean", "suspect_label", "off_topic", "duplicate")
MIN_IMAGES_FOR_MIXTURE = 50


# ============================================================================ helpers
def _log(cfg, msg):
    if cfg.get("verbose"):
        print(f"[noise] {msg}", flush=True)


def _to_float_tensor(features) -> torch.Tensor:
    """float32 copy (never a view of the caller's array), rows re-normalised."""
    a = np.asarray(features)
    if not a.flags.writeable:
        a = a.copy()
    t = torch.from_numpy(np.ascontiguousarray(a))
    x = t.clone() if t.dtype == torch.float32 else t.float()
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got {tuple(x.shape)}")
    return x.div_(x.norm(dim=1, keepdim=True).clamp_min_(1e-6))


def _class_sum(idx: torch.Tensor, v: torch.Tensor, rows: int, w: torch.Tensor | None = None) -> torch.Tensor:
    """out[r] = sum_i w_i v_i over i with idx_i == r, as a sparse matmul (torch's CPU index_add_ has a
    large fixed cost with several threads)."""
    vals = torch.ones(len(idx), dtype=v.dtype) if w is None else w.to(v.dtype)
    a = torch.sparse_coo_tensor(torch.stack([idx, torch.arange(len(idx))]), vals, (rows, len(idx)),
                                check_invariants=False)
    return a @ v


class _UnionFind:
    def __init__(self, n: int):
        self.p = np.arange(n)

    def find(self, a: int) -> int:
        p = self.p
        r = a
        while p[r] != r:
            r = p[r]
        while p[a] != r:
            p[a], a = r, p[a]
        return r

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[max(ra, rb)] = min(ra, rb)

    def labels(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.p))])


# ============================================================================ kNN
def _topk_merge(best_v, best_i, v, i, k):
    v = torch.cat([best_v, v], 1)
    i = torch.cat([best_i, i], 1)
    tv, ti = v.topk(k, dim=1)
    return tv, torch.gather(i, 1, ti)


def knn_exact(x: torch.Tensor, k: int, exclude_gid: np.ndarray, block: int = 1024, col_block: int = 32768):
    """Exact cosine kNN, blockwise (no N x N). Excludes pairs with equal exclude_gid (self, same hash).
    Returns (sim float32 (N, k), idx int64 (N, k)); idx -1 / sim -inf where fewer than k exist."""
    n = x.shape[0]
    k_eff = min(k, max(n - 1, 1))
    gid = torch.from_numpy(np.asarray(exclude_gid, np.int64))
    out_v = torch.full((n, k), -float("inf"))
    out_i = torch.full((n, k), -1, dtype=torch.int64)
    for q0 in range(0, n, block):
        q1 = min(n, q0 + block)
        xq, gq = x[q0:q1], gid[q0:q1]
        bv = torch.full((q1 - q0, k_eff), -float("inf"))
        bi = torch.full((q1 - q0, k_eff), -1, dtype=torch.int64)
        for c0 in range(0, n, col_block):
            c1 = min(n, c0 + col_block)
            s = xq @ x[c0:c1].T
            s.masked_fill_(gq[:, None] == gid[None, c0:c1], -float("inf"))
            kk = min(k_eff, c1 - c0)
            v, i = s.topk(kk, dim=1)
            bv, bi = _topk_merge(bv, bi, v, i + c0, k_eff)
        out_v[q0:q1, :k_eff] = bv
        out_i[q0:q1, :k_eff] = torch.where(torch.isinf(bv), torch.full_like(bi, -1), bi)
    return out_v, out_i


def _spherical_kmeans(x: torch.Tensor, n_cells: int, iters: int, gen: torch.Generator, block: int = 8192):
    n = x.shape[0]
    cent = x[torch.randperm(n, generator=gen)[:n_cells]].clone()
    n_cells = cent.shape[0]
    for _ in range(iters):
        acc = torch.zeros_like(cent)
        for b0 in range(0, n, block):
            xb = x[b0:b0 + block]
            a = (xb @ cent.T).argmax(1)
            acc += _class_sum(a, xb, n_cells)
        empty = acc.norm(dim=1) < 1e-8
        acc[empty] = x[torch.randint(0, n, (int(empty.sum()),), generator=gen)]
        cent = torch.nn.functional.normalize(acc, dim=1)
    return cent


def knn_ivf(x: torch.Tensor, k: int, exclude_gid: np.ndarray, nprobe: int = 10, cell_size: int = 512,
            seed: int = 0, block: int = 2048):
    """Approximate cosine kNN with an inverted file: spherical k-means cells of ~cell_size points; the
    queries of a cell are compared with the members of the nprobe cells nearest to that cell's centroid
    (one dense matmul per cell, so the work is ~ N * nprobe * cell_size * D)."""
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    n_cells = max(1, min(n, round(n / cell_size)))
    nprobe = min(nprobe, n_cells)
    n_train = min(n, 48 * n_cells)
    sub = x[torch.randperm(n, generator=gen)[:n_train]]
    cent = _spherical_kmeans(sub, n_cells, iters=10, gen=gen)
    assign = torch.empty(n, dtype=torch.int64)
    for b0 in range(0, n, 8192):
        assign[b0:b0 + 8192] = (x[b0:b0 + 8192] @ cent.T).argmax(1)
    order = torch.argsort(assign, stable=True)
    counts = torch.bincount(assign, minlength=n_cells)
    starts = [0] + counts.cumsum(0).tolist()
    probe = (cent @ cent.T).topk(nprobe, dim=1).indices.tolist()
    gid = torch.from_numpy(np.asarray(exclude_gid, np.int64))
    out_v = torch.full((n, k), -float("inf"))
    out_i = torch.full((n, k), -1, dtype=torch.int64)
    for c in range(n_cells):
        q = order[starts[c]:starts[c + 1]]
        if len(q) == 0:
            continue
        cand = torch.cat([order[starts[p]:starts[p + 1]] for p in probe[c]])
        xcT = x[cand].T.contiguous()
        gc = gid[cand]
        for q0 in range(0, len(q), block):
            qb = q[q0:q0 + block]
            s = x[qb] @ xcT
            s.masked_fill_(gid[qb][:, None] == gc[None, :], -float("inf"))
            kk = min(k, s.shape[1])
            v, i = s.topk(kk, dim=1)
            out_v[qb, :kk] = v
            out_i[qb, :kk] = torch.where(torch.isinf(v), torch.full_like(i, -1), cand[i])
    return out_v, out_i


# ============================================================================ folds and groups
def _duplicate_groups(labels, hash_gid, knn_v, knn_i, near_cos, max_group):
    """Connected components of exact (hash) and near (cos >= near_cos) duplicate links."""
    n = len(labels)
    uf = _UnionFind(n)
    # exact: link every member of a hash group to its first member
    first = {}
    for i, g in enumerate(hash_gid):
        if g in first:
            uf.union(first[g], i)
        else:
            first[g] = i
    rows, cols = np.nonzero((knn_v >= near_cos) & (knn_i >= 0))
    for r, c in zip(rows.tolist(), knn_i[rows, cols].tolist()):
        uf.union(r, c)
    gid = uf.labels()
    size = np.bincount(gid, minlength=n)[gid]
    gid = np.where(size > max_group, n + np.arange(n), gid)  # oversized chains: not duplicate groups
    return gid


def _make_folds(labels, groups, k, seed):
    """Class-stratified folds; every member of a duplicate group gets the fold of the group's root."""
    n = len(labels)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]
    lab_sorted = labels[order]
    start = np.searchsorted(lab_sorted, lab_sorted, side="left")
    rank = np.arange(n) - start
    offset = rng.integers(0, k, size=int(labels.max()) + 1)
    fold = np.empty(n, np.int64)
    fold[order] = (rank + offset[lab_sorted]) % k
    root_fold = np.full(groups.max() + 1, -1)
    for i in order:  # first member (in the random order) decides
        g = groups[i]
        if root_fold[g] < 0:
            root_fold[g] = fold[i]
    return root_fold[groups]


# ============================================================================ probes
def _lda_models(x, labels, w, fold, k, num_classes, shrink, use_prior, mean, block=16384):
    """Per-fold LDA (fit on the other folds) from per-fold weighted sufficient statistics."""
    d = x.shape[1]
    S = torch.zeros(k, num_classes, d, dtype=torch.float64)
    n = torch.zeros(k, num_classes, dtype=torch.float64)
    G = torch.zeros(k, d, d, dtype=torch.float64)
    y = torch.from_numpy(labels)
    wt = torch.from_numpy(w.astype(np.float32))
    f_t = torch.from_numpy(fold)
    for b0 in range(0, x.shape[0], block):
        xb = x[b0:b0 + block] - mean
        yb, wb, fb = y[b0:b0 + block], wt[b0:b0 + block], f_t[b0:b0 + block]
        for f in range(k):
            m = fb == f
            if not bool(m.any()):
                continue
            xw = xb[m] * wb[m, None]
            S[f] += _class_sum(yb[m], xw, num_classes).double()
            n[f].index_add_(0, yb[m], wb[m].double())
            G[f] += (xw.T @ xb[m]).double()
    S_tot, n_tot, G_tot = S.sum(0), n.sum(0), G.sum(0)
    models = []
    for f in range(k):
        Sf, nf = S_tot - S[f], (n_tot - n[f]).clamp_min(0)
        Gf = G_tot - G[f]
        M = Sf / nf[:, None].clamp_min(1e-6)
        tot = nf.sum().clamp_min(1e-6)
        cov = (Gf - M.T @ (M * nf[:, None])) / tot
        cov = 0.5 * (cov + cov.T)
        cov = (1 - shrink) * cov + shrink * (torch.trace(cov) / d).clamp_min(1e-8) * torch.eye(d, dtype=torch.float64)
        W = torch.linalg.solve(cov, M.T)                        # (D, C)
        b = -0.5 * (M * W.T).sum(1)
        if use_prior:
            b = b + torch.log((nf + 1e-3) / (tot + 1e-3 * num_classes))
        b = torch.where(nf > 1e-6, b, torch.full_like(b, -1e4))  # classes absent from the training folds
        models.append((W.float(), b.float()))
    return models


def _logistic_models(x, labels, w, fold, k, num_classes, cfg, mean, std, seed):
    """Per-fold softmax probes (weighted CE, minibatch AdamW) on standardised features."""
    models = []
    y = torch.from_numpy(labels)
    wt = torch.from_numpy(w.astype(np.float32))
    for f in range(k):
        tr = torch.from_numpy(np.nonzero(fold != f)[0])
        gen = torch.Generator().manual_seed(seed * 1000 + f)
        head = torch.nn.Linear(x.shape[1], num_classes)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        opt = torch.optim.AdamW(head.parameters(), lr=cfg["logistic_lr"], weight_decay=cfg["logistic_wd"])
        bs = int(cfg["logistic_batch"])
        steps = max(1, cfg["logistic_epochs"] * math.ceil(len(tr) / bs))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["logistic_lr"], total_steps=steps, pct_start=0.1)
        step = 0
        while step < steps:
            for bi in torch.randperm(len(tr), generator=gen).split(bs):
                if step >= steps:
                    break
                idx = tr[bi]
                xb = (x[idx] - mean) / std
                loss = (torch.nn.functional.cross_entropy(head(xb), y[idx], reduction="none") * wt[idx]).sum()
                loss = loss / wt[idx].sum().clamp_min(1e-6)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
        with torch.no_grad():
            W = (head.weight / std[None, :]).T.contiguous()      # logits = (x - mean) @ W + b
            models.append((W, head.bias.detach().clone()))
    return models


def _robust_prototypes(x, labels, w, fold, k, num_classes, trim, passes=2, block=32768):
    """Per fold: trimmed, weighted, L2-normalised class means of the other folds' members. Each pass drops,
    within every class, the `trim` fraction of members least similar to the current prototype. Blockwise
    (no copy of the training rows)."""
    n, d = x.shape
    y = torch.from_numpy(labels)
    wt = torch.from_numpy(w.astype(np.float32))
    out = []
    for f in range(k):
        member = (fold != f) & (w > 0)
        keep = member.copy()
        for p in range(passes + 1):
            acc = torch.zeros(num_classes, d)
            for b0 in range(0, n, block):
                m = torch.from_numpy(keep[b0:b0 + block])
                if bool(m.any()):
                    xb = x[b0:b0 + block][m]
                    acc += _class_sum(y[b0:b0 + block][m], xb, num_classes, wt[b0:b0 + block][m])
            proto = torch.nn.functional.normalize(acc, dim=1)
            if p == passes or trim <= 0:
                break
            s = np.full(n, np.inf, np.float32)
            for b0 in range(0, n, block):
                s[b0:b0 + block] = (x[b0:b0 + block] * proto[y[b0:b0 + block]]).sum(1).numpy()
            idx = np.nonzero(member)[0]
            yn = labels[idx]
            order = np.lexsort((s[idx], yn))          # by class, then cosine ascending
            ys = yn[order]
            start = np.searchsorted(ys, ys, side="left")
            cnt = np.bincount(yn, minlength=num_classes)[ys]
            rank = np.arange(len(ys)) - start
            keep = np.zeros(n, bool)
            keep[idx[order]] = rank >= np.floor(trim * cnt)
        present = acc.norm(dim=1) > 0
        out.append((proto, present))
    return out


# ============================================================================ mixture model
def _em(z, r, labels, num_classes, strength, iters, fixed=None):
    """EM for a K-component 2-D Gaussian mixture with per-class mixing weights shrunk to the global ones
    (strength = pseudo-count; <= 0 means one global set of weights)."""
    n, K = r.shape
    for _ in range(iters):
        nk = r.sum(0) + 1e-9
        pi = nk / n
        if fixed is None:
            mu = r.T @ z / nk[:, None]
            cov = np.stack([((r[:, j:j + 1] * (z - mu[j])).T @ (z - mu[j])) / nk[j] + 1e-4 * np.eye(2)
                            for j in range(K)])
        else:
            mu, cov = fixed
        if strength > 0:
            cls = np.zeros((num_classes, K))
            np.add.at(cls, labels, r)
            logpi = np.log((cls + strength * pi) / (cls.sum(1, keepdims=True) + strength) + 1e-12)[labels]
        else:
            logpi = np.log(pi + 1e-12)[None, :]
        inv = np.linalg.inv(cov)
        logdet = np.linalg.slogdet(cov)[1]
        ll = np.empty((n, K))
        for j in range(K):
            dz = z - mu[j]
            ll[:, j] = -0.5 * np.einsum("nd,de,ne->n", dz, inv[j], dz) - 0.5 * logdet[j]
        ll += logpi
        ll -= ll.max(1, keepdims=True)
        r_new = np.exp(ll)
        r_new /= r_new.sum(1, keepdims=True)
        delta = np.abs(r_new - r).max()
        r = r_new
        if delta < 1e-5:
            break
    return r, mu, cov, pi


def _fit_mixture(z, labels, num_classes, strength, min_sep, clean_components=2, iters=300):
    """Global mixture fit (see _fit_mixture_global), then optionally, with the components fixed, per-class
    mixing weights shrunk to the global ones (pseudo-count strength): an empirical-Bayes class noise rate.
    Returns posteriors (N, 3) = (clean, mislabelled, off-topic), info, off-topic posterior from z1 alone."""
    r, kinds, mu, cov, info = _fit_mixture_global(z, labels, num_classes, min_sep, clean_components, iters)
    if strength > 0:
        r, _, _, _ = _em(np.asarray(z, np.float64), r, labels, num_classes, strength, 50, fixed=(mu, cov))
    post = np.stack([r[:, kinds == k].sum(1) for k in range(3)], 1)
    off_z1 = np.zeros(len(r))
    if (kinds == 2).any():
        z1 = np.asarray(z, np.float64)[:, 0]
        pi = np.asarray(info["weights"])
        lz = np.stack([np.log(pi[j] + 1e-300) - 0.5 * np.log(cov[j, 0, 0]) - 0.5 * (z1 - mu[j, 0]) ** 2 / cov[j, 0, 0]
                       for j in range(len(kinds))], 1)
        lz -= lz.max(1, keepdims=True)
        pz = np.exp(lz)
        off_z1 = pz[:, kinds == 2].sum(1) / pz.sum(1)
    return post, info, off_z1


def _fit_mixture_global(z, labels, num_classes, min_sep, m=2, iters=300):
    """Gaussian mixture on z = (atanh max prototype cosine, log p(given label | x)): m components for
    clean images (their label support is skewed, one Gaussian fits it badly), one for mislabelled and one
    for off-topic images. Initialised from quantiles (off-topic: lowest 5% of z1; on-topic: z2 split into
    m + 1 equal bins, the lowest = mislabelled); after EM the on-topic component with the lowest mean z2
    is the mislabelled one.

    The off-topic component is kept only if (a) its z1 mean lies at least min_sep SDs (of the clean
    images' z1) below the clean mean and (b) its mean log p(given label) is at most log(2 / C), i.e. its
    labels look arbitrary (off-topic photos are filed under random classes); otherwise it is only the lower
    tail of on-topic images, and the model is refitted without it.
    Returns responsibilities (N, K), component kinds (0 clean, 1 mislabelled, 2 off-topic), means, covs, info."""
    z = np.asarray(z, np.float64)
    labels = np.asarray(labels)
    n = len(z)
    z1, z2 = z[:, 0], z[:, 1]
    info = {}
    m = max(1, int(m))
    if n < MIN_IMAGES_FOR_MIXTURE:  # too few images to learn what noise looks like: flag nothing
        r = np.zeros((n, m + 1))
        r[:, 0] = 1.0
        kinds = np.array([0] * m + [1])
        mu = np.zeros((m + 1, 2))
        cov = np.tile(np.eye(2), (m + 1, 1, 1))
        info.update({"components": kinds.tolist(), "means": mu.tolist(), "weights": [1.0] + [0.0] * m,
                     "note": f"fewer than {MIN_IMAGES_FOR_MIXTURE} images: no mixture fitted"})
        return r, kinds, mu, cov, info

    def init(on, with_off):
        qs = np.quantile(z2[on], np.linspace(0, 1, m + 2)[1:-1]) if on.any() else np.zeros(m)
        b = np.searchsorted(qs, z2, side="right")  # 0 = lowest bin ... m = highest
        r = np.zeros((n, m + 1 + with_off))
        for j in range(m + 1):
            r[on & (b == j), m - j] = 1.0           # col 0 = highest bin (clean), col m = lowest (mislabelled)
        if with_off:
            r[~on, m + 1] = 1.0
        return r

    def order(r, mu, cov, pi, with_off):
        onc = np.arange(m + 1)
        o = onc[np.argsort(-mu[onc, 1], kind="stable")]   # on-topic comps by label support, mislabelled last
        idx = np.concatenate([o, [m + 1]]) if with_off else o
        kinds = np.array([0] * m + [1] + ([2] if with_off else []))
        return r[:, idx], mu[idx], cov[idx], pi[idx], kinds

    if n >= 200:  # an off-topic component needs a few images to stand on
        off0 = z1 < np.quantile(z1, 0.05)
        r, mu, cov, pi = _em(z, init(~off0, True), labels, num_classes, 0.0, iters)
        r, mu, cov, pi, kinds = order(r, mu, cov, pi, True)
        cw = pi[:m] / pi[:m].sum()
        c_mean = float((cw * mu[:m, 0]).sum())
        c_var = float((cw * (cov[:m, 0, 0] + (mu[:m, 0] - c_mean) ** 2)).sum())
        sep = (c_mean - mu[-1, 0]) / math.sqrt(c_var)
        arbitrary = mu[-1, 1] <= math.log(2.0 / num_classes)
        info.update({"offtopic_sep_sd": round(float(sep), 3), "offtopic_mean_log_p_given": round(float(mu[-1, 1]), 3)})
        if sep >= min_sep and arbitrary and pi[-1] >= 0.001:
            info.update({"components": kinds.tolist(), "means": mu.round(4).tolist(), "weights": pi.round(5).tolist()})
            return r, kinds, mu, cov, info
    r, mu, cov, pi = _em(z, init(np.ones(n, bool), False), labels, num_classes, 0.0, iters)
    r, mu, cov, pi, kinds = order(r, mu, cov, pi, False)
    info.update({"components": kinds.tolist(), "means": mu.round(4).tolist(), "weights": pi.round(5).tolist()})
    return r, kinds, mu, cov, info


# ============================================================================ main signals
def _fit_temperature(logit_fn, idx, labels, w, noise_floor=True):
    """Softmax temperature for the out-of-fold logits, by maximum likelihood of the GIVEN labels on a row
    sample under P(given | x) = (1 - rho) softmax(z / tau)[given] + rho / C: the uniform floor rho
    absorbs wrong labels, so tau calibrates the probe for correctly labelled images instead of being
    inflated by the noise. Returns (tau, rho)."""
    z = logit_fn(idx)
    C = z.shape[1]
    y = torch.from_numpy(labels[idx])
    wt = torch.from_numpy(w[idx].astype(np.float32))
    taus = np.exp(np.linspace(np.log(0.1), np.log(30.0), 31))
    rhos = np.linspace(0.0, 0.9, 46) if noise_floor else np.array([0.0])
    best = (float("inf"), 1.0, 0.0)
    for t in taus:
        lp = torch.log_softmax(z / float(t), 1).gather(1, y[:, None])[:, 0].double()
        for rho in rhos:
            lik = torch.logaddexp(lp + math.log1p(-rho) if rho < 1 else lp * 0 - float("inf"),
                                  torch.full_like(lp, math.log(rho / C) if rho > 0 else -float("inf")))
            nll = float(-(lik * wt).sum() / wt.sum().clamp_min(1e-6))
            if nll < best[0]:
                best = (nll, float(t), float(rho))
    return best[1], best[2]


def compute_signals(features, labels, num_classes, content_hashes, cfg=None, seed=0) -> dict:
    """All per-image signals and posteriors (arrays of length N) plus a diagnostics dict."""
    cfg = {**NOISE_DEFAULTS, **(cfg or {})}
    before = torch.get_num_threads()
    want = int(cfg.get("threads") or 0) or (1 if len(labels) < 20000 else before)
    torch.set_num_threads(want)
    try:
        return _compute_signals(features, labels, num_classes, content_hashes, cfg, seed)
    finally:
        torch.set_num_threads(before)


def _compute_signals(features, labels, num_classes, content_hashes, cfg, seed) -> dict:
    t_start = time.time()
    timings = {}
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    if features.shape[0] != n or len(content_hashes) != n:
        raise ValueError("features, labels and content_hashes must have the same length")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    x = _to_float_tensor(features)
    hash_gid = pd.factorize(pd.Series(list(content_hashes), dtype=object))[0].astype(np.int64)
    k_fold = int(max(2, min(cfg["folds"], n)))

    # ---- kNN (excluding self and byte-identical copies)
    t0 = time.time()
    k_nn = int(cfg["knn_k"]) + 8  # spares for neighbours that turn out to be near duplicates
    if n <= cfg["knn_exact_max_n"]:
        knn_v, knn_i = knn_exact(x, k_nn, hash_gid, block=int(cfg["knn_block"]))
    else:
        knn_v, knn_i = knn_ivf(x, k_nn, hash_gid, nprobe=int(cfg["ivf_nprobe"]),
                               cell_size=int(cfg["ivf_cell_size"]), seed=seed)
    knn_v, knn_i = knn_v.numpy(), knn_i.numpy()
    timings["knn_s"] = time.time() - t0

    # ---- duplicate groups and folds
    t0 = time.time()
    groups = _duplicate_groups(labels, hash_gid, knn_v, knn_i, cfg["near_dup_cos"], int(cfg["dup_max_group"]))
    fold = _make_folds(labels, groups, k_fold, seed)
    # kNN voters: drop neighbours from the same duplicate group, keep the first knn_k
    valid = (knn_i >= 0) & (groups[np.where(knn_i >= 0, knn_i, 0)] != groups[:, None])
    pos = np.cumsum(valid, 1)
    valid &= pos <= int(cfg["knn_k"])
    vote_w = np.where(valid, np.exp((knn_v - 1.0) / float(cfg["knn_tau"])), 0.0).astype(np.float32)
    timings["groups_s"] = time.time() - t0

    mean = x.mean(0)
    std = x.std(0, correction=0).clamp_min(1e-6)
    w = np.ones(n, np.float64)
    rng = np.random.default_rng(seed + 1)
    rounds = max(1, int(cfg["rounds"]))
    a, b = float(cfg["knn_weight"]), float(cfg["proto_weight"])
    for rnd in range(rounds):
        t0 = time.time()
        if cfg["probe"] == "lda":
            models = _lda_models(x, labels, w, fold, k_fold, num_classes, float(cfg["lda_shrinkage"]),
                                 bool(cfg["lda_class_prior"]), mean)
        elif cfg["probe"] == "logistic":
            models = _logistic_models(x, labels, w, fold, k_fold, num_classes, cfg, mean, std, seed + rnd)
        else:
            raise ValueError(f"unknown probe {cfg['probe']!r}")
        protos = _robust_prototypes(x, labels, w, fold, k_fold, num_classes, float(cfg["proto_trim"]))
        timings[f"fit_round{rnd + 1}_s"] = time.time() - t0
        t0 = time.time()

        def logits(idx):
            z = torch.empty(len(idx), num_classes)
            f_idx = fold[idx]
            for f in range(k_fold):
                m = np.nonzero(f_idx == f)[0]
                if len(m):
                    W, bb = models[f]
                    z[m] = (x[idx[m]] - mean) @ W + bb
            return z

        ts = rng.choice(n, size=min(n, int(cfg["temperature_sample"])), replace=False)
        tau, rho = _fit_temperature(logits, np.sort(ts), labels, np.ones(n), bool(cfg["temperature_noise_floor"]))
        # ---- blockwise scoring: p(c|x) mixture, its value at the given label, its top-2, max prototype cos
        p_y = np.empty(n, np.float32)
        p_lda_y = np.empty(n, np.float32)
        q_y = np.empty(n, np.float32)
        proto_y = np.empty(n, np.float32)
        maxcos = np.empty(n, np.float32)
        top_c = np.empty((n, 2), np.int64)
        top_p = np.empty((n, 2), np.float32)
        knn_top = np.empty(n, np.int64)
        knn_top_q = np.empty(n, np.float32)
        voter_w = (vote_w * w[np.where(knn_i >= 0, knn_i, 0)]).astype(np.float32)
        blk = 4096
        for f in range(k_fold):
            W, bb = models[f]
            P, present = protos[f]
            rows = np.nonzero(fold == f)[0]
            for r0 in range(0, len(rows), blk):
                idx = rows[r0:r0 + blk]
                xb = x[idx]
                z = (xb - mean) @ W + bb
                p_l = torch.softmax(z / tau, 1)
                cs = xb @ P.T
                cs[:, ~present] = -1.0
                mc = cs.max(1).values
                p_p = torch.softmax(cs / float(cfg["proto_tau"]), 1)
                vw = torch.from_numpy(voter_w[idx])
                vl = torch.from_numpy(labels[np.where(knn_i[idx] >= 0, knn_i[idx], 0)])
                q = torch.zeros(len(idx), num_classes).scatter_add_(1, vl, vw)
                q = q + 1e-3 * (vw.sum(1, keepdim=True) + 1e-6) / num_classes
                q = q / q.sum(1, keepdim=True)
                p = (1 - a - b) * p_l + a * q + b * p_p
                yi = torch.from_numpy(labels[idx])[:, None]
                p_y[idx] = p.gather(1, yi)[:, 0].numpy()
                p_lda_y[idx] = p_l.gather(1, yi)[:, 0].numpy()
                q_y[idx] = q.gather(1, yi)[:, 0].numpy()
                proto_y[idx] = cs.gather(1, yi)[:, 0].numpy()
                maxcos[idx] = mc.numpy()
                tv, ti = p.topk(min(2, num_classes), dim=1)
                if num_classes < 2:
                    tv, ti = torch.cat([tv, torch.zeros_like(tv)], 1), torch.cat([ti, torch.full_like(ti, -1)], 1)
                top_c[idx], top_p[idx] = ti.numpy(), tv.numpy()
                qv, qi = q.max(1)
                knn_top[idx], knn_top_q[idx] = qi.numpy(), qv.numpy()
        timings[f"score_round{rnd + 1}_s"] = time.time() - t0
        t0 = time.time()
        z = np.stack([np.arctanh(np.clip(maxcos, -0.999, 0.999)), np.log(np.clip(p_y, 1e-8, 1.0))], 1)
        post, info, off_z1 = _fit_mixture(z, labels, num_classes, float(cfg["class_prior_strength"]),
                                          float(cfg["offtopic_min_sep"]), int(cfg["mixture_clean_components"]))
        timings[f"mixture_round{rnd + 1}_s"] = time.time() - t0
        info["temperature"] = tau
        info["noise_floor_rho"] = rho
        _log(cfg, f"round {rnd + 1}: tau={tau:.2f} mixture={info} flagged={(post[:, 0] < cfg['flag_threshold']).mean():.3f}")
        w = post[:, 0].astype(np.float64)
    timings["total_s"] = time.time() - t_start
    return {
        "post_clean": post[:, 0], "post_mislabel": post[:, 1], "post_offtopic": post[:, 2],
        "offtopic_z1_posterior": off_z1,
        "p_y": p_y, "p_lda_y": p_lda_y, "knn_q_y": q_y, "proto_cos_y": proto_y, "max_proto_cos": maxcos,
        "top_class": top_c, "top_prob": top_p, "knn_top": knn_top, "knn_top_q": knn_top_q,
        "groups": groups, "hash_gid": hash_gid, "fold": fold, "knn_sim": knn_v, "knn_idx": knn_i,
        "info": {**info, "timings": timings},
    }


def _resolve_duplicates(sig, labels, cfg):
    """Returns (drop mask, winner label per sample or -1)."""
    n = len(labels)
    groups = sig["groups"]
    drop = np.zeros(n, bool)
    winner = np.full(n, -1, np.int64)
    df = pd.DataFrame({"g": groups, "y": labels, "p": sig["p_y"]})
    nl = df.groupby("g")["y"].transform("nunique").to_numpy()
    cross = nl > 1
    if not cross.any():
        return drop, winner
    sub = df[cross]
    members = {g: idx.to_numpy() for g, idx in sub.groupby("g").groups.items()}
    per = sub.groupby(["g", "y"]).agg(p=("p", "mean")).reset_index()
    per = per.sort_values(["g", "p"], ascending=[True, False])
    for g, grp in per.groupby("g", sort=False):
        best, second = grp.iloc[0], grp.iloc[1]
        mem = members[g]
        if best.p >= cfg["dup_keep_ratio"] * second.p:
            keep_label = int(best.y)
            winner[mem] = keep_label
            drop[mem] = labels[mem] != keep_label
        else:
            drop[mem] = True
    return drop, winner


def detect_noise(features, labels, num_classes, content_hashes, cfg, seed) -> pd.DataFrame:
    """features (N, D) (fp16 fine, re-normalised here), labels (N,) int in [0, num_classes), content_hashes
    (N,) file digests (equal = byte-identical), cfg: keys of NOISE_DEFAULTS (missing ones default, unknown
    ones are ignored), seed: folds and sampling. Returns N rows in input order:
      clean_score      posterior probability that the image is on-topic and correctly labelled, in [0, 1];
      weight           training weight: clean_score for kept images, 0 for flagged or dropped ones
                       (weight_mode "hard": 1 / 0);
      flag             clean | suspect_label | off_topic | duplicate (a dropped copy of a cross-class group);
      suggested_label  class index or -1: for suspect_label images, the out-of-fold top class when its
                       probability >= relabel_min_prob and the kNN majority agrees; for dropped duplicates,
                       the label of the copy that was kept. Advice only: weights refer to the given label.
    Diagnostics (mixture parameters, temperature, stage timings) are in .attrs["info"]."""
    cfg = {**NOISE_DEFAULTS, **(cfg or {})}
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    if n == 0:
        return pd.DataFrame({"clean_score": pd.Series([], dtype=float), "weight": pd.Series([], dtype=float),
                             "flag": pd.Series([], dtype=object), "suggested_label": pd.Series([], dtype=np.int64)})
    sig = compute_signals(features, labels, num_classes, content_hashes, cfg, seed)
    post = np.clip(sig["post_clean"], 0.0, 1.0)
    flagged = post < cfg["flag_threshold"]
    # noise kind of a flagged image: off-topic when the prototype evidence alone says so
    off = flagged & (sig["offtopic_z1_posterior"] >= 0.5)
    flag = np.where(flagged, np.where(off, "off_topic", "suspect_label"), "clean").astype(object)
    drop, winner = _resolve_duplicates(sig, labels, cfg)
    flag[drop] = "duplicate"
    # suggested label: the evidence's top class, confident, confirmed by the kNN majority
    top_c, top_p = sig["top_class"][:, 0], sig["top_prob"][:, 0]
    conf = (top_c != labels) & (top_p >= cfg["relabel_min_prob"]) & (sig["knn_top"] == top_c)
    sugg = np.where((flag == "suspect_label") & conf, top_c, -1)
    sugg = np.where(drop & (winner >= 0), winner, sugg)
    if cfg["weight_mode"] == "soft":
        weight = np.where(flagged | drop, 0.0, post)
    elif cfg["weight_mode"] == "hard":
        weight = np.where(flagged | drop, 0.0, 1.0)
    else:
        raise ValueError(f"unknown weight_mode {cfg['weight_mode']!r}")
    out = pd.DataFrame({"clean_score": post.astype(float), "weight": weight.astype(float),
                        "flag": flag, "suggested_label": sugg.astype(np.int64)})
    out.attrs["info"] = sig["info"]
    out.attrs["given_label"] = labels  # lets plot_noise_report draw per-class rates from this frame alone
    return out


# ============================================================================ report figure
def plot_noise_report(scores_df, image_paths, class_names, out_png) -> None:
    """noise_report.png: per-class noise rates, clean-score histogram, most confidently flagged thumbnails."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = True
    df = scores_df.reset_index(drop=True).copy()
    paths = list(image_paths)
    if "given_label" in df.columns:
        lab = df["given_label"].to_numpy()
    elif "label" in df.columns:
        lab = df["label"].to_numpy()
    elif len(scores_df.attrs.get("given_label", [])) == len(df):
        lab = np.asarray(scores_df.attrs["given_label"])
    else:
        lab = np.full(len(df), -1, np.int64)  # unknown: one bar
    names = list(class_names) if class_names is not None else []

    def cname(c):
        """Display name of a label given as class index or as class name ('' / NaN / -1 = none)."""
        if c is None or (isinstance(c, float) and np.isnan(c)) or str(c).strip() in ("", "-1", "nan"):
            return None
        if isinstance(c, (int, np.integer)) or (isinstance(c, str) and c.lstrip("-").isdigit() and str(c) not in names):
            ci = int(c)
            return str(names[ci]) if 0 <= ci < len(names) else str(ci)
        return str(c)

    n_thumb_cols, n_thumb_rows = 8, 3
    fig = plt.figure(figsize=(16, 6 + 2.2 * n_thumb_rows))
    gs = fig.add_gridspec(1 + n_thumb_rows, n_thumb_cols, height_ratios=[3.0] + [1.0] * n_thumb_rows)
    # per-class noise rates (stacked by flag)
    ax = fig.add_subplot(gs[0, : n_thumb_cols // 2 + 1])
    if len(df):
        tab = pd.crosstab(pd.Series([cname(v) for v in lab], name="class"), df["flag"].to_numpy())
        tab = tab.reindex(columns=list(FLAGS), fill_value=0)
        rate = tab.drop(columns=["clean"]).div(tab.sum(axis=1), axis=0)
        order = rate.sum(axis=1).sort_values(ascending=False).index
        rate = rate.loc[order]
        bottom = np.zeros(len(rate))
        colors = {"suspect_label": "tab:orange", "off_topic": "tab:red", "duplicate": "tab:purple"}
        for col in ["suspect_label", "off_topic", "duplicate"]:
            ax.bar(np.arange(len(rate)), rate[col].to_numpy(), bottom=bottom, width=1.0, color=colors[col], label=col)
            bottom += rate[col].to_numpy()
        overall = float((df["flag"] != "clean").mean())
        ax.axhline(overall, color="k", lw=0.8, ls="--", label=f"overall {overall:.1%}")
        ax.set_xlim(-0.5, len(rate) - 0.5)
        if len(rate) <= 40:
            ax.set_xticks(np.arange(len(rate)), [str(c) for c in rate.index], rotation=90, fontsize=6)
        else:
            ax.set_xticks([])
        ax.set_xlabel(f"classes, sorted by flagged rate ({len(rate)} classes)")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_ylabel("flagged fraction")
    ax.set_title("per-class noise rates")
    # histogram of clean scores
    ax = fig.add_subplot(gs[0, n_thumb_cols // 2 + 1:])
    if len(df):
        bins = np.linspace(0, 1, 41)
        for fl, col in [("clean", "tab:green"), ("suspect_label", "tab:orange"), ("off_topic", "tab:red"),
                        ("duplicate", "tab:purple")]:
            v = df.loc[df["flag"] == fl, "clean_score"].to_numpy()
            if len(v):
                ax.hist(v, bins=bins, color=col, alpha=0.6, label=f"{fl} ({len(v)})")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("clean_score")
    ax.set_title("clean-score histogram")
    # thumbnails of the most confidently flagged, one row per flag kind (lowest clean_score first)
    kinds = [f for f in FLAGS[1:] if (df["flag"] == f).any()] or ["suspect_label"]
    rows = []
    for r_i in range(n_thumb_rows):
        f = kinds[r_i % len(kinds)]
        idx = df.index[df["flag"] == f].to_numpy()
        idx = idx[np.argsort(df.loc[idx, "clean_score"].to_numpy(dtype=float), kind="stable")]
        start = (r_i // len(kinds)) * n_thumb_cols
        rows.append(list(idx[start:start + n_thumb_cols]))
    for r_i, row_idx in enumerate(rows):
        for j in range(n_thumb_cols):
            ax = fig.add_subplot(gs[1 + r_i, j])
            ax.axis("off")
            if j >= len(row_idx):
                continue
            i = int(row_idx[j])
            try:
                with Image.open(paths[i]) as im:
                    im = im.convert("RGB")
                    im.thumbnail((128, 128))
                    ax.imshow(np.asarray(im))
            except Exception:
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
            row = df.loc[i]
            sug = cname(row.get("suggested_label", None))
            s = f"{row['flag']} {float(row['clean_score']):.3f}\nlabel {cname(lab[i])}"
            if sug is not None:
                s += f" -> {sug}"
            ax.set_title(s, fontsize=6)
    fig.suptitle(f"noise report: {len(df)} images, {int((df['flag'] != 'clean').sum())} flagged", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)) or ".", exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
