"""Gating primitives: cosine scores, temperature softmax, top-k selection with abstention."""
from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, temperature: float = 1.0, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax of ``x / temperature`` along ``axis``; same shape as ``x``.

    Columns equal to ``-inf`` (masked experts) get probability 0.
    """
    if not temperature > 0:
        raise ValueError("temperature must be > 0")
    z = np.asarray(x, dtype=np.float64) / temperature
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(z - m)
    s = e.sum(axis=axis, keepdims=True)
    return e / np.where(s > 0, s, 1.0)


def cosine_scores(queries: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cosine similarity of unit queries ``(n, d)`` to centroids ``(E, d)`` (normalised here) -> ``(n, E)``."""
    c = np.asarray(centroids, dtype=np.float32)
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    c = c / np.where(norms > 0, norms, 1.0)
    return np.asarray(queries, dtype=np.float32) @ c.T


def top_k(conf: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values per row of ``conf`` ``(n, E)``, best first -> ``(n, min(k, E))``.

    Ties are broken by the lower index, so the result is deterministic.
    """
    conf = np.asarray(conf)
    n, e = conf.shape
    k = min(int(k), e)
    if k <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    # stable sort on -conf keeps lower index first among ties
    return np.argsort(-conf, axis=1, kind="stable")[:, :k]


def select(conf: np.ndarray, k: int, min_confidence: float) -> list[np.ndarray]:
    """Per row, the top-``k`` expert indices whose confidence is >= ``min_confidence``.

    An empty array for a row means the router abstains on that query.
    """
    idx = top_k(conf, k)
    rows = np.arange(conf.shape[0])[:, None]
    keep = conf[rows, idx] >= min_confidence
    return [idx[i][keep[i]] for i in range(conf.shape[0])]
