"""Duplicate groups (byte-identical files and feature near-duplicates), the cross-fitting folds they
share, and which copies of a cross-class group are kept."""
from __future__ import annotations

import numpy as np
import pandas as pd


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
