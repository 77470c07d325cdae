"""The gate service: the one place that decides when the router is loaded, fitted, persisted and refitted.

:meth:`GateService.current` is what every route calls: it returns the fitted :class:`~moedb.routing.engine.Router`
over the experts with documents, reusing this connection's router while nothing changed, loading the gate
the file stores when it was fitted on exactly the current experts (ids and versions) and fit settings,
and otherwise refitting it (keeping the held-out calibration of the last full fit while fewer than
``recalibrate_after`` of the experts changed) and writing it back in one transaction.
:meth:`GateService.refit` fits now (a full calibration unless ``recalibrate=False``).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..routing.ann import HnswIndex
from ..routing.engine import Router, fingerprint
from ..routing.hybrid import HybridGate
from ..store import Store
from .catalog import Catalog
from .embedding import FileEmbedder


class GateService:
    """The fitted router of one file (``store``), over the experts the ``catalog`` holds."""

    def __init__(self, store: Store, catalog: Catalog, embedding: FileEmbedder):
        self.store = store
        self.catalog = catalog
        self.embedding = embedding
        self._current: Any = None
        self._epoch = catalog.epoch

    def feedback_examples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feedback as training examples for the gate: ``(vectors (m, d) float32, expert ids (m,) int64,
        rewards (m,) float64)``; reward > 0 makes the query an example of that expert, < 0 a counter-example.
        Events of removed experts and the share held out by the last retrain are left out."""
        _, vecs, eids, rewards = self.store.feedback.rows(False, self.store.feedback.holdout_cut())
        if vecs.size == 0:
            vecs = np.zeros((0, self.embedding.dim), np.float32)
        return vecs, eids, rewards

    def current(self):
        """The fitted router over the routable experts (documents > 0), loaded or refitted lazily.

        The gate persisted in the file is used when it was fitted on exactly the current experts
        (ids and versions) and settings; otherwise it is refitted and written back in one transaction.
        """
        self.catalog.refresh()
        if self._epoch != self.catalog.epoch:  # the file was re-embedded: nothing fitted before applies
            self._current, self._epoch = None, self.catalog.epoch
        cur = self._current
        if cur is not None and cur.seen and cur.seen[0] is self.catalog.rows and cur.seen[1] is self.catalog.settings:
            return cur  # nothing reloaded since the last call: same experts, same settings
        routable = self.catalog.routable()
        if not routable:
            return None
        key = fingerprint(routable, self.catalog.settings)
        if cur is not None and cur.key == key:
            if cur.shape != Router.shape_of(self.catalog.rows):  # a parent without documents came, went or moved
                cur.set_tree(self.catalog.rows)
            self._attach_ann(cur)
            cur.seen = (self.catalog.rows, self.catalog.settings)
            return cur
        stored = self.store.artefacts.get("gate")
        if stored is not None and stored[0] == key:
            router = Router(routable, self.catalog.rows, HybridGate.from_bytes(stored[1]), key)
        else:
            router = self._fit(routable, key, stored, previous=cur, recalibrate=False)
        self._attach_ann(router)
        router.seen = (self.catalog.rows, self.catalog.settings)
        self._current = router
        return router

    def _calibration_to_keep(self, routable: list[dict], previous) -> tuple[Any, int]:
        """``(previous gate, experts changed since its calibration)`` when a refit may keep that gate's
        held-out calibration: the same fit settings and refusal experts, and fewer than
        ``recalibrate_after`` x the experts added, changed or removed since the last full calibration.
        Otherwise ``(None, 0)``: calibrate anew (cross-fitting)."""
        share = float(self.catalog.settings.recalibrate_after)
        if previous is None or share <= 0:
            return None, 0
        g = previous.gate
        ids, versions = g.figures_.get("expert_ids", []), g.figures_.get("expert_versions", [])
        if g.figures_.get("calibration_settings") != self.catalog.settings.fit_key() or len(ids) != len(versions) or \
                len(ids) != g.n_experts_ or "heldout" not in g.figures_:
            return None, 0  # other settings, an older gate, or one that never had held-out evidence
        before = dict(zip(ids, versions))
        now = {r["id"]: r["version"] for r in routable}
        refusal_before = {i for i, rf in zip(ids, g.refuse_) if rf}
        if refusal_before != {r["id"] for r in routable if r.get("refuse")}:
            return None, 0  # the scope threshold is calibrated with the refusal experts' examples
        changed = sum(1 for i, v in now.items() if before.get(i) != v) + sum(1 for i in before if i not in now)
        total = int(g.figures_.get("changed_since_calibration", 0)) + changed
        return (g, total) if total <= share * len(routable) else (None, 0)

    def _fit(self, routable: list[dict], key: str, stored: Optional[tuple], previous=None,
             recalibrate: bool = True):
        """Fit and persist the gate; ``stored``: the file's stored gate, ``store.artefacts.get("gate")``."""
        docs, calib = {}, {}
        for eid, (rowids, texts, blob, tuned) in self.store.documents.for_fit([r["id"] for r in routable]).items():
            vecs = np.frombuffer(blob, dtype="<f4").reshape(len(rowids), self.embedding.dim).astype(np.float32)
            docs[eid] = (vecs, texts)
            calib[eid] = np.asarray(tuned, dtype=np.int64) == 0
        if all(c.all() for c in calib.values()):
            calib = None  # no document trained the embedder: every one is held-out evidence
        # the gate stored in the file is the latest fit of any process: start from it (warm start, and the
        # calibration it may pass on) unless it is the one this connection already holds
        if stored is not None and (previous is None or stored[0] != previous.key):
            try:
                g = HybridGate.from_bytes(stored[1])
                ids = g.figures_.get("expert_ids", [])
                if len(ids) == g.n_experts_ and g.coef_.shape[0] == self.embedding.dim:
                    # (only its columns and calibration are used: placeholder rows, no tree)
                    rows = [{"id": i, "version": -1, "name": f"#{i}", "parent_id": None} for i in ids]
                    previous = Router(rows, rows, g, stored[0])
            except (ValueError, KeyError, OSError):
                pass  # an unreadable stored gate: keep this connection's own previous one, if any
        keep, changed = (None, 0) if recalibrate else self._calibration_to_keep(routable, previous)
        router = Router.fit(routable, self.catalog.rows, docs, self.catalog.settings, feedback=self.feedback_examples(),
                            previous=previous, key=key, calibration=calib, calibrated=keep)
        router.gate.figures_.update(calibration_settings=self.catalog.settings.fit_key(),
                                    changed_since_calibration=changed)
        self.store.artefacts.put("gate", key, router.gate_bytes(), router.figures())
        return router

    def _attach_ann(self, router) -> None:
        """Index the centroids with hnswlib once they are many (persisted, keyed by the gate)."""
        C = router.gate.centroids_
        ef = int(self.catalog.settings.ann_ef)
        if len(C) < int(self.catalog.settings.ann_min_centroids):
            router.set_ann(None)
            return
        if router.ann is not None:
            router.ann.set_ef(ef)
            return
        stored = self.store.artefacts.get("ann:centroids")
        labels = np.arange(len(C), dtype=np.int64)
        if stored is not None and stored[0] == router.key:
            idx = HnswIndex.from_bytes(stored[1], self.embedding.dim, labels, ef=ef)
        else:
            idx = HnswIndex(self.embedding.dim, ef=ef).fit(labels, C)
            self.store.artefacts.put("ann:centroids", router.key, idx.to_bytes(), {"items": len(C), "ef": ef})
        router.set_ann(idx)

    def refit(self, recalibrate: bool = True) -> dict[str, Any]:
        """Refit the gate from the experts' documents and the feedback, persist it; returns fit figures.

        ``recalibrate=False`` does what the first route after a change does: it keeps the held-out
        calibration of the last full fit while fewer than ``recalibrate_after`` of the experts have changed
        since (only the final gate is fitted; figure ``calibration_reused``).

        Figures: ``experts``, ``documents``, ``feedback``, held-out ``heldout_accuracy``, ``heldout_ece``,
        ``heldout_refused``, the mix weights, the calibrated ``threshold`` and ``scope_threshold``,
        ``centroids``; with refusal experts also ``refusal_heldout`` (their held-out examples) and
        ``refusal_heldout_refused`` (the share of those the router refuses).
        """
        self.catalog.refresh()
        routable = self.catalog.routable()
        if not routable:
            self._current = None
            return {"experts": 0}
        key = fingerprint(routable, self.catalog.settings)
        router = self._fit(routable, key, self.store.artefacts.get("gate"), previous=self._current,
                           recalibrate=recalibrate)
        self._attach_ann(router)
        self._current = router
        return router.figures()

    def figures(self) -> dict[str, Any]:
        """Figures of the current gate (fitting it first if the experts changed)."""
        r = self.current()
        return r.figures() if r is not None else {"experts": 0}
