"""Gating primitives: temperature softmax, log-softmax, top-k selection with abstention and balancing bias."""
from __future__ import annotations

from typing import Optional

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


def logsumexp(x: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """``log(sum(exp(x)))`` along ``axis``, computed stably (float64); ``(n, E) -> (n,)`` by default."""
    z = np.asarray(x, dtype=np.float64)
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    out = m + np.log(np.exp(z - m).sum(axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``log(softmax(x))`` computed stably; same shape as ``x`` (float64)."""
    z = np.asarray(x, dtype=np.float64)
    return z - logsumexp(z, axis=axis, keepdims=True)


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
    if k < e and e > 64:
        # partial selection first, then a stable sort of the small candidate set
        part = np.argpartition(-conf, k - 1, axis=1)[:, :k]
        rows = np.arange(n)[:, None]
        # argpartition breaks ties arbitrarily: widen to every column tied with the k-th value
        kth = conf[rows, part].min(axis=1, keepdims=True)
        out = np.empty((n, k), dtype=np.int64)
        for i in range(n):
            cand = np.flatnonzero(conf[i] >= kth[i, 0])
            order = np.argsort(-conf[i, cand], kind="stable")
            out[i] = cand[order[:k]]
        return out
    return np.argsort(-conf, axis=1, kind="stable")[:, :k]


def select(conf: np.ndarray, k: int, min_confidence: float, bias: Optional[np.ndarray] = None,
           logits: Optional[np.ndarray] = None, blocked: Optional[np.ndarray] = None,
           admit: Optional[np.ndarray] = None, exclude: Optional[np.ndarray] = None,
           relative: float = 0.0) -> list[np.ndarray]:
    """Per row, up to ``k`` expert indices; an empty array means the router abstains on that query.

    ``conf`` ``(n, E)``: calibrated confidences. A row abstains when its best confidence is below
    ``min_confidence``, or, when ``admit`` ``(n,)`` bool is given, exactly when ``admit`` is False
    (``min_confidence`` then only filters the experts after the best one). Otherwise the candidates
    are the experts with confidence >= ``min_confidence`` (never fewer than the best one), ranked by ``logits + bias`` when a selection ``bias`` ``(E,)`` is
    given (the bias moves *which* experts are chosen, not their confidences), else by ``conf``.
    ``blocked`` ``(E,)`` bool masks experts at capacity unless no other candidate is left.
    ``exclude`` ``(E,)`` bool: experts that are never selected (refusal experts); a row whose only
    experts are excluded abstains. ``relative``: an expert after the best one also needs a confidence of at
    least ``relative`` x the best one's (``k`` is a maximum, not a quota).
    """
    conf = np.asarray(conf, dtype=np.float64)
    n, e = conf.shape
    if e == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(n)]
    if exclude is not None and np.any(exclude):
        if np.all(exclude):
            return [np.zeros(0, dtype=np.int64) for _ in range(n)]
        conf = np.where(np.asarray(exclude, dtype=bool)[None, :], -np.inf, conf)
    if admit is None:
        admit = conf.max(axis=1) >= min_confidence
    admit = np.asarray(admit, dtype=bool)
    # the floor of every expert after the best one, per row (n, 1)
    floor = np.maximum(min_confidence, float(relative) * conf.max(axis=1, keepdims=True))
    if bias is None and blocked is None:
        idx = top_k(conf, k)
        rows = np.arange(n)[:, None]
        keep = conf[rows, idx] >= floor
        keep[:, 0] = True
        return [idx[i][keep[i]] if admit[i] else idx[i][:0] for i in range(n)]
    rank = np.asarray(logits if logits is not None else np.log(np.maximum(conf, 1e-300)), dtype=np.float64)
    if bias is not None:
        rank = rank + np.asarray(bias, dtype=np.float64)[None, :]
    out = []
    for i in range(n):
        best = int(np.argmax(conf[i]))
        if not admit[i]:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        ok = conf[i] >= floor[i, 0]
        ok[best] = True
        if blocked is not None and (ok & ~blocked).any():
            ok &= ~blocked
        cand = np.flatnonzero(ok)
        r = rank[i, cand]
        if k >= 1 and len(cand) > 4 * k and not np.isnan(r).any():
            # thousands of candidates: keep those tied with or above the k-th, then sort
            sub = np.flatnonzero(r >= np.partition(r, len(r) - k)[len(r) - k])
            cand, r = cand[sub], r[sub]
        order = np.argsort(-r, kind="stable")[:k]
        out.append(cand[order].astype(np.int64))
    return out
