"""The hybrid gate: several centroids per expert + a learned softmax gate + a lexical signal.

The three signals are combined log-linearly, ``z_e = a_c * centroid_e + a_g * gate_e + a_l * lexical_e``,
and ``softmax(z)`` is the confidence. The weights ``a`` (their scale is the temperature) are fitted by
cross-fitting: each expert's documents are split into folds, the signals are learned without one
fold and scored on it, and ``a`` minimises the negative log-likelihood of those held-out predictions.
Abstention uses a *scope* score rather than the top confidence (a softmax is confident about
anything far from every expert as long as one expert is less far):
``scope = (max centroid cosine - mu_c) / sd_c + (logsumexp(gate logits) - mu_g) / sd_g``, standardised
on the held-out documents. Its threshold ``scope_threshold_`` is the ``refuse_rate`` quantile of the
held-out scopes, so about that share of in-scope queries is refused. On CLINC150 val, with the same
refusal of in-scope queries, it catches far more out-of-scope queries than the top confidence does
(AUROC 0.987 vs 0.958). ``threshold_`` (the same quantile of held-out top-1 confidences) stays the
floor for the second and later experts of a route. Then every signal is refitted on all documents.

*Small collections* (fewer than ``small_heldout`` held-out documents, no refusal experts): a quantile of a
few dozen scopes is little more than their minimum (and below ``min_heldout`` there is none), so the
threshold is also at least :func:`~moedb.routing.calibration.small_scope_threshold`: halfway between the
median held-out scope and the median scope of the same documents scored against the *other* experts only
(how a question on a subject no expert holds scores). Figure ``scope_rule``: ``small``, ``heldout`` or ``none``.

*Refusal experts* (``refuse[e]``) hold examples of queries no expert should answer. They are classes
of the gate like any other, but the scope is taken over the other experts only and lowered by
``refuse_weight * (logsumexp(z[refusal]) - logsumexp(z[others]))``; a query whose best class is a
refusal expert is refused too, and the scope threshold is set so that both together refuse about
``refuse_rate`` of the held-out in-scope documents. (On CLINC150 val, 100 out-of-scope examples
as a refusal expert raised the AUROC of the scope from 0.987 to 0.991; ``refuse_weight`` 0.5 was
the best of 0.25/0.5/1/2 there.)

After :meth:`Database.tune_embedder`, the documents the embedder trained on are no evidence of how new
queries score (they sit closer to their expert), so only the documents it held out (``calibration``)
are held out here; the others are learned from in every fold.

Fitting imports SciPy; applying a fitted gate is NumPy only, and its state is plain arrays.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np

from ..settings import DEFAULTS
from .calibration import abstain_threshold, ece, fit_mix, small_scope_threshold
from .gating import log_softmax, logsumexp, softmax
from .kmeans import max_per_owner, multi_centroids, owner_groups
from .lexical import LexicalIndex
from .logreg import SoftmaxRegression

COMPONENTS = ("centroid", "gate", "lexical")
# figures that describe the held-out calibration (kept with it when a refit reuses it)
HELDOUT_FIGURES = ("calibration_documents", "heldout_feedback", "heldout", "scope_rule", "heldout_accuracy",
                   "heldout_ece", "heldout_refused", "gate_only_accuracy", "centroid_only_accuracy", "refusal_heldout",
                   "refusal_heldout_refused")
FORMAT = 3
# how far the small-collection scope threshold sits from the in-scope median towards the median of documents
# scored against the other experts. Chosen on CLINC150 train/val (5 or 3 intents as experts, 5-20 documents
# each, 10 seeds): 0.5 answered 94-97% of in-scope questions correctly and refused 93-97% of off-topic ones;
# 0.4 refused 96-98% but answered only 93-94% with 5 experts; 0.6 let 3 experts with 5-20 documents answer
# 20-43% of off-topic questions. benches/bench_small.py measures the chosen rule (20 seeds).
SMALL_SHARE = 0.5


def _away(cen: np.ndarray, logit: np.ndarray, y: np.ndarray, R: np.ndarray) -> np.ndarray:
    """``(n, 2)``: max centroid cosine and logsumexp of the logits ``(n, E)`` over the answering experts other
    than each row's own ``y`` (``-inf`` when there is none): how an out-of-scope query scores."""
    other = ~R[None, :] & (np.arange(cen.shape[1])[None, :] != np.asarray(y)[:, None])
    c = np.where(other, cen, -np.inf).max(axis=1)
    with np.errstate(divide="ignore"):  # (no other expert: -inf)
        g = logsumexp(np.where(other, logit, -np.inf))
    return np.stack([c, g], axis=1)


