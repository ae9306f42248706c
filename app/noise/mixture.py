"""The Gaussian mixture on z = (atanh max prototype cosine, log p(given label | x)): clean, mislabelled
and off-topic components fitted by EM; its posteriors are the clean scores."""
from __future__ import annotations

import math

import numpy as np

MIN_IMAGES_FOR_MIXTURE = 50


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
