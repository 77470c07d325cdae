"""Routing and retrieval methods of :class:`moedb.Database`: gate fitting and persistence, route,
load balancing, the query log and the exhaustive search baseline."""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence, Union

import numpy as np

from .errors import InvalidInput
from .routing.ann import HnswIndex, exact_topk
from .routing.balance import Balancer, load_figures
from .routing.engine import FIT_SETTINGS, Router, fingerprint, mix_context
from .routing.gating import select
from .routing.hybrid import HybridGate
from .types import ExpertScore, Hit, RouteResult
from .vectors import as_matrix, normalize, to_blob


def _fit_settings(settings: dict[str, Any]) -> str:
    """The settings a calibration depends on, as one string."""
    return ";".join(f"{k}={settings.get(k)!r}" for k in FIT_SETTINGS + ("gate_max_docs",))


class RoutingMixin:
    """Routing, balancing, logging and search; mixed into :class:`moedb.Database`."""

    # ------------------------------------------------------------------ routing
    def _query_vectors(self, queries: Sequence[Any]) -> tuple[list[str], np.ndarray]:
        texts: list[Optional[str]] = []
        vecs: list[Optional[np.ndarray]] = []
        for i, q in enumerate(queries):
            if isinstance(q, str):
                if not q.strip():
                    raise InvalidInput("query is empty" if len(queries) == 1 else f"query #{i} is empty")
                texts.append(q)
                vecs.append(None)
            elif isinstance(q, np.ndarray) or isinstance(q, (list, tuple)):
                v = as_matrix(q, self.dim, what="query vector")
                if v.shape[0] != 1:
                    raise InvalidInput("a query vector must have shape (d,)")
                texts.append(None)
                vecs.append(normalize(v)[0])
            else:
                raise InvalidInput(f"query #{i}: expected str or vector, got {type(q).__name__}")
        todo = [i for i, v in enumerate(vecs) if v is None]
        if todo:
            emb = self._embed([texts[i] for i in todo])
            for j, i in enumerate(todo):
                vecs[i] = emb[j]
        Q = np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, self.dim), np.float32)
        return [t if t is not None else "<vector>" for t in texts], Q

    def _answering(self) -> list[dict]:
        """The experts that answer queries: with documents, not refusal experts (creation order)."""
        return [r for r in self._experts if r["size"] > 0 and not r.get("refuse")]

    def _router(self):
        """The fitted router over the routable experts (documents > 0), loaded or refitted lazily.

        The gate persisted in the file is used when it was fitted on exactly the current experts
        (ids and versions) and settings; otherwise it is refitted and written back in one transaction.
        """
        cur = self._router_cache
        if cur is not None and cur.seen and cur.seen[0] is self._experts and cur.seen[1] is self._settings:
            return cur  # nothing reloaded since the last call: same experts, same settings
        routable = [r for r in self._experts if r["size"] > 0]
        if not routable:
            return None
        key = fingerprint(routable, self._settings)
        if cur is not None and cur.key == key:
            if cur.shape != Router.shape_of(self._experts):  # a parent without documents came, went or moved
                cur.set_tree(self._experts)
            self._attach_ann(cur)
            cur.seen = (self._experts, self._settings)
            return cur
        stored = self.store.routing_get("gate")
        if stored is not None and stored[0] == key:
            router = Router(routable, self._experts, HybridGate.from_bytes(stored[1]), key)
        else:
            router = self._fit_router(routable, key, stored, previous=cur, recalibrate=False)
        self._attach_ann(router)
        router.seen = (self._experts, self._settings)
        self._router_cache = router
        return router

    def _calibration_to_keep(self, routable: list[dict], previous) -> tuple[Any, int]:
        """``(previous gate, experts changed since its calibration)`` when a refit may keep that gate's
        held-out calibration: the same fit settings and refusal experts, and fewer than
        ``recalibrate_after`` x the experts added, changed or removed since the last full calibration.
        Otherwise ``(None, 0)``: calibrate anew (cross-fitting)."""
        share = float(self._settings.get("recalibrate_after", 0.0))
        if previous is None or share <= 0:
            return None, 0
        g = previous.gate
        ids, versions = g.figures_.get("expert_ids", []), g.figures_.get("expert_versions", [])
        if g.figures_.get("calibration_settings") != _fit_settings(self._settings) or len(ids) != len(versions) or \
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

    def _fit_router(self, routable: list[dict], key: str, stored: Optional[tuple], previous=None,
                    recalibrate: bool = True):
        """Fit and persist the gate; ``stored``: the file's stored gate, ``store.routing_get("gate")``."""
        docs, calib = {}, {}
        for eid, (rowids, texts, blob, tuned) in self.store.routing_documents([r["id"] for r in routable]).items():
            docs[eid] = (np.frombuffer(blob, dtype="<f4").reshape(len(rowids), self.dim).astype(np.float32), texts)
            calib[eid] = np.asarray(tuned, dtype=np.int64) == 0
        if all(c.all() for c in calib.values()):
            calib = None  # no document trained the embedder: every one is held-out evidence
        # the gate stored in the file is the latest fit of any process: start from it (warm start, and the
        # calibration it may pass on) unless it is the one this connection already holds
        if stored is not None and (previous is None or stored[0] != previous.key):
            try:
                g = HybridGate.from_bytes(stored[1])
                ids = g.figures_.get("expert_ids", [])
                if len(ids) == g.n_experts_ and g.coef_.shape[0] == self.dim:
                    # (only its columns and calibration are used: placeholder rows, no tree)
                    rows = [{"id": i, "version": -1, "name": f"#{i}", "parent_id": None} for i in ids]
                    previous = Router(rows, rows, g, stored[0])
            except (ValueError, KeyError, OSError):
                pass  # an unreadable stored gate: keep this connection's own previous one, if any
        keep, changed = (None, 0) if recalibrate else self._calibration_to_keep(routable, previous)
        router = Router.fit(routable, self._experts, docs, self._settings, feedback=self._feedback_examples(),
                            previous=previous, key=key, calibration=calib, calibrated=keep)
        router.gate.figures_.update(calibration_settings=_fit_settings(self._settings),
                                    changed_since_calibration=changed)
        self.store.routing_put("gate", key, router.gate_bytes(), router.figures())
        return router

    def _attach_ann(self, router) -> None:
        """Index the centroids with hnswlib once they are many (persisted, keyed by the gate)."""
        C = router.gate.centroids_
        ef = int(self._settings["ann_ef"])
        if len(C) < int(self._settings["ann_min_centroids"]):
            router.set_ann(None)
            return
        if router._ann is not None:
            router._ann.set_ef(ef)
            return
        stored = self.store.routing_get("ann:centroids")
        labels = np.arange(len(C), dtype=np.int64)
        if stored is not None and stored[0] == router.key:
            idx = HnswIndex.from_bytes(stored[1], self.dim, labels, ef=ef)
        else:
            idx = HnswIndex(self.dim, ef=ef).fit(labels, C)
            self.store.routing_put("ann:centroids", router.key, idx.to_bytes(), {"items": len(C), "ef": ef})
        router.set_ann(idx)

    def refit_router(self, recalibrate: bool = True) -> dict[str, Any]:
        """Refit the gate from the experts' documents and the feedback, persist it; returns fit figures.

        ``recalibrate=False`` does what the first route after a change does: it keeps the held-out
        calibration of the last full fit while fewer than ``recalibrate_after`` of the experts have changed
        since (only the final gate is fitted; figure ``calibration_reused``).

        Figures: ``experts``, ``documents``, ``feedback``, held-out ``heldout_accuracy``, ``heldout_ece``,
        ``heldout_refused``, the mix weights, the calibrated ``threshold`` and ``scope_threshold``,
        ``centroids``; with refusal experts also ``refusal_heldout`` (their held-out examples) and
        ``refusal_heldout_refused`` (the share of those the router refuses).
        """
        self._refresh()
        routable = [r for r in self._experts if r["size"] > 0]
        if not routable:
            self._router_cache = None
            return {"experts": 0}
        key = fingerprint(routable, self._settings)
        router = self._fit_router(routable, key, self.store.routing_get("gate"), previous=self._router_cache,
                                  recalibrate=recalibrate)
        self._attach_ann(router)
        self._router_cache = router
        return router.figures()

    def router_figures(self) -> dict[str, Any]:
        """Figures of the current gate (fitting it first if the experts changed)."""
        self._refresh()
        r = self._router()
        return r.figures() if r is not None else {"experts": 0}

    def _beam_width(self, router) -> int:
        b = self._settings["beam"]
        if b is None:
            return 3 if router.tree.has_structure() and len(router.rows) >= 1000 else 0
        return int(b)

    def _gate(self, Q: np.ndarray, texts: Optional[list[Optional[str]]]):
        """Score queries ``(n, d)``: ``(router, components {name: (n, E)}, logits (n, E), conf (n, E), scored (n,),
        scope (n,))``.

        Candidates come from a beam over the tree, or hnswlib over the centroids, or all experts.
        """
        router = self._router()
        if router is None:
            z = np.zeros((len(Q), 0))
            return None, {}, z, z, np.zeros(len(Q), dtype=np.int64), np.full(len(Q), -np.inf)
        width = self._beam_width(router)
        cands = None
        if width > 0:
            cands = [router.beam(q, width)[0] for q in Q]
        elif router._ann is not None:
            cands = router.ann_candidates(Q, int(self._settings["ann_candidates"]))
        comps, z, conf, mask, scope = router.score(Q, texts, cands)
        return router, comps, z, conf, mask.sum(axis=1), scope

    def _retrieve(self, q: np.ndarray, rows: list[dict], k: int, exact: bool = False) -> list[tuple[float, int, dict]]:
        """Best ``k`` (score, rowid, expert row) inside the given experts; large experts use hnswlib unless ``exact``."""
        cands: list[tuple[float, int, dict]] = []
        big = np.inf if exact else int(self._settings["ann_min_docs"])
        for row in rows:
            if row["size"] >= big:
                lab, sim = self._doc_index(row).query(q, k)
                cands += [(float(s), int(i), row) for i, s in zip(lab[0], sim[0])]
                continue
            ids, m = self._expert_docs(row)
            if not len(ids):
                continue
            lab, sim = exact_topk(q, m, ids, k)
            cands += [(float(s), int(i), row) for i, s in zip(lab[0], sim[0])]
        cands.sort(key=lambda c: (-c[0], c[1]))
        return cands[:k]

    def _doc_index(self, row: dict):
        """The hnswlib index of a large expert's documents: cached, else loaded and synced, then persisted."""
        cache = self._ann_docs.get(row["id"])
        if cache is not None and cache[0] == row["version"]:
            return cache[1]
        name = f"ann:docs:{row['id']}"
        ef = int(self._settings["ann_ef"])
        ids, m = self._expert_docs(row)
        idx = cache[1] if cache is not None else None
        if idx is None:
            stored = self.store.routing_get(name)
            if stored is not None:
                f = stored[2]
                idx = HnswIndex.from_bytes(stored[1], self.dim, np.asarray(f["labels"], np.int64), ef=ef,
                                           deleted=int(f.get("deleted", 0)))
                if stored[0] == str(row["version"]):
                    self._ann_docs[row["id"]] = (row["version"], idx)
                    return idx
        if idx is None:
            idx = HnswIndex(self.dim, ef=ef).fit(ids, m)
        else:
            idx.sync(ids, m)
        self.store.routing_put(name, str(row["version"]), idx.to_bytes(),
                               {"labels": sorted(idx.labels_), "deleted": idx.deleted_, "ef": ef})
        self._ann_docs[row["id"]] = (row["version"], idx)
        return idx

    def _hits(self, cands: list[tuple[float, int, dict]]) -> list[Hit]:
        docs = self.store.documents_by_rowid([c[1] for c in cands])
        return [Hit(expert=row["name"], id=docs[rid]["id"], text=docs[rid]["text"], score=score,
                    metadata=docs[rid]["metadata"], source=docs[rid]["source"])
                for score, rid, row in cands if rid in docs]

    def _check_route_args(self, top_k: int, k: int, min_confidence: Optional[float]) -> Optional[float]:
        """Validated arguments; the explicit threshold or ``None`` (database default / calibrated)."""
        if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
            raise InvalidInput(f"top_k must be an integer >= 1, got {top_k!r}")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
            raise InvalidInput(f"k must be an integer >= 0, got {k!r}")
        if min_confidence is None:
            return None
        if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float, np.floating)) or \
                not (0.0 <= float(min_confidence) <= 1.0):
            raise InvalidInput(f"min_confidence must be a number in [0, 1], got {min_confidence!r}")
        return float(min_confidence)

    def _threshold(self, explicit: Optional[float], router) -> tuple[float, Optional[float]]:
        """``(confidence threshold, scope threshold or None)``.

        A ``min_confidence`` (the call's, else the database's) is a plain confidence rule. Without one,
        the calibrated default applies: abstain when the query's scope is below the gate's calibrated
        scope threshold; later experts must still reach the calibrated confidence threshold.
        """
        if explicit is None:
            explicit = self._settings["min_confidence"]
        if explicit is not None:
            return float(explicit), None
        if router is None:
            return 0.0, None
        ms = self._settings["min_scope"]
        return float(router.gate.threshold_), float(router.gate.scope_threshold_ if ms is None else ms)

    def _check_context(self, context: Any) -> list[str]:
        if context is None:
            return []
        if isinstance(context, str) or not isinstance(context, (list, tuple)):
            raise InvalidInput(f"context must be a list of strings (earlier turns), got {type(context).__name__}")
        for i, t in enumerate(context):
            if not isinstance(t, str):
                raise InvalidInput(f"context must be a list of strings: item #{i} is {type(t).__name__}")
        return [t for t in context if t.strip()]

    def _with_context(self, Q: np.ndarray, texts: list[Optional[str]], context: list[str]
                      ) -> tuple[np.ndarray, list[Optional[str]]]:
        """Mix the conversation into each query: ``q + w * sum_i 0.5^i c_i`` (latest turn first), renormalised.

        ``w = context_weight``; the lexical signal sees the query plus the latest turn.
        """
        Q2 = mix_context(Q, self._embed(list(context)), float(self._settings["context_weight"]))
        return Q2, [(t + " " + context[-1]) if t is not None else context[-1] for t in texts]

    def route(self, query: Union[str, np.ndarray], top_k: int = 2, k: int = 5,
              min_confidence: Optional[float] = None, *, log: Optional[bool] = None, explain: bool = False,
              context: Optional[Sequence[str]] = None) -> RouteResult:
        """Route one query (text or vector of shape ``(d,)``) to experts and retrieve passages.

        ``min_confidence=None`` uses the database default: unless ``configure(min_confidence=...)`` set
        one, the router abstains when the query's scope score (how much it looks like the experts'
        documents) is below the threshold calibrated on held-out documents (``refuse_rate``). A number
        is a plain rule on the top confidence; ``0.0`` never abstains.
        ``explain=True`` fills each expert's ``components`` and ``r.explanation``; ``context``: earlier
        turns of a conversation (list of str) mixed into the query.
        """
        if isinstance(query, (list, tuple)) and query and isinstance(query[0], str):
            raise InvalidInput("route() takes one query; use route_many() for a list")
        return self.route_many([query], top_k=top_k, k=k, min_confidence=min_confidence, log=log,
                               explain=explain, context=context)[0]

    def route_many(self, queries: Sequence[Union[str, np.ndarray]], top_k: int = 2, k: int = 5,
                   min_confidence: Optional[float] = None, *, log: Optional[bool] = None, explain: bool = False,
                   context: Optional[Sequence[str]] = None) -> list[RouteResult]:
        """Route a batch of queries: one embedding call, vectorised gating, one log transaction."""
        t0 = time.perf_counter()
        self._refresh()
        explicit = self._check_route_args(top_k, k, min_confidence)
        ctx = self._check_context(context)
        if isinstance(queries, np.ndarray) and queries.ndim == 2:
            queries = list(queries)
        if not len(queries):
            return []
        texts, Q = self._query_vectors(list(queries))
        lex_texts: list[Optional[str]] = [t if t != "<vector>" else None for t in texts]
        if ctx:
            Q, lex_texts = self._with_context(Q, lex_texts, ctx)
        router, comps, z, conf, scored, scope = self._gate(Q, [t or "" for t in lex_texts])
        thr, scope_thr = self._threshold(explicit, router)
        admit = scope >= scope_thr if scope_thr is not None else None
        n, E = conf.shape
        refused_by, exclude, z_sel = self._refusals(router, conf, z, thr, scope_thr)
        if exclude is not None:
            if admit is None:  # the confidence rule, over the experts that answer
                admit = np.where(exclude[None, :], -np.inf, conf).max(axis=1) >= thr
            admit = admit & np.array([b is None for b in refused_by], dtype=bool)
        bal = self._balancer(router) if router is not None and self._settings["balance"] else None
        results = []
        for i in range(n):
            adm = admit[i:i + 1] if admit is not None else None
            if bal is not None:
                sel = select(conf[i:i + 1], top_k, thr, bias=bal.bias, logits=z_sel[i:i + 1], blocked=bal.blocked(),
                             admit=adm, exclude=exclude)[0]
                bal.observe(z_sel[i], sel, top_k)
            else:
                sel = select(conf[i:i + 1], top_k, thr, admit=adm, exclude=exclude)[0] if E else np.zeros(0, np.int64)
            rows = [router.rows[j] for j in sel]
            es = [ExpertScore(router.rows[j]["name"], float(z[i, j]), float(conf[i, j])) for j in sel]
            hits = self._hits(self._retrieve(Q[i], rows, k)) if rows and k else []
            r = RouteResult(query=texts[i], experts=es, hits=hits, abstained=not es,
                            scope=float(scope[i]) if np.isfinite(scope[i]) else None, refused_by=refused_by[i])
            if rows:
                r.path = router.path(rows[0]["id"])
            if explain:
                router.explain(r, comps, z[i], conf[i], i, sel, thr, bal.bias if bal is not None else None,
                               int(scored[i]), lex_texts[i], len(ctx), float(scope[i]), scope_thr)
            results.append(r)
        elapsed = (time.perf_counter() - t0) * 1000.0 / len(results)
        for r in results:
            r.latency_ms = elapsed
        save_balance = bal is not None and log is not False
        logging = self._log_enabled(log)
        if save_balance or logging:
            with self.store.atomic():  # one commit per call for the balance state and the log together
                if save_balance:
                    self._save_balance(router, bal)
                if logging:
                    self._log(results, Q)
        return results

    def _refusals(self, router, conf: np.ndarray, z: np.ndarray, thr: float, scope_thr: Optional[float]
                  ) -> tuple[list[Optional[str]], Optional[np.ndarray], np.ndarray]:
        """Per query the refusal expert that is its best match (``None`` if none), the ``(E,)`` mask of
        refusal experts (``None`` without any) and the logits ``(n, E)`` with them at ``-inf`` for selection.

        A refusal expert never answers; being the best match abstains, except under ``min_confidence=0.0``,
        which never abstains.
        """
        n = len(conf)
        if router is None or not len(router.refuse_cols):
            return [None] * n, None, z
        exclude = np.zeros(conf.shape[1], dtype=bool)
        exclude[router.refuse_cols] = True
        best = conf.argmax(axis=1) if conf.shape[1] else np.zeros(n, np.int64)
        active = scope_thr is not None or thr > 0
        refused = [router.rows[int(b)]["name"] if active and exclude[int(b)] else None for b in best]
        return refused, exclude, np.where(exclude[None, :], -np.inf, z)

    # ------------------------------------------------------------------ load balancing
    def _balancer(self, router) -> Balancer:
        s = self._settings
        rows = self.store.balance_rows()
        now = time.time()
        ws = now - float(s["capacity_window"])
        bias = np.zeros(len(router.rows))
        used = np.zeros(len(router.rows), dtype=np.int64)
        for eid, (b, _, _, start, count) in rows.items():
            j = router.col.get(eid)
            if j is not None:
                bias[j] = b
                used[j] = count if start >= ws else 0
        return Balancer(bias, rate=float(s["balance_rate"]), max_bias=float(s["balance_max_bias"]),
                        margin=float(s["balance_margin"]), capacity=s["capacity"], window_used=used,
                        means=router.means(), similarity=float(s["balance_similarity"]))

    def _save_balance(self, router, bal: Balancer) -> None:
        d = bal.delta_bias_
        touched = np.flatnonzero((d != 0) | (bal.load_ > 0) | (bal.expected_ > 0) | (bal.window_delta_ > 0))
        if not len(touched):
            return
        dw = bal.window_delta_  # every selection of this call counts against the capacity window
        now = time.time()
        self.store.balance_apply([(router.rows[j]["id"], d[j], bal.load_[j], bal.expected_[j], int(dw[j]))
                                  for j in touched], float(self._settings["balance_max_bias"]),
                                 now - float(self._settings["capacity_window"]), now)

    def balance_stats(self) -> dict[str, Any]:
        """Load figures since the last reset: per expert ``{load, share, expected, bias}``, and ``cv``,
        ``max_over_mean`` of the load across routable experts."""
        self._refresh()
        rows = self.store.balance_rows()
        routable = self._answering()
        load = np.array([rows.get(r["id"], (0, 0))[1] for r in routable], dtype=np.float64)
        fig = load_figures(load)
        total = fig["total"] or 1.0
        fig["experts"] = {r["name"]: {"load": float(load[j]), "share": float(load[j] / total),
                                      "expected": float(rows.get(r["id"], (0, 0, 0))[2]),
                                      "bias": float(rows.get(r["id"], (0.0,))[0])}
                          for j, r in enumerate(routable)}
        return fig

    def reset_balance(self, biases: bool = True) -> None:
        """Zero the load counters (and the selection biases unless ``biases=False``)."""
        self.store.balance_reset(biases)

    def _log_enabled(self, log: Optional[bool]) -> bool:
        """The call's ``log=``, else ``connect(log_queries=...)``, else the database setting."""
        if log is not None:
            return bool(log)
        return bool(self._log_override if self._log_override is not None else self._settings["log_queries"])

    def _log(self, results: list[RouteResult], Q: np.ndarray) -> None:
        """Append the routes to the query log and set their ``query_id``."""
        now = time.time()
        keep_vec = self._settings["log_vectors"]
        entries = [{
            "ts": now, "query": r.query, "query_vec": to_blob(Q[i]) if keep_vec else None,
            "abstained": r.abstained, "top_confidence": r.experts[0].confidence if r.experts else None,
            "latency_ms": r.latency_ms,
            "choices": [(self._by_name[e.name]["id"], rank, e.score, e.confidence) for rank, e in enumerate(r.experts)],
        } for i, r in enumerate(results)]
        for r, qid in zip(results, self.store.log_routes(entries)):
            r.query_id = qid

    def search(self, query: Union[str, np.ndarray], k: int = 10, experts: Optional[Sequence[str]] = None) -> list[Hit]:
        """Exhaustive search over every document (or only the named experts): the baseline."""
        self._refresh()
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInput(f"k must be an integer >= 1, got {k!r}")
        _, Q = self._query_vectors([query])
        rows = [self._require(n) for n in experts] if experts is not None else \
            self._answering()
        return self._hits(self._retrieve(Q[0], rows, k, exact=True))
