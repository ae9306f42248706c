"""Out-of-fold label evidence: per-fold LDA (or softmax) probes and robust class prototypes, each fitted on
the other folds, and the probe's softmax temperature fitted with a label-noise floor."""
from __future__ import annotations

import math

import numpy as np
import torch

from .neighbours import _class_sum


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
