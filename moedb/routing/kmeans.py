"""The one k-means of moedb (scikit-learn's ``KMeans`` on unit vectors, centroids re-normalised: spherical
k-means by the usual approximation), used for the gate's several centroids per expert, the hierarchy's node
centroids and the split of an expert; plus the per-owner reductions over centroid scores."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import InvalidInput


def kmeans(X: np.ndarray, k: int, seed: int = 0, n_init: int = 1, max_iter: int = 20
           ) -> tuple[np.ndarray, np.ndarray]:
    """K-means of unit rows ``X`` ``(n, d)`` -> ``(labels (n,) int64 in 0..k'-1, unit centroids (k', d) float32)``.

    scikit-learn's ``KMeans`` (Lloyd, k-means++ seeding, ``n_init`` starts, ``random_state=seed``: reproducible)
    with its centroids scaled back to unit length. ``k' = min(k, distinct rows of X)`` (1 when ``n > 0``
    and ``k < 2``), every cluster non-empty. The defaults (one start, at most 20 iterations) are the gate's,
    which calls this for every expert on every fit: it runs on one OpenMP thread, as a problem this small
    is slower on several (and much slower on a busy machine).
    """
    X = np.asarray(X, dtype=np.float32)
    n = len(X)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, X.shape[1] if X.ndim == 2 else 0), np.float32)
    k = _distinct_at_most(X, max(1, min(int(k), n)))
    if k == 1:
        return np.zeros(n, np.int64), unit_rows(X.mean(axis=0, keepdims=True))
    from sklearn.cluster import KMeans

    with _one_thread():
        km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=max_iter, algorithm="lloyd",
                    random_state=int(seed) % 2**32).fit(X)
    return km.labels_.astype(np.int64), unit_rows(km.cluster_centers_)


def _distinct_at_most(X: np.ndarray, k: int) -> int:
    """``min(k, number of distinct rows of X)``, stopping as soon as ``k`` distinct rows are seen."""
    seen: set[bytes] = set()
    for row in X:
        seen.add(row.tobytes())
        if len(seen) >= k:
            break
    return len(seen)


_CONTROLLER = None


def _one_thread():
    """A context limiting OpenMP (scikit-learn's k-means threads) to one thread; the controller that finds
    the loaded libraries is built once (building it costs milliseconds, a limit through it microseconds)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="openmp")


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
        _, c = kmeans(X, k, seed=seed + e)
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


def unit_rows(m: np.ndarray) -> np.ndarray:
    """Rows of ``m`` ``(n, d)`` scaled to unit length (zero rows stay zero)."""
    n = np.linalg.norm(m, axis=1, keepdims=True)
    return (m / np.where(n > 0, n, 1.0)).astype(np.float32)


def choose_clusters(X: np.ndarray, n: Optional[int], max_n: Optional[int] = None, seed: int = 0,
                    sample: int = 3000) -> tuple[np.ndarray, int, dict[int, float]]:
    """K-means over unit vectors ``X`` ``(m, d)``; ``n=None`` picks k by the best cosine silhouette.

    Candidates are ``2..max_n`` (default ``min(20, max(2, round(sqrt(m / 2))))``, the usual
    rule of thumb). Returns ``(labels (m,) int64 in 0..k-1, k, {k: silhouette})``.
    """
    from sklearn.metrics import silhouette_score

    m = len(X)
    distinct = len(np.unique(X, axis=0))

    def fit(k: int) -> np.ndarray:
        return kmeans(X, k, seed, n_init=4, max_iter=300)[0]

    if n is not None:
        if n > distinct:
            raise InvalidInput(f"cannot split {m} documents with {distinct} distinct vectors into {n} experts")
        labels = fit(n)
        sil = {n: float(silhouette_score(X, labels, metric="cosine", sample_size=min(sample, m),
                                         random_state=seed))} if 2 <= n < m and len(set(labels)) > 1 else {}
        return labels, n, sil
    if distinct < 2:
        raise InvalidInput("all documents have the same vector; there is nothing to split")
    top = max_n if max_n is not None else min(20, max(2, int(round(np.sqrt(m / 2)))))
    top = min(top, distinct, m - 1)
    if top < 2:
        return fit(2), 2, {}
    best: tuple[float, int, Optional[np.ndarray]] = (-2.0, 2, None)
    sil: dict[int, float] = {}
    for k in range(2, top + 1):
        labels = fit(k)
        if len(set(labels)) < 2:
            continue
        s = float(silhouette_score(X, labels, metric="cosine", sample_size=min(sample, m), random_state=seed))
        sil[k] = s
        if s > best[0]:
            best = (s, k, labels)
    if best[2] is None:
        return fit(2), 2, sil
    return best[2], best[1], sil
