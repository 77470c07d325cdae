"""The router: a fitted :class:`HybridGate` over the routable experts plus the tree and the
centroid index, scoring queries into per-expert components. No database I/O: the caller loads
documents and persists :meth:`Router.gate_bytes`.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import numpy as np

from ..settings import DEFAULTS, FIT_SETTINGS, Settings

# fit settings that joined the gate's key later: hashed only when they differ from their default
KEYED_WHEN_CHANGED = frozenset({"gate_max_docs", "small_heldout"})
from .gating import softmax
from .hierarchy import Tree, beam_candidates, node_centroids
from .hybrid import COMPONENTS, FORMAT, HybridGate


def fingerprint(rows: Sequence[dict], settings: Settings) -> str:
    """What a fitted gate depends on: routable experts (id, version) and the fit settings."""
    h = hashlib.sha1(f"gate-format={FORMAT};".encode())
    for r in rows:
        h.update(f"{r['id']}:{r['version']}:{int(bool(r.get('refuse')))};".encode())
    for k in FIT_SETTINGS:
        v = getattr(settings, k)
        if k in KEYED_WHEN_CHANGED and v == getattr(DEFAULTS, k):
            continue  # (files written before it joined the key keep their stored gate)
        h.update(f"{k}={v!r};".encode())
    return h.hexdigest()


class Router:
    """Scores queries against ``rows`` (the routable experts, in column order).

    ``gate``: a fitted :class:`HybridGate` whose columns follow ``rows``; ``tree``: the
    :class:`Tree` over *all* experts (``all_rows``) for beam search and paths.
    """

    def __init__(self, rows: list[dict], all_rows: list[dict], gate: HybridGate, key: str):
        self.rows = rows
        self.key = key
        self.gate = gate
        self.col = {r["id"]: j for j, r in enumerate(rows)}
        self.set_tree(all_rows)
        self.ann = None  # hnswlib index over the gate's centroids (set_ann), or None: exact scoring
        # refusal experts: gate classes that are never selected (a best match there abstains)
        self.refuse_cols = np.flatnonzero([bool(r.get("refuse")) for r in rows]).astype(np.int64)
        self.answering = {r["id"] for r in rows if not r.get("refuse")}  # the beam's leaves
        self.seen: tuple = ()  # (expert list, settings dict) objects this router was last checked against

    @staticmethod
    def shape_of(all_rows: list[dict]) -> tuple:
        """What the tree and the names depend on: ``(id, parent_id, name)`` of every expert."""
        return tuple((r["id"], r.get("parent_id"), r["name"]) for r in all_rows)

    def set_tree(self, all_rows: list[dict]) -> None:
        """The tree over every expert (and their names): set again when experts without documents come,
        go or move, which leaves the gate (fitted on the experts with documents) as it is."""
        self.tree = Tree([r["id"] for r in all_rows], [r.get("parent_id") for r in all_rows])
        self.names = {r["id"]: r["name"] for r in all_rows}
        self.shape = self.shape_of(all_rows)
        self._nodes: Optional[dict[int, np.ndarray]] = None

    @staticmethod
    def fit(rows: list[dict], all_rows: list[dict], docs: dict[int, tuple[np.ndarray, list[str]]],
            settings: Settings, feedback: Optional[tuple] = None, previous: Optional["Router"] = None,
            key: str = "", calibration: Optional[dict[int, np.ndarray]] = None,
            calibrated: Optional[HybridGate] = None) -> "Router":
        """Fit the gate. ``docs[id] = (unit vectors (n, d), texts)``; ``feedback`` with expert *ids*;
        ``calibration[id]`` ``(n,)`` bool: the documents that may calibrate the gate (``None`` = all);
        ``calibrated``: a previous gate whose held-out calibration is kept (see :meth:`HybridGate.fit`)."""
        groups = [docs[r["id"]][0] for r in rows]
        texts = [docs[r["id"]][1] for r in rows] if settings.lexical else None
        col = {r["id"]: j for j, r in enumerate(rows)}
        fb = None
        if feedback is not None and len(feedback[1]):
            X, ids, rew = feedback
            m = np.array([int(i) in col for i in ids], dtype=bool)
            fb = (np.asarray(X)[m], np.array([col[int(i)] for i in np.asarray(ids)[m]], dtype=np.int64),
                  np.asarray(rew, np.float64)[m])
        warm = None
        if previous is not None:
            d = groups[0].shape[1]
            W = np.zeros((d, len(rows)), np.float32)
            b = np.zeros(len(rows), np.float32)
            for r in rows:
                j = previous.col.get(r["id"])
                if j is not None:
                    W[:, col[r["id"]]] = previous.gate.coef_[:, j]
                    b[col[r["id"]]] = previous.gate.intercept_[j]
            warm = (W, b)
        gate = HybridGate(C=float(settings.gate_C), folds=int(settings.gate_folds), refuse_rate=float(settings.refuse_rate),
                          lexical=bool(settings.lexical), max_iter=int(settings.gate_max_iter),
                          min_heldout=int(settings.min_heldout), max_total_docs=int(settings.gate_max_docs),
                          small_heldout=int(settings.small_heldout))
        gate.fit(groups, texts, keywords=[r.get("keywords") or [] for r in rows],
                 descriptions=[r.get("description") or "" for r in rows], feedback=fb, warm_start=warm,
                 refuse=[bool(r.get("refuse")) for r in rows],
                 calibration=None if calibration is None else [calibration[r["id"]] for r in rows],
                 calibrated=calibrated)
        gate.figures_["expert_ids"] = [r["id"] for r in rows]
        gate.figures_["expert_versions"] = [r["version"] for r in rows]
        return Router(rows, all_rows, gate, key)

    def means(self) -> np.ndarray:
        """Unit mean direction of every routable expert ``(E, d)`` (from the stored centroids), cached."""
        m = getattr(self, "_means", None)
        if m is None:
            m = np.stack([np.asarray(r["centroid"], np.float32) for r in self.rows])
            m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
            self._means = m
        return m

    def gate_bytes(self) -> bytes:
        return self.gate.to_bytes()

    # ------------------------------------------------------------------ hierarchy
    def node_centroids(self) -> dict[int, np.ndarray]:
        """Centroids of every tree node, derived from its routable descendants (cached)."""
        if self._nodes is None:
            g = self.gate
            leaf = {r["id"]: g.centroids_[g.owner_ == j] for j, r in enumerate(self.rows) if r["id"] in self.answering}
            self._nodes = node_centroids(self.tree, leaf)
        return self._nodes

    def beam(self, q: np.ndarray, width: int) -> tuple[np.ndarray, int]:
        """Columns reached by a beam of ``width`` for one unit query ``(d,)``, and the nodes scored."""
        nodes = self.node_centroids()

        def score(ids):
            return np.array([float((nodes[i] @ q).max()) if i in nodes else -np.inf for i in ids])

        cands, scored = beam_candidates(self.tree, score, self.answering, width)
        # refusal experts are always scored: they are the evidence against every other expert
        cols = np.union1d(np.array([self.col[i] for i in cands], dtype=np.int64), self.refuse_cols)
        return cols.astype(np.int64), len(scored)

    def path(self, expert_id: int) -> list[str]:
        return [self.names[i] for i in self.tree.path(expert_id)]

    # ------------------------------------------------------------------ candidates via hnswlib
    def set_ann(self, index) -> None:
        """An :class:`~moedb.routing.ann.HnswIndex` over ``gate.centroids_`` (labels = centroid rows)."""
        self.ann = index

    def ann_candidates(self, Q: np.ndarray, n_centroids: int) -> list[np.ndarray]:
        """Per query, the columns owning one of the ``n_centroids`` nearest centroids."""
        lab, _ = self.ann.query(Q, n_centroids)
        return [np.union1d(self.gate.owner_[row], self.refuse_cols).astype(np.int64) for row in lab]

    # ------------------------------------------------------------------ scoring
    def score(self, Q: np.ndarray, texts: Optional[Sequence[str]], cands: Optional[list[np.ndarray]] = None
              ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Components ``{centroid, gate, lexical}``, logits ``z``, confidences, the scored mask (each
        ``(n, E)``) and the scope score ``(n,)``.

        ``cands``: per query the columns to score (others get ``z = -inf``, confidence 0), else all.
        """
        n, E = len(Q), len(self.rows)
        if cands is None:
            comps, scope = self.gate.score(Q, texts)
            z = sum(comps.values())
            return comps, z, softmax(z), np.ones((n, E), dtype=bool), scope
        comps = {c: np.full((n, E), np.nan) for c in COMPONENTS}
        z = np.full((n, E), -np.inf)
        mask = np.zeros((n, E), dtype=bool)
        scope = np.full(n, -np.inf)
        for i, cols in enumerate(cands):
            part, sc = self.gate.score(Q[i:i + 1], [texts[i]] if texts is not None else None, cols=cols)
            for c in COMPONENTS:
                comps[c][i, cols] = part[c][0]
            z[i, cols] = sum(part[c][0] for c in COMPONENTS)
            mask[i, cols] = True
            scope[i] = sc[0]
        return comps, z, softmax(z), mask, scope

    def explain(self, r, comps: dict[str, np.ndarray], z: np.ndarray, conf: np.ndarray, i: int, sel: np.ndarray,
                threshold: float, bias: Optional[np.ndarray], scored: int, text: Optional[str], turns: int,
                scope: Optional[float] = None, scope_threshold: Optional[float] = None) -> None:
        """Fill ``r.experts[*].components`` and ``r.explanation`` for query ``i`` (``z``, ``conf``: its row ``(E,)``)."""
        for e, j in zip(r.experts, sel):
            e.components = {c: float(comps[c][i, j]) for c in comps}
            e.components["bias"] = float(bias[j]) if bias is not None else 0.0
        top = int(np.argmax(conf)) if conf.size else None
        g = self.gate
        r.explanation = {
            "method": "confidence = softmax(sum of weighted centroid, gate, lexical); the bias only ranks the selection",
            "mix": {c: float(a) for c, a in zip(COMPONENTS, g.mix_)},
            "rule": "scope" if scope_threshold is not None else "confidence",
            "scope": scope, "scope_threshold": scope_threshold,
            "threshold": threshold, "top_confidence": float(conf[top]) if top is not None else None,
            "abstained": r.abstained, "refused_by": r.refused_by, "refusal_experts": len(self.refuse_cols),
            "experts_total": len(self.rows), "experts_scored": scored,
            "context_turns": turns, "balanced": bias is not None,
            "lexical_terms": g.lex_.top_terms(text or "", top) if (g.lex_ is not None and top is not None) else [],
        }
        if r.abstained and top is not None:
            r.explanation["best_rejected"] = {"name": self.rows[top]["name"], "confidence": float(conf[top])}

    def figures(self) -> dict[str, Any]:
        f = {k: v for k, v in self.gate.figures_.items()
             if k not in ("expert_ids", "expert_versions", "calibration_settings")}
        f["tree_depth"] = self.tree.depth()
        return f




def mix_context(Q: np.ndarray, C: np.ndarray, weight: float) -> np.ndarray:
    """Queries ``(n, d)`` with earlier turns ``C`` ``(t, d)`` (oldest first) mixed in, unit rows ``(n, d)``.

    ``q + weight * sum_i 0.5^(t-1-i) c_i / sum_i 0.5^(t-1-i)``: the latest turn counts most.
    """
    decay = 0.5 ** np.arange(len(C))[::-1]
    c = (decay[:, None] * np.asarray(C, np.float64)).sum(axis=0) / decay.sum()
    out = np.asarray(Q, np.float64) + weight * c[None, :]
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)
