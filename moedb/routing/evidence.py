"""Passage evidence: which experts hold the query's nearest passages (resource selection, ReDDE-style).

The gate learns to classify *passages*; a question is shorter and worded otherwise, and on multi-domain
retrieval data the gate alone misroutes it far more often than the domain of its nearest passages does
(MTRAG: 72.7% vs 93.4% top-1). This estimator keeps a sample of each expert's passages ``X`` ``(m, d)``
and scores a query by the experts of its ``depth_`` nearest sampled passages, each counted ``1 / rank``
times the expert's size over its sample size (a sampled passage stands for that many), normalised into
a distribution ``P`` ``(n, E)``. The route's logits become ``z + weight_ * log(P + eps)``.

``weight_`` is fitted per file on question-like data (:meth:`fit`): pseudo-queries (the first words of
sampled passages; a pseudo-query that is a copy of its passage is scored with it left out of the evidence)
and the gate's logits for them,
choosing the weight and depth that classify them best (ties: the smaller weight). Where documents already look
like queries (intent utterances) the gate wins there and the weight stays 0, so intent routing is the
gate's alone; where they are passages, the evidence wins and carries the weight it earned.
Exact inner products over the sample (the sample is bounded: ``max_sample`` in all). NumPy only.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
DEPTHS = (1, 3, 10, 30)
FORMAT = 1


class PassageEvidence:
    """``depths`` / ``weights``: the grid :meth:`fit` chooses ``depth_`` (nearest sampled passages per query)
    and ``weight_`` from; ``eps``: floor of ``P`` inside the log."""

    def __init__(self, depths: Sequence[int] = DEPTHS, weights: Sequence[float] = WEIGHTS, eps: float = 1e-3):
        self.depths = tuple(depths)
        self.weights = tuple(weights)
        self.eps = eps

    def fit(self, X: np.ndarray, cols: np.ndarray, scale: np.ndarray, Zq: np.ndarray, Vq: np.ndarray,
            yq: np.ndarray, source: np.ndarray, scope: Optional[np.ndarray] = None, refuse_rate: float = 0.02,
            min_count: int = 30) -> "PassageEvidence":
        """Keep the sample and fit ``depth_`` and ``weight_``.

        ``X`` ``(m, d)`` unit vectors of the sampled passages, ``cols`` ``(m,)`` their expert column,
        ``scale`` ``(E,)`` each expert's passages per sampled passage; pseudo-queries: gate logits ``Zq``
        ``(p, E)``, unit vectors ``Vq`` ``(p, d)``, true columns ``yq`` ``(p,)`` and ``source`` ``(p,)``, the
        sample row each was taken from (left out of its own evidence; -1: none).
        ``scope`` ``(p,)``: the gate's scope score of each pseudo-query. When the evidence earns a weight (the
        documents are passages, not query examples) and there are at least ``min_count`` pseudo-queries,
        ``scope_threshold_`` is their ``refuse_rate`` quantile: questions score a lower scope than the held-out
        passages the gate calibrated its own threshold on, and the route takes the lower of the two, so that
        about ``refuse_rate`` of in-scope *questions* are refused (else ``nan``: the gate's threshold alone).
        """
        self.X_ = np.ascontiguousarray(X, dtype=np.float32)
        self.cols_ = np.asarray(cols, dtype=np.int64)
        self.scale_ = np.asarray(scale, dtype=np.float64)
        self.weight_, self.depth_ = 0.0, self.depths[0]
        self.figures_: dict = {"sample": int(len(self.X_)), "pseudo_queries": int(len(yq))}
        if len(yq) and len(self.X_):
            finite = np.where(np.isfinite(Zq), Zq, -1e9)
            acc = {}
            for d in self.depths:
                self.depth_ = d
                logP = np.log(self.distribution(Vq, exclude=source) + self.eps)
                for w in self.weights:
                    acc[(w, d)] = float(((finite + w * logP).argmax(axis=1) == yq).mean())
            best = max(acc.values())  # ties: the smallest weight, then the smallest depth
            self.weight_, self.depth_ = min(c for c, a in acc.items() if a >= best - 1e-12)
            if self.weight_ == 0.0:
                self.depth_ = self.depths[0]
            self.figures_.update(gate_accuracy=acc[(0.0, self.depths[0])], pseudo_accuracy=best,
                                 accuracy_by_weight_depth={f"{w}@{d}": a for (w, d), a in acc.items()})
        self.scope_threshold_ = float("nan")
        finite = np.zeros(0) if scope is None else np.asarray(scope, np.float64)[np.isfinite(scope)]
        if self.weight_ > 0 and len(finite) >= max(1, min_count):
            self.scope_threshold_ = float(np.quantile(finite, refuse_rate))
        self.figures_.update(weight=self.weight_, depth=self.depth_, scope_threshold=_figure(self.scope_threshold_))
        return self

    def distribution(self, Q: np.ndarray, exclude: Optional[np.ndarray] = None) -> np.ndarray:
        """``P`` ``(n, E)``: each expert's share of the evidence among the query's nearest sampled passages
        (rows sum to 1; a query with no sampled neighbour gets a uniform row). ``exclude`` ``(n,)``: a sample
        row to leave out per query (-1: none)."""
        n, E = len(Q), len(self.scale_)
        P = np.zeros((n, E))
        if not len(self.X_):
            return np.full((n, E), 1.0 / max(E, 1))
        S = np.asarray(Q, np.float32) @ self.X_.T
        if exclude is not None:
            ok = exclude >= 0
            S[np.flatnonzero(ok), exclude[ok]] = -np.inf
        d = min(self.depth_, S.shape[1])
        top = np.argpartition(-S, d - 1, axis=1)[:, :d]
        order = np.take_along_axis(top, np.argsort(-np.take_along_axis(S, top, axis=1), axis=1), axis=1)
        w = 1.0 / np.arange(1, d + 1)
        c = self.cols_[order]
        np.add.at(P, (np.repeat(np.arange(n), d), c.ravel()), (w[None, :] * self.scale_[c]).ravel())
        tot = P.sum(axis=1, keepdims=True)
        return np.where(tot > 0, P / np.where(tot > 0, tot, 1), 1.0 / E)

    def logits(self, Q: np.ndarray) -> np.ndarray:
        """``weight_ * log(P + eps)`` ``(n, E)``, added to the gate's logits (zeros when the weight is 0)."""
        if self.weight_ == 0.0:
            return np.zeros((len(Q), len(self.scale_)))
        return self.weight_ * np.log(self.distribution(Q) + self.eps)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, format=np.array(FORMAT), X=self.X_, cols=self.cols_, scale=self.scale_,
                 weight=np.array(self.weight_), depth=np.array(self.depth_), eps=np.array(self.eps),
                 scope_threshold=np.array(self.scope_threshold_))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "PassageEvidence":
        f = np.load(io.BytesIO(data))
        if int(f["format"]) != FORMAT:
            raise ValueError("unknown evidence format")
        ev = cls(eps=float(f["eps"]))
        ev.X_, ev.cols_, ev.scale_ = f["X"], f["cols"], f["scale"]
        ev.weight_, ev.depth_ = float(f["weight"]), int(f["depth"])
        ev.scope_threshold_ = float(f["scope_threshold"]) if "scope_threshold" in f.files else float("nan")
        ev.figures_ = {"sample": int(len(ev.X_)), "weight": ev.weight_, "depth": ev.depth_,
                       "scope_threshold": _figure(ev.scope_threshold_)}
        return ev


def _figure(threshold: float) -> Optional[float]:
    """A scope threshold as a figure: ``None`` when there is none (JSON has no NaN)."""
    return threshold if np.isfinite(threshold) else None
