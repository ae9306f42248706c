"""Nearest neighbours of L2-normalised feature rows, in bounded memory: exact blockwise search (nothing
N x N), or an inverted file over spherical k-means cells above noise.knn_exact_max_n images."""
from __future__ import annotations

import numpy as np
import torch


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
