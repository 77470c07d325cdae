"""Several centroids per expert: spherical k-means on an expert's unit document vectors (NumPy)."""
from __future__ import annotations

import numpy as np


def spherical_kmeans(X: np.ndarray, k: int, n_iter: int = 20, seed: int = 0) -> np.ndarray:
    """Unit centroids ``(k', d)`` (``k' = min(k, n)``) of unit rows ``X`` ``(n, d)`` by cosine k-means.

    Seeding is k-means++ on cosine distance with a fixed ``seed`` so results are reproducible.
    """
    X = np.asarray(X, dtype=np.float32)
    n = len(X)
    k = max(1, min(int(k), n))
    if k == 1 or n == 0:
        c = X.mean(axis=0, keepdims=True) if n else X[:0]
        return _unit(c)
    rng = np.random.default_rng(seed)
    C = [X[rng.integers(n)]]
    d2 = np.maximum(1.0 - X @ C[0], 0.0)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        C.append(X[rng.choice(n, p=p)])
        d2 = np.minimum(d2, np.maximum(1.0 - X @ C[-1], 0.0))
    C = np.stack(C)
    assign = None
    for _ in range(n_iter):
        new = np.argmax(X @ C.T, axis=1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = X[assign == j]
            if len(members):
                C[j] = members.mean(axis=0)
        C = _unit(C)
    return C.astype(np.float32)


def _unit(C: np.ndarray) -> np.ndarray:
    nrm = np.linalg.norm(C, axis=1, keepdims=True)
    return (C / np.where(nrm > 0, nrm, 1.0)).astype(np.float32)


def multi_centroids(groups: list[np.ndarray], docs_per_centroid: int = 25, max_centroids: int = 8,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Centroids of every expert: ``(centroids (M, d) float32, owner (M,) int32)``.

    Expert ``e`` (rows ``groups[e]`` ``(n_e, d)``) gets ``clip(n_e // docs_per_centroid, 1, max_centroids)``
    centroids; an expert without rows gets none.
    """
    cs, owner = [], []
    for e, X in enumerate(groups):
        if len(X) == 0:
            continue
        k = int(np.clip(len(X) // max(docs_per_centroid, 1), 1, max_centroids))
        c = spherical_kmeans(X, k, seed=seed + e)
        cs.append(c)
        owner.append(np.full(len(c), e, dtype=np.int32))
    if not cs:
        d = groups[0].shape[1] if groups else 0
        return np.zeros((0, d), np.float32), np.zeros(0, np.int32)
    return np.concatenate(cs), np.concatenate(owner)


def max_per_owner(S: np.ndarray, owner: np.ndarray, n_owners: int) -> np.ndarray:
    """Per-owner maximum of the columns of ``S`` ``(n, M)`` -> ``(n, n_owners)`` (``-1`` for owners without columns)."""
    out = np.full((S.shape[0], n_owners), -1.0, dtype=np.float32)
    if S.shape[1] == 0:
        return out
    order, starts, firsts, ordered = owner_groups(owner)
    red = np.maximum.reduceat(S if ordered else S[:, order], starts, axis=1)
    out[:, firsts] = red
    return out


def owner_groups(owner: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """``(order, starts, owner of each group, already sorted)`` for a reduceat over ``owner`` ``(M,)``."""
    o = np.asarray(owner)
    ordered = bool(np.all(o[1:] >= o[:-1])) if len(o) > 1 else True
    order = np.arange(len(o)) if ordered else np.argsort(o, kind="stable")
    so = o[order]
    starts = np.flatnonzero(np.r_[True, so[1:] != so[:-1]])
    return order, starts, so[starts], ordered
