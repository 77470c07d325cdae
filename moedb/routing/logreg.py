"""A multinomial logistic-regression gate (fit with SciPy L-BFGS; applying it is plain NumPy).

Besides ordinary labelled examples it accepts counter-examples (negative feedback): a
counter-example ``(x, e)`` adds ``-w log(1 - p_e(x))`` to the loss.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .gating import log_softmax


class SoftmaxRegression:
    """``p(e | x) = softmax(x @ coef_ + intercept_)``.

    ``C``: inverse ridge strength as in scikit-learn (loss = ``C * sum(w_i * nll_i) + ||W||^2 / 2``);
    ``tol``: gradient tolerance of L-BFGS on the mean loss.
    Learned: ``coef_`` ``(d, E)`` float32, ``intercept_`` ``(E,)`` float32, ``n_iter_``.
    """

    def __init__(self, C: float = 10.0, max_iter: int = 300, tol: float = 1e-5):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X: np.ndarray, y: np.ndarray, n_classes: int, sample_weight: Optional[np.ndarray] = None,
            X_neg: Optional[np.ndarray] = None, y_neg: Optional[np.ndarray] = None,
            w_neg: Optional[np.ndarray] = None, warm_start: Optional[tuple[np.ndarray, np.ndarray]] = None
            ) -> "SoftmaxRegression":
        """``X`` ``(n, d)``, ``y`` ``(n,)`` in ``[0, n_classes)``; counter-examples ``X_neg`` ``(m, d)``, ``y_neg`` ``(m,)``."""
        from scipy.optimize import minimize

        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        n, d = X.shape
        E = int(n_classes)
        w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        has_neg = X_neg is not None and len(X_neg) > 0
        if has_neg:
            Xn = np.asarray(X_neg, dtype=np.float32)
            yn = np.asarray(y_neg, dtype=np.int64)
            wn = np.ones(len(Xn)) if w_neg is None else np.asarray(w_neg, dtype=np.float64)
        total = w.sum() + (wn.sum() if has_neg else 0.0)
        total = total if total > 0 else 1.0
        rows = np.arange(n)
        w32 = w.astype(np.float32)
        unit_w = bool(np.all(w == 1.0))
        l2 = 1.0 / (self.C * total)  # sklearn's C, with the loss divided by the total weight

        def fg(theta):
            W = theta[:d * E].reshape(d, E)
            b = theta[d * E:]
            # one (n, E) float32 buffer goes logits -> probabilities -> gradient in place: at thousands
            # of experts it is the whole cost of a refit (no one-hot matrix, no float64 copies)
            Z = X @ W.astype(np.float32)
            Z += b.astype(np.float32)
            zy = Z[rows, y].astype(np.float64)
            m = Z.max(axis=1)
            Z -= m[:, None]
            np.exp(Z, out=Z)
            s = Z.sum(axis=1, dtype=np.float64)
            loss = -(w * (zy - (m.astype(np.float64) + np.log(s)))).sum()
            Z *= (1.0 / s).astype(np.float32)[:, None]  # softmax probabilities P
            if not unit_w:
                Z *= w32[:, None]
            Z[rows, y] -= w32  # (P - onehot(y)) * w
            gW = (X.T @ Z).astype(np.float64)
            gb = Z.sum(axis=0, dtype=np.float64)
            if has_neg:
                Zn = Xn @ W.astype(np.float32) + b.astype(np.float32)
                lpn = log_softmax(Zn)
                pe = np.clip(np.exp(lpn[np.arange(len(Xn)), yn]), 0.0, 1 - 1e-9)
                loss += -(wn * np.log1p(-pe)).sum()
                Pn = np.exp(lpn)
                On = np.zeros_like(Pn)
                On[np.arange(len(Xn)), yn] = 1.0
                Gn = (pe / (1 - pe) * wn)[:, None] * (On - Pn)
                gW += (Xn.T @ Gn.astype(np.float32)).astype(np.float64)
                gb += Gn.sum(axis=0)
            loss = loss / total + 0.5 * l2 * (W * W).sum()
            gW = gW / total + l2 * W
            gb = gb / total
            return loss, np.concatenate([gW.ravel(), gb])

        theta0 = np.zeros(d * E + E)
        if warm_start is not None:
            W0, b0 = warm_start
            theta0[:d * E] = np.asarray(W0, dtype=np.float64).ravel()
            theta0[d * E:] = np.asarray(b0, dtype=np.float64)
        res = minimize(fg, theta0, jac=True, method="L-BFGS-B",
                       options={"maxiter": self.max_iter, "gtol": self.tol, "ftol": 1e-12})
        self.coef_ = res.x[:d * E].reshape(d, E).astype(np.float32)
        self.intercept_ = res.x[d * E:].astype(np.float32)
        self.n_iter_ = int(res.nit)
        return self

    def decision(self, X: np.ndarray) -> np.ndarray:
        """Logits ``(n, E)`` float32."""
        return np.asarray(X, dtype=np.float32) @ self.coef_ + self.intercept_

    def log_proba(self, X: np.ndarray) -> np.ndarray:
        """Log-probabilities ``(n, E)`` float64."""
        return log_softmax(self.decision(X))
