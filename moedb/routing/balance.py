"""Load balancing in the spirit of auxiliary-loss-free balancing (NumPy only).

Every expert carries a selection bias ``b_e`` that is added to its logit only when choosing the top-k
(reported confidences never include it). After each query the bias moves by ``rate`` toward the
expert's fair share: an expert is *eligible* for a query when its logit is within ``margin`` of the
best one (the near-equivalent candidates); its expected load is ``min(k, |eligible|) / |eligible|``
per eligible query, and ``b_e += rate * (expected_e - load_e)``, bounded to ``[-max_bias, max_bias]``. Over
the eligible set the steps sum to zero, so the biases stay centred instead of drifting to the bound.
With ``means``/``similarity``, eligible experts must also have a mean direction within that cosine of the
best expert's. Distinct experts are rarely eligible together, so their decisions are left alone; replicas
are evened out.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def eligible(z: np.ndarray, margin: float) -> np.ndarray:
    """Experts within ``margin`` of the best logit: bool ``(n, E)`` for logits ``z`` ``(n, E)``."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    return z >= z.max(axis=1, keepdims=True) - margin


def expected_share(elig_row: np.ndarray, k: int) -> np.ndarray:
    """Fair share of one query for each expert: ``min(k, m) / m`` for the ``m`` eligible ones, else 0; ``(E,)``."""
    m = int(elig_row.sum())
    return elig_row * (min(k, m) / m if m else 0.0)


def bias_step(bias: np.ndarray, load: np.ndarray, expected: np.ndarray, rate: float, max_bias: float) -> np.ndarray:
    """One bounded update of ``bias`` ``(E,)`` toward the fair share: ``+rate * (expected - load)``."""
    step = rate * (np.asarray(expected, np.float64) - np.asarray(load, np.float64))
    return np.clip(np.asarray(bias, np.float64) + step, -max_bias, max_bias)


def load_figures(load: np.ndarray) -> dict[str, float]:
    """Share per expert and the spread of ``load`` ``(E,)``: coefficient of variation, max/mean."""
    load = np.asarray(load, dtype=np.float64)
    total = load.sum()
    mean = load.mean() if load.size else 0.0
    return {"total": float(total),
            "cv": float(load.std() / mean) if mean > 0 else 0.0,
            "max_over_mean": float(load.max() / mean) if mean > 0 else 0.0}


class Balancer:
    """In-memory balancing state for ``E`` experts over one routing call.

    ``bias`` ``(E,)``: current biases (from the file); ``window_used`` ``(E,)``: selections in the current
    capacity window. After :meth:`choose` calls, ``delta_bias_``, ``load_``, ``expected_`` ``(E,)`` and
    ``window_used`` hold what must be persisted.
    """

    def __init__(self, bias: np.ndarray, rate: float = 0.01, max_bias: float = 0.5, margin: float = 1.0,
                 capacity: Optional[int] = None, window_used: Optional[np.ndarray] = None,
                 means: Optional[np.ndarray] = None, similarity: float = 0.0):
        self.bias = np.asarray(bias, dtype=np.float64).copy()
        self.rate = rate
        self.max_bias = max_bias
        self.margin = margin
        self.capacity = capacity
        self.means = means          # (E, d) unit mean direction of each expert, or None
        self.similarity = similarity
        E = len(self.bias)
        self.window_used = np.zeros(E, np.int64) if window_used is None else np.asarray(window_used, np.int64).copy()
        self._start = self.bias.copy()
        self._used0 = self.window_used.copy()
        self.load_ = np.zeros(E)
        self.expected_ = np.zeros(E)

    @property
    def delta_bias_(self) -> np.ndarray:
        return self.bias - self._start

    @property
    def window_delta_(self) -> np.ndarray:
        return self.window_used - self._used0

    def blocked(self) -> Optional[np.ndarray]:
        """Experts at capacity in the current window (bool ``(E,)``), or ``None`` without a capacity."""
        if self.capacity is None:
            return None
        return self.window_used >= self.capacity

    def observe(self, z_row: np.ndarray, chosen: np.ndarray, k: int) -> None:
        """Record one routed query: its logits ``(E,)`` and the chosen expert indices; update the bias.

        Only the eligible experts (usually a handful) are touched, so the cost does not grow with ``E``.
        """
        if len(chosen) == 0:
            return
        z_row = np.where(np.isfinite(z_row), z_row, -np.inf)
        idx = np.flatnonzero(eligible(z_row[None, :], self.margin)[0])
        if self.means is not None and self.similarity > 0 and len(idx) > 1:
            # near-equivalent = close in score *and* in content to the best expert (replicas, not rivals)
            idx = idx[(self.means[idx] @ self.means[int(np.argmax(z_row))]) >= self.similarity]
        exp = expected_share(np.ones(len(idx), dtype=bool), k)
        # a far second choice (outside the near-equivalent set) is not a balancing matter
        picked = set(np.asarray(chosen).tolist())
        load = np.array([1.0 if i in picked else 0.0 for i in idx.tolist()])
        self.bias[idx] = bias_step(self.bias[idx], load, exp, self.rate, self.max_bias)
        self.load_[idx] += load
        self.expected_[idx] += exp
        self.window_used[chosen] += 1
