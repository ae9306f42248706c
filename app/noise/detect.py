"""Noise stage: per-image clean scores, cross-class duplicate resolution, off-topic detection. This
module combines the signals; neighbours.py, groups.py, probes.py and mixture.py hold one idea each,
report.py the figure.

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

import time

import numpy as np
import pandas as pd
import torch

from .groups import _duplicate_groups, _make_folds, _resolve_duplicates
from .mixture import _fit_mixture
from .neighbours import _to_float_tensor, knn_exact, knn_ivf
from .probes import _fit_temperature, _lda_models, _logistic_models, _robust_prototypes

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


def _log(cfg, msg):
    if cfg.get("verbose"):
        print(f"[noise] {msg}", flush=True)

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
      probe_label      the out-of-fold label evidence's top class (the frozen probe's prediction, from
                       folds that did not see the image): the validation estimate's control variate.
    Diagnostics (mixture parameters, temperature, stage timings) are in .attrs["info"]."""
    cfg = {**NOISE_DEFAULTS, **(cfg or {})}
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    if n == 0:
        return pd.DataFrame({"clean_score": pd.Series([], dtype=float), "weight": pd.Series([], dtype=float),
                             "flag": pd.Series([], dtype=object), "suggested_label": pd.Series([], dtype=np.int64),
                             "probe_label": pd.Series([], dtype=np.int64)})
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
                        "flag": flag, "suggested_label": sugg.astype(np.int64),
                        "probe_label": top_c.astype(np.int64)})
    out.attrs["info"] = sig["info"]
    out.attrs["given_label"] = labels  # lets plot_noise_report draw per-class rates from this frame alone
    return out
