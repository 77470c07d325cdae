"""The gate service: the one place that decides when the router is loaded, fitted, persisted and refitted.

:meth:`GateService.current` is what every route calls: it returns the fitted :class:`~moedb.routing.engine.Router`
over the experts with documents, reusing this connection's router while nothing changed, loading the gate
the file stores when it was fitted on exactly the current experts (ids and versions) and fit settings,
and otherwise refitting it (keeping the held-out calibration of the last full fit while fewer than
``recalibrate_after`` of the experts changed) and writing it back.

When the experts keep changing (another process creating them one after another) a route does not refit on
every call: while the gate this connection serves (or a later one another process stored) still covers
only experts that exist, was fitted with this embedder, took at least :data:`STALE_MIN_FIT_SECONDS` to fit
and finished less than :data:`REFIT_SPACING` times its fit time ago, it goes on serving it (routes reach
the experts it was fitted on; experts added since become routable at the next refit). So a long-lived
connection spends at most about a sixth of its routing time refitting; a connection that has no gate yet,
a connection that changed the experts itself (its own next route reflects its change), a file whose gate fits
in under a second, and a removed expert always get a refit at once. :meth:`figures`
(the CLI's ``warm_router`` after a change) and :meth:`refit` never serve a stale gate.

Fits never run inside a write transaction: the inputs are read in one snapshot, the gate is fitted with no
lock held, and a short write transaction stores it after checking that the experts it was fitted on still
exist (else it fits again, up to :data:`REFIT_TRIES` times, then raises :class:`~moedb.errors.ConcurrentChange`).
:meth:`GateService.refit` fits now (a full calibration unless ``recalibrate=False``).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import numpy as np

from ..errors import ConcurrentChange
from ..routing.ann import HnswIndex
from ..routing.engine import Router, fingerprint
from ..routing.hybrid import HybridGate
from ..store import Store
from .catalog import Catalog
from .embedding import FileEmbedder

STALE_MIN_FIT_SECONDS = 1.0   # a gate that fits quicker than this is refitted at once when stale
REFIT_SPACING = 5.0           # else a route refits at most once per this many times the last fit's duration
REFIT_TRIES = 3               # fits of an explicit refit while other processes remove its experts


class GateService:
    """The fitted router of one file (``store``), over the experts the ``catalog`` holds."""

    def __init__(self, store: Store, catalog: Catalog, embedding: FileEmbedder):
        self.store = store
        self.catalog = catalog
        self.embedding = embedding
        self._current: Any = None
        self._epoch = catalog.epoch

    def feedback_examples(self, holdout_cut: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feedback as training examples for the gate: ``(vectors (m, d) float32, expert ids (m,) int64,
        rewards (m,) float64)``; reward > 0 makes the query an example of that expert, < 0 a counter-example.
        Events of removed experts and the share held out by the last retrain are left out."""
        cut = self.store.feedback.holdout_cut() if holdout_cut is None else holdout_cut
        _, vecs, eids, rewards = self.store.feedback.rows(False, cut)
        if vecs.size == 0:
            vecs = np.zeros((0, self.embedding.dim), np.float32)
        return vecs, eids, rewards

    def current(self, stale_ok: bool = True):
        """The fitted router over the routable experts (documents > 0), loaded or refitted lazily.

        The gate persisted in the file is used when it was fitted on exactly the current experts
        (ids and versions) and settings; otherwise, unless the newest gate may be served stale (see the
        module docstring; ``stale_ok=False`` never), it is refitted and written back.
        """
        self.catalog.refresh()
        if self._epoch != self.catalog.epoch:  # the file was re-embedded: nothing fitted before applies
            self._current, self._epoch = None, self.catalog.epoch
        if self.catalog.changed_here:
            stale_ok = False  # this connection changed the experts: its next route reflects its own change
        cur = self._current
        if cur is not None and cur.seen and cur.seen[0] is self.catalog.rows and cur.seen[1] is self.catalog.settings \
                and (cur.seen[2] is None or (stale_ok and time.time() < cur.seen[2])):
            return cur  # nothing reloaded since the last call: same experts, same settings (a stale gate: in time)
        routable = self.catalog.routable()
        if not routable:
            return None
        key = fingerprint(routable, self.catalog.settings)
        if cur is not None and cur.key == key:
            if cur.shape != Router.shape_of(self.catalog.rows):  # a parent without documents came, went or moved
                cur.set_tree(self.catalog.rows)
            self._attach_ann(cur)
            cur.seen = (self.catalog.rows, self.catalog.settings, None)
            self.catalog.changed_here = False
            return cur
        stored = self.store.artefacts.get("gate")
        until = None  # a stale gate: served until then
        if stored is not None and stored[0] == key:
            router = Router(routable, self.catalog.rows, HybridGate.from_bytes(stored[1]), key)
        else:
            router, until = self._stale(routable, cur, stored) if stale_ok else (None, None)
            if router is None:
                routable, key, inputs = self._read_inputs()
                if not routable:
                    return None
                router = self._fit(routable, key, inputs, previous=cur, recalibrate=False)
                self.store.artefacts.put("gate", key, router.gate_bytes(), router.figures())
        self._attach_ann(router)
        router.seen = (self.catalog.rows, self.catalog.settings, until)
        self._current = router
        if until is None:
            self.catalog.changed_here = False
        return router

    def _embedder_id(self) -> str:
        rec = self.embedding.record or {}
        return f"{self.embedding.name}|{rec.get('fingerprint', '')}"

    def _stale(self, routable: list[dict], cur, stored: Optional[tuple]) -> tuple[Any, Optional[float]]:
        """``(router, until)``: the gate this connection serves (``cur``; or the file's ``stored`` one when
        another process fitted it later) as a router over the experts it was fitted on, and the time until
        which it may be served, when it may be served although experts changed since; else ``(None, None)``
        (refit now).

        It may when every expert it scores still exists with the same refusal role, it was fitted with this
        embedder, its fit took at least :data:`STALE_MIN_FIT_SECONDS` and it finished less than
        :data:`REFIT_SPACING` x that long ago: refits are spaced out while the experts keep changing."""
        if cur is None:
            return None, None
        key, g = cur.key, cur.gate
        if stored is not None and stored[0] != cur.key:  # another process fitted since: its gate, if newer
            try:
                other = HybridGate.from_bytes(stored[1])
                if float(other.figures_.get("fitted_at", 0.0)) > float(g.figures_.get("fitted_at", 0.0)):
                    key, g = stored[0], other
            except (ValueError, KeyError, OSError):
                pass
        f = g.figures_
        took, at = float(f.get("fit_seconds", 0.0)), float(f.get("fitted_at", 0.0))
        if took < STALE_MIN_FIT_SECONDS or time.time() - at >= REFIT_SPACING * took or \
                f.get("embedder") != self._embedder_id() or g.coef_.shape[0] != self.embedding.dim:
            return None, None
        by_id = {r["id"]: r for r in routable}
        ids = f.get("expert_ids", [])
        if len(ids) != g.n_experts_ or any(i not in by_id or bool(by_id[i].get("refuse")) != bool(rf)
                                            for i, rf in zip(ids, g.refuse_)):
            return None, None
        return Router([by_id[i] for i in ids], self.catalog.rows, g, key), at + REFIT_SPACING * took

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

    def _read_inputs(self, holdout_cut: Optional[int] = None) -> tuple[list[dict], Optional[str], Optional[dict]]:
        """``(routable experts, their key, fit inputs)`` read in one snapshot of the file (a read
        transaction: writers in other processes go on)."""
        with self.store.snapshot():
            self.catalog.refresh()
            routable = self.catalog.routable()
            if not routable:
                return [], None, None
            return routable, fingerprint(routable, self.catalog.settings), self._inputs(routable, holdout_cut)

    def _inputs(self, routable: list[dict], holdout_cut: Optional[int] = None) -> dict[str, Any]:
        """What a fit over ``routable`` reads from the file (call inside one snapshot): documents per expert,
        which may calibrate, feedback examples (``holdout_cut``: the share held out, default the file's) and
        the stored gate."""
        docs, calib = {}, {}
        for eid, (rowids, texts, blob, tuned) in self.store.documents.for_fit([r["id"] for r in routable]).items():
            vecs = np.frombuffer(blob, dtype="<f4").reshape(len(rowids), self.embedding.dim).astype(np.float32)
            docs[eid] = (vecs, texts)
            calib[eid] = np.asarray(tuned, dtype=np.int64) == 0
        if all(c.all() for c in calib.values()):
            calib = None  # no document trained the embedder: every one is held-out evidence
        return {"docs": docs, "calibration": calib, "feedback": self.feedback_examples(holdout_cut),
                "stored": self.store.artefacts.get("gate")}

    def _fit(self, routable: list[dict], key: str, inputs: dict[str, Any], previous=None, recalibrate: bool = True):
        """Fit the gate from ``inputs`` (:meth:`_inputs`); no I/O, no lock held. The caller stores it."""
        stored = inputs["stored"]
        t0 = time.perf_counter()
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
        router = Router.fit(routable, self.catalog.rows, inputs["docs"], self.catalog.settings,
                            feedback=inputs["feedback"], previous=previous, key=key,
                            calibration=inputs["calibration"], calibrated=keep)
        router.gate.figures_.update(calibration_settings=self.catalog.settings.fit_key(),
                                    changed_since_calibration=changed, embedder=self._embedder_id(),
                                    fit_seconds=round(time.perf_counter() - t0, 3), fitted_at=time.time())
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

    def refit(self, recalibrate: bool = True, *, holdout_cut: Optional[int] = None,
              write: Optional[Callable[[], None]] = None) -> dict[str, Any]:
        """Refit the gate from the experts' documents and the feedback, persist it; returns its figures.

        The fit runs outside any write transaction (inputs read in one snapshot); a short transaction then
        stores the gate, and runs ``write()`` (what the caller stores with it, such as retrain's holdout cut),
        after checking that the experts it was fitted on still exist; if another process removed one
        meanwhile it fits again, up to :data:`REFIT_TRIES` times, then raises :class:`ConcurrentChange`.
        ``holdout_cut``: the feedback share held out of this fit (default: the file's).

        ``recalibrate=False`` does what the first route after a change does: it keeps the held-out
        calibration of the last full fit while fewer than ``recalibrate_after`` of the experts have changed
        since (only the final gate is fitted; figure ``calibration_reused``).

        Figures: ``experts``, ``documents``, ``feedback``, held-out ``heldout_accuracy``, ``heldout_ece``,
        ``heldout_refused``, the mix weights, the calibrated ``threshold`` and ``scope_threshold``,
        ``centroids``, ``fit_seconds``; with refusal experts also ``refusal_heldout`` (their held-out examples)
        and ``refusal_heldout_refused`` (the share of those the router refuses).
        """
        for _ in range(REFIT_TRIES):
            routable, key, inputs = self._read_inputs(holdout_cut)
            router = self._fit(routable, key, inputs, previous=self._current, recalibrate=recalibrate) \
                if routable else None
            with self.store.atomic():
                self.catalog.refresh()
                if router is not None:
                    now = {r["id"]: bool(r.get("refuse")) for r in self.catalog.routable()}
                    if any(now.get(r["id"]) != bool(r.get("refuse")) for r in routable):
                        continue  # an expert it scores was removed (or changed role) meanwhile: fit again
                    self.store.artefacts.put("gate", key, router.gate_bytes(), router.figures())
                if write is not None:
                    write()
            if router is None:
                self._current = None
                return {"experts": 0}
            self._attach_ann(router)
            self._current = router
            return router.figures()
        raise ConcurrentChange(f"other processes kept removing experts while the router was refitted "
                               f"({REFIT_TRIES} fits); the gate was not stored: run the refit again")

    def figures(self) -> dict[str, Any]:
        """Figures of the current gate (fitting it first if the experts changed; never a stale gate)."""
        r = self.current(stale_ok=False)
        return r.figures() if r is not None else {"experts": 0}