class HybridGate:
    """Fit with :meth:`fit`; score with :meth:`components` / :meth:`logits` / :meth:`confidence`.

    Learned state (``E`` experts, ``M`` centroids, ``d`` dimensions): ``centroids_`` ``(M, d)``,
    ``owner_`` ``(M,)``, ``coef_`` ``(d, E)``, ``intercept_`` ``(E,)``, ``lex_`` (a :class:`LexicalIndex`
    or ``None``), ``mix_`` ``(3,)``, ``threshold_`` (float), ``scope_stats_`` ``(4,)`` (mu_c, sd_c, mu_g,
    sd_g), ``scope_threshold_`` (float, ``-inf`` = never abstain), ``refuse_`` ``(E,)`` bool (refusal
    experts), ``figures_`` (dict).
    """

    def __init__(self, C: float = DEFAULTS.gate_C, folds: int = DEFAULTS.gate_folds,
                 refuse_rate: float = DEFAULTS.refuse_rate, docs_per_centroid: int = 25, max_centroids: int = 8,
                 max_fit_docs: int = 2000, lexical: bool = DEFAULTS.lexical, max_iter: int = DEFAULTS.gate_max_iter,
                 min_heldout: int = DEFAULTS.min_heldout, max_total_docs: int = DEFAULTS.gate_max_docs,
                 refuse_weight: float = 0.5, small_heldout: int = DEFAULTS.small_heldout,
                 small_share: float = SMALL_SHARE, seed: int = 0):
        self.C = C
        self.folds = folds
        self.refuse_rate = refuse_rate
        self.docs_per_centroid = docs_per_centroid
        self.max_centroids = max_centroids
        self.max_fit_docs = max_fit_docs
        self.lexical = lexical
        self.max_iter = max_iter
        self.min_heldout = min_heldout
        self.max_total_docs = max_total_docs
        self.refuse_weight = refuse_weight
        self.small_heldout = small_heldout
        self.small_share = small_share
        self.seed = seed

    # ------------------------------------------------------------------ fitting
    def _signals(self, groups, texts, keywords, descriptions, fb, warm):
        """Fit the three signals on ``groups`` (list of ``(n_e, d)``); returns (centroids, owner, lr, lex)."""
        E = len(groups)
        C, owner = multi_centroids(groups, self.docs_per_centroid, self.max_centroids, self.seed)
        X = np.concatenate([g for g in groups if len(g)]).astype(np.float32)
        y = np.concatenate([np.full(len(g), e, dtype=np.int64) for e, g in enumerate(groups) if len(g)])
        # every expert weighs the same in the gate, whatever its size (a prior, not a popularity contest)
        counts = np.bincount(y, minlength=E).astype(np.float64)
        w = (len(y) / (E * counts))[y] if E else np.ones(len(y))
        Xf, ef, rf = fb
        pos = rf > 0
        if pos.any():
            X = np.concatenate([X, Xf[pos]])
            y = np.concatenate([y, ef[pos]])
            w = np.concatenate([w, rf[pos]])
        neg = rf < 0
        lr = SoftmaxRegression(self.C, self.max_iter).fit(
            X, y, E, sample_weight=w, X_neg=Xf[neg] if neg.any() else None, y_neg=ef[neg] if neg.any() else None,
            w_neg=-rf[neg] if neg.any() else None, warm_start=warm)
        lex = None
        if self.lexical and texts is not None:
            lex = LexicalIndex().fit(texts, keywords or (), descriptions or (), cache=self._grams)
        return C, owner, lr, lex

    def fit(self, groups: Sequence[np.ndarray], texts: Optional[Sequence[Sequence[str]]] = None,
            keywords: Sequence[Sequence[str]] = (), descriptions: Sequence[str] = (),
            feedback: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
            warm_start: Optional[tuple[np.ndarray, np.ndarray]] = None,
            refuse: Optional[Sequence[bool]] = None,
            calibration: Optional[Sequence[np.ndarray]] = None,
            calibrated: Optional["HybridGate"] = None) -> "HybridGate":
        """``groups[e]``: unit document vectors ``(n_e, d)`` of expert ``e`` (every ``n_e >= 1``);
        ``texts[e]``: the same documents' texts (``None`` disables the lexical signal);
        ``feedback``: ``(vectors (m, d), expert index (m,), reward (m,))``;
        ``warm_start``: ``(coef (d, E), intercept (E,))`` to start the final gate fit from;
        ``refuse`` ``(E,)`` bool: which experts are refusal experts (examples of out-of-scope queries);
        ``calibration[e]`` ``(n_e,)`` bool: the documents that may serve as held-out evidence (the mix, the
        thresholds, the figures). ``None`` = all of them. A document that trained the embedder is no
        evidence of how unseen queries score (it sits closer to its expert than they will), so after
        :meth:`Database.tune_embedder` only the documents it held out calibrate the gate; the others are
        still learned from in every fold.
        ``calibrated``: a gate fitted on nearly the same experts whose held-out calibration (mix weights,
        thresholds, scope statistics and held-out figures) is kept: no cross-fitting, only the final fit
        (a few experts added or changed barely move these global quantities; see ``recalibrate_after``).
        """
        rng = np.random.default_rng(self.seed)
        self._grams: dict = {}  # n-gram counts per text, shared by the cross-fitted lexical fits
        E = len(groups)
        d = groups[0].shape[1]
        groups = [np.asarray(g, dtype=np.float32) for g in groups]
        R = np.zeros(E, dtype=bool) if refuse is None else np.asarray(refuse, dtype=bool).reshape(E)
        self.refuse_ = R
        # cap the documents used per expert (a broad expert does not need all of them to be learned), and
        # the total, so that a refit of thousands of experts stays a matter of seconds to minutes
        per_expert = min(self.max_fit_docs, max(8, int(self.max_total_docs) // max(E, 1)))
        keep = [np.sort(rng.permutation(len(g))[:per_expert]) for g in groups]
        groups = [g[k] for g, k in zip(groups, keep)]
        calib = [np.ones(len(g), dtype=bool) for g in groups] if calibration is None else \
            [np.asarray(c, dtype=bool).reshape(-1)[k] for c, k in zip(calibration, keep)]
        if texts is not None:
            texts = [[t[i] for i in k] for t, k in zip(texts, keep)]
        fb = feedback if feedback is not None else (np.zeros((0, d), np.float32), np.zeros(0, np.int64), np.zeros(0))
        fb = (np.asarray(fb[0], np.float32).reshape(-1, d), np.asarray(fb[1], np.int64), np.asarray(fb[2], np.float64))
        lexical_on = self.lexical and texts is not None
        figures: dict = {"experts": E, "documents": int(sum(len(g) for g in groups)), "feedback": int(len(fb[2]))}
        if calibration is not None:
            figures["calibration_documents"] = int(sum(int(c.sum()) for c in calib))
        # ---- cross-fitted held-out signals
        K = 0 if calibrated is not None else int(self.folds)
        fold = [rng.permutation(len(g)) % K if len(g) >= 2 and K >= 2 else np.full(len(g), -1) for g in groups]
        # feedback is cross-fitted too: a held-out positive event is one more labelled example for the mix
        # (it tells how much the feedback-trained gate should count), never for the refusal threshold
        fb_fold = rng.permutation(len(fb[2])) % max(K, 1)
        held_F: list[list[np.ndarray]] = [[], [], []]
        held_y: list[np.ndarray] = []
        held_scope: list[np.ndarray] = []  # (n, 2): max centroid cosine, logsumexp of the gate's logits
        away_scope: list[np.ndarray] = []  # (n, 2): the same over the *other* answering experts only
        # (both over the experts that answer, not the refusal experts: see score)
        fold_gates: list[tuple[np.ndarray, np.ndarray]] = []
        fbh_F: list[list[np.ndarray]] = [[], [], []]
        fbh_y: list[np.ndarray] = []
        for f in range(K if K >= 2 else 0):
            # documents that are no evidence (calib False) are learned from in every fold, never held out
            tr = [g[(fo != f) | ~c] for g, fo, c in zip(groups, fold, calib)]
            te = [g[(fo == f) & c] for g, fo, c in zip(groups, fold, calib)]
            fb_in = fb_fold != f
            fb_out = ~fb_in & (fb[2] > 0)
            if not any(len(t) for t in te) and not fb_out.any():
                continue
            tr_texts = [[t for t, fo_i, c_i in zip(tx, fo, c) if fo_i != f or not c_i]
                        for tx, fo, c in zip(texts, fold, calib)] if lexical_on else None
            te_texts = [t for tx, fo, c in zip(texts, fold, calib)
                        for t, fo_i, c_i in zip(tx, fo, c) if fo_i == f and c_i] if lexical_on else None
            C, owner, lr, lex = self._signals(tr, tr_texts, keywords, descriptions,
                                              (fb[0][fb_in], fb[1][fb_in], fb[2][fb_in]), None)
            # (fold gates start cold: a start fitted on their held-out documents could leak into them)
            fold_gates.append((lr.coef_, lr.intercept_))
            if any(len(t) for t in te):
                Q = np.concatenate([t for t in te if len(t)])
                held_y.append(np.concatenate([np.full(len(t), e) for e, t in enumerate(te) if len(t)]))
                cen = max_per_owner(Q @ C.T, owner, E)
                logit = lr.decision(Q)
                held_F[0].append(cen)
                held_F[1].append(log_softmax(logit))
                held_scope.append(np.stack([cen[:, ~R].max(axis=1), logsumexp(logit[:, ~R])], axis=1))
                away_scope.append(_away(cen, logit, held_y[-1], R))
                held_F[2].append(lex.score(te_texts) if lex is not None else np.zeros((len(Q), E), np.float32))
            if fb_out.any():
                Qf = fb[0][fb_out]
                fbh_y.append(fb[1][fb_out])
                fbh_F[0].append(max_per_owner(Qf @ C.T, owner, E))
                fbh_F[1].append(lr.log_proba(Qf))
                fbh_F[2].append(np.zeros((len(Qf), E), np.float32))  # feedback has no text: no lexical evidence
        if calibrated is not None:
            mix = np.asarray(calibrated.mix_, dtype=np.float64).copy()
            self.threshold_ = float(calibrated.threshold_)
            self.scope_stats_ = np.asarray(calibrated.scope_stats_, dtype=np.float64).copy()
            self.scope_threshold_ = float(calibrated.scope_threshold_)
            figures.update({k: v for k, v in calibrated.figures_.items() if k in HELDOUT_FIGURES})
            figures["calibration_reused"] = True
        elif held_y and E >= 2 and (~R).any():
            y = np.concatenate(held_y)
            F = [np.concatenate(f) for f in held_F]
            y_mix = np.concatenate([y] + fbh_y)
            F_mix = [np.concatenate([a] + b) for a, b in zip(F, fbh_F)]
            mix = fit_mix(F_mix if lexical_on else F_mix[:2], y_mix)
            figures["heldout_feedback"] = int(len(y_mix) - len(y))
            if not lexical_on:
                mix = np.r_[mix, 0.0]
            z = sum(a * f for a, f in zip(mix, F))
            P = softmax(z)
            pred = P.argmax(axis=1)
            inside = ~R[y]  # held-out documents of experts that answer (the in-scope examples)
            by_refusal = R[pred]  # best class is a refusal expert: refused whatever the scope
            top = P[:, ~R].max(axis=1)
            n_in = int(inside.sum())
            # too few held-out examples say nothing reliable about a refusal rate: then never abstain
            reliable = n_in >= self.min_heldout
            self.threshold_ = abstain_threshold(top[inside], self.refuse_rate) if reliable else 0.0
            H = np.concatenate(held_scope).astype(np.float64)
            sd = H[inside].std(axis=0)
            self.scope_stats_ = np.array([H[inside, 0].mean(), max(sd[0], 1e-6), H[inside, 1].mean(),
                                          max(sd[1], 1e-6)])
            s_held = self._scope_from(H[:, 0], H[:, 1]) - self._refusal_margin(z, R)
            # the scope threshold refuses what the refusal experts do not already refuse, so that together
            # they refuse about refuse_rate of the in-scope documents
            # (the scope can be negative: "never abstain" is -inf here, not abstain_threshold's 0.0)
            rest = inside & ~by_refusal
            rate = (self.refuse_rate * n_in - int((inside & by_refusal).sum())) / max(int(rest.sum()), 1)
            self.scope_threshold_ = abstain_threshold(s_held[rest], rate) \
                if reliable and self.refuse_rate > 0 and rate > 0 and rest.any() else -np.inf
            rule = "heldout" if np.isfinite(self.scope_threshold_) else "none"
            if n_in < self.small_heldout and self.refuse_rate > 0 and rest.any() and not R.any():
                # a small collection: a quantile of a few held-out scopes says little, so the threshold also
                # sits part of the way from how its own documents score towards how they score against the
                # *other* experts only (each expert's documents stand in for off-topic queries). With refusal
                # experts, their examples say what is out of scope instead (this rule then refused hard
                # in-scope questions of tests/test_refusal.py's car shop).
                A = np.concatenate(away_scope).astype(np.float64)
                small = small_scope_threshold(s_held[rest], self._scope_from(A[:, 0], A[:, 1])[rest], self.small_share)
                if small > self.scope_threshold_:
                    self.scope_threshold_, rule = small, "small"
            refused = (s_held < self.scope_threshold_) | by_refusal
            figures.update(heldout=n_in, scope_rule=rule, heldout_accuracy=float((pred == y)[inside].mean()),
                           heldout_ece=ece(top[inside], (pred == y)[inside]),
                           heldout_refused=float(refused[inside].mean()),
                           gate_only_accuracy=float((F[1].argmax(1) == y)[inside].mean()),
                           centroid_only_accuracy=float((F[0].argmax(1) == y)[inside].mean()))
            if R.any():
                figures.update(refusal_heldout=int((~inside).sum()),
                               refusal_heldout_refused=float(refused[~inside].mean()) if (~inside).any() else None)
        else:
            # nothing to hold out (one expert, or single-document experts): a sane default mix, no abstention
            mix = np.array([20.0, 1.0, 0.5 if lexical_on else 0.0])
            self.threshold_ = 0.0
            self.scope_stats_ = np.array([0.0, 1.0, 0.0, 1.0])
            self.scope_threshold_ = -np.inf
        self.mix_ = np.asarray(mix, dtype=np.float64)
        # ---- final fit on every document
        if warm_start is None and fold_gates:  # the final fit starts from the mean of the fold gates
            warm_start = (np.mean([c for c, _ in fold_gates], axis=0), np.mean([b for _, b in fold_gates], axis=0))
        self.centroids_, self.owner_, lr, self.lex_ = self._signals(
            groups, texts if lexical_on else None, keywords, descriptions, fb, warm_start)
        self.coef_, self.intercept_ = lr.coef_, lr.intercept_
        self.n_experts_ = E
        self._grams = {}
        figures.update(mix={c: float(a) for c, a in zip(COMPONENTS, self.mix_)}, threshold=float(self.threshold_),
                       scope_threshold=float(self.scope_threshold_) if np.isfinite(self.scope_threshold_) else None,
                       centroids=int(len(self.centroids_)), gate_iterations=lr.n_iter_)
        self.figures_ = figures
        self._fast_cache = None
        return self

    # ------------------------------------------------------------------ scoring
    def raw(self, Q: np.ndarray, texts: Optional[Sequence[str]] = None, cols: Optional[np.ndarray] = None
            ) -> dict[str, np.ndarray]:
        """Unweighted signals ``{centroid, gate, lexical}``, each ``(n, E)`` (or ``(n, len(cols))``).

        ``cols``: score only these experts (the gate's log-probabilities are then normalised over them).
        """
        cen, logits, lex = self._parts(Q, texts, cols)
        return {"centroid": cen, "gate": log_softmax(logits), "lexical": lex}

    def _parts(self, Q: np.ndarray, texts: Optional[Sequence[str]], cols: Optional[np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Max centroid cosine per expert, the gate's raw logits and the lexical scores, each ``(n, E)``."""
        Q = np.asarray(Q, dtype=np.float32)
        if cols is None:
            fast = self._fast()
            if len(Q) == 1:  # one query: one matrix-vector product over centroids and gate weights together
                both = fast["stack"] @ Q[0]
                M = len(self.centroids_)
                S = both[None, :M]
                logits = (both[M:] + self.intercept_)[None, :]
            else:
                S = Q @ self.centroids_.T
                logits = Q @ self.coef_ + self.intercept_
            cen = np.full((len(Q), self.n_experts_), -1.0, dtype=np.float32)
            if S.shape[1]:
                order, starts, firsts, ordered = fast["groups"]
                cen[:, firsts] = np.maximum.reduceat(S if ordered else S[:, order], starts, axis=1)
            lex = self.lex_.score(texts) if (self.lex_ is not None and texts is not None) else \
                np.zeros((len(Q), self.n_experts_), np.float32)
        else:
            cols = np.asarray(cols, dtype=np.int64)
            sel = np.isin(self.owner_, cols)
            pos = np.full(self.n_experts_, -1, dtype=np.int64)
            pos[cols] = np.arange(len(cols))
            cen = max_per_owner(Q @ self.centroids_[sel].T, pos[self.owner_[sel]], len(cols))
            logits = Q @ self.coef_[:, cols] + self.intercept_[cols]
            lex = self.lex_.score(texts)[:, cols] if (self.lex_ is not None and texts is not None) else \
                np.zeros((len(Q), len(cols)), np.float32)
        return cen, logits, lex

    def _refusal_margin(self, z: np.ndarray, R: np.ndarray) -> np.ndarray:
        """``refuse_weight * (logsumexp(z[:, R]) - logsumexp(z[:, ~R]))`` ``(n,)``; zeros without refusal experts."""
        if not R.any() or not (~R).any():
            return np.zeros(len(z))
        return self.refuse_weight * (logsumexp(z[:, R]) - logsumexp(z[:, ~R]))

    def _scope_from(self, max_cos: np.ndarray, lse: np.ndarray) -> np.ndarray:
        m = self.scope_stats_
        return (np.asarray(max_cos, np.float64) - m[0]) / m[1] + (np.asarray(lse, np.float64) - m[2]) / m[3]

    def score(self, Q: np.ndarray, texts: Optional[Sequence[str]] = None, cols: Optional[np.ndarray] = None
              ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Weighted components ``{centroid, gate, lexical}`` ``(n, E)`` and the scope score ``(n,)``.

        The scope is high for queries like the experts' documents; below ``scope_threshold_`` the
        router abstains.
        """
        cen, logits, lex = self._parts(Q, texts, cols)
        R = self.refuse_ if cols is None else self.refuse_[np.asarray(cols, dtype=np.int64)]
        if not cen.shape[1] or R.all():
            z = np.zeros(cen.shape)
            return {"centroid": z, "gate": z, "lexical": z}, np.full(len(cen), -np.inf)
        lse = logsumexp(logits)
        a = self.mix_
        comps = {"centroid": a[0] * cen, "gate": a[1] * (logits - lse[:, None]), "lexical": a[2] * lex}
        if not R.any():
            return comps, self._scope_from(cen.max(axis=1), lse)
        z = comps["centroid"] + comps["gate"] + comps["lexical"]
        scope = self._scope_from(cen[:, ~R].max(axis=1), logsumexp(logits[:, ~R])) - self._refusal_margin(z, R)
        return comps, scope

    def _fast(self) -> dict:
        """Contiguous copies and centroid groups for scoring, computed once per fitted/loaded gate."""
        f = getattr(self, "_fast_cache", None)
        if f is None:
            f = {"stack": np.ascontiguousarray(np.vstack([self.centroids_, self.coef_.T]), dtype=np.float32),
                 "groups": owner_groups(self.owner_)}
            self._fast_cache = f
        return f

    def components(self, Q: np.ndarray, texts: Optional[Sequence[str]] = None, cols: Optional[np.ndarray] = None
                   ) -> dict[str, np.ndarray]:
        """Weighted signals ``a_k * signal_k``: their sum is the logit ``z`` ``(n, E)``."""
        return self.score(Q, texts, cols)[0]

    def logits(self, Q: np.ndarray, texts: Optional[Sequence[str]] = None, cols: Optional[np.ndarray] = None
               ) -> np.ndarray:
        """Mixed logits ``z`` ``(n, E)`` float64."""
        return sum(self.components(Q, texts, cols).values())

    def confidence(self, Q: np.ndarray, texts: Optional[Sequence[str]] = None) -> np.ndarray:
        """Calibrated probabilities ``(n, E)``."""
        return softmax(self.logits(Q, texts))

    # ------------------------------------------------------------------ persistence
    def to_bytes(self) -> bytes:
        """The fitted state as an ``.npz`` of plain arrays (no pickle)."""
        import json

        arrays = {"format": np.array([FORMAT]), "centroids": self.centroids_, "owner": self.owner_,
                  "coef": self.coef_, "intercept": self.intercept_, "mix": self.mix_,
                  "threshold": np.array([self.threshold_]), "n_experts": np.array([self.n_experts_]),
                  "scope_stats": self.scope_stats_, "scope_threshold": np.array([self.scope_threshold_]),
                  "refuse": self.refuse_, "refuse_weight": np.array([self.refuse_weight]),
                  "figures": np.array(json.dumps(self.figures_))}
        if self.lex_ is not None:
            arrays.update(self.lex_.to_arrays())
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "HybridGate":
        import json

        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        if int(a["format"][0]) != FORMAT:
            raise ValueError(f"unsupported gate format {int(a['format'][0])}")
        self = cls()
        self.centroids_, self.owner_ = a["centroids"], a["owner"]
        self.coef_, self.intercept_ = a["coef"], a["intercept"]
        self.mix_ = a["mix"]
        self.threshold_ = float(a["threshold"][0])
        self.scope_stats_ = a["scope_stats"]
        self.scope_threshold_ = float(a["scope_threshold"][0])
        self.n_experts_ = int(a["n_experts"][0])
        self.refuse_ = a["refuse"].astype(bool)
        self.refuse_weight = float(a["refuse_weight"][0])
        self.figures_ = json.loads(str(a["figures"]))
        self.lex_ = LexicalIndex.from_arrays(a) if "lex_vocab" in a else None
        return self

