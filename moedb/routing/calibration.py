"""Calibration figures and fits: expected calibration error, the log-linear mix, abstention thresholds."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .gating import log_softmax


def ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of top-1 ``confidence`` ``(n,)`` against ``correct`` ``(n,)`` bool."""
    c = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if c.size == 0:
        return 0.0
    bins = np.minimum((c * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.sum() * abs(c[m].mean() - ok[m].mean())
    return float(total / c.size)


def fit_mix(features: Sequence[np.ndarray], y: np.ndarray, l2: float = 1e-3, max_iter: int = 200) -> np.ndarray:
    """Non-negative weights ``(K,)`` of a log-linear mix ``z = sum_k a_k F_k`` minimising the NLL of ``y``.

    ``features[k]`` ``(n, E)``: one signal per example and expert (held-out predictions);
    ``y`` ``(n,)`` true expert index. The overall scale of ``a`` is the (inverse) temperature,
    so the fitted mix is calibrated on these held-out examples.
    """
    from scipy.optimize import minimize

    F = [np.asarray(f, dtype=np.float64) for f in features]
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    idx = np.arange(n)
    Fy = np.stack([f[idx, y] for f in F])             # (K, n)

    def fg(a):
        Z = sum(ak * f for ak, f in zip(a, F))
        lp = log_softmax(Z)
        P = np.exp(lp)
        loss = -lp[idx, y].mean() + 0.5 * l2 * (a @ a)
        g = np.array([(P * f).sum(axis=1).mean() - fy.mean() for f, fy in zip(F, Fy)]) + l2 * a
        return loss, g

    a0 = np.ones(len(F))
    res = minimize(fg, a0, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * len(F),
                   options={"maxiter": max_iter})
    return res.x.astype(np.float64)


def abstain_threshold(top_confidence: np.ndarray, refuse_rate: float) -> float:
    """The confidence below which a ``refuse_rate`` share of in-scope examples falls (0.0 if rate <= 0)."""
    c = np.asarray(top_confidence, dtype=np.float64)
    if refuse_rate <= 0 or c.size == 0:
        return 0.0
    return float(np.quantile(c, refuse_rate, method="lower"))


def small_scope_threshold(inside: np.ndarray, away: np.ndarray, share: float) -> float:
    """The scope threshold of a small collection: ``(1 - share) * median(inside) + share * median(away)``.

    ``inside`` ``(n,)``: held-out scopes of documents against every expert (how in-scope queries score);
    ``away`` ``(n,)``: the same documents' scopes against the other experts only (how a query on a subject no
    expert holds scores). ``-inf`` (never abstain) when either has no finite value.
    """
    a = np.asarray(inside, dtype=np.float64)
    b = np.asarray(away, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not a.size or not b.size:
        return -np.inf
    return float((1.0 - share) * np.median(a) + share * np.median(b))
