"""Routing a batch of queries: gate scores, abstention, top-k selection with load balancing, retrieval
inside the chosen experts, explanations, and one log transaction per call."""
from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import InvalidInput
from ..routing.engine import mix_context
from ..routing.gating import select, softmax
from ..store import Store
from ..text import content_words
from ..types import ExpertScore, RouteResult
from ..vectors import to_blob
from .balancing import Balancing
from .catalog import Catalog
from .embedding import FileEmbedder
from .evidence import EvidenceService
from .gate import GateService
from .queries import check_context, check_route_args, encode_queries
from .retrieval import Retrieval, check_mode

# the query log keeps at most this many characters of a query's text (its vector is kept whole)
LOG_QUERY_CHARS = 2000
# a query of at most this many content words (moedb.text.content_words) is always read with its conversation
ALONE_MAX_WORDS = 1


class RouteService:
    """``route()`` and ``route_many()`` of one file, composed of the parts it needs.

    ``log_queries``: the connection's override of the ``log_queries`` setting (``None``: the setting).
    """

    def __init__(self, store: Store, catalog: Catalog, embedding: FileEmbedder, gate: GateService,
                 retrieval: Retrieval, balancing: Balancing, log_queries: Optional[bool] = None,
                 evidence: Optional[EvidenceService] = None):
        self.store = store
        self.evidence = evidence
        self.catalog = catalog
        self.embedding = embedding
        self.gate = gate
        self.retrieval = retrieval
        self.balancing = balancing
        self._log_override = log_queries

    def _beam_width(self, router) -> int:
        b = self.catalog.settings.beam
        if b is None:
            return 3 if router.tree.has_structure() and len(router.rows) >= 1000 else 0
        return int(b)

    def _gate(self, router, ev, Q: np.ndarray, texts: Optional[list[Optional[str]]]):
        """Score queries ``(n, d)`` with ``router`` and its passage evidence ``ev`` (either may be ``None``):
        ``(components {name: (n, E)}, logits (n, E), conf (n, E), scored (n,), scope (n,))``.

        Candidates come from a beam over the tree, or hnswlib over the centroids, or all experts.
        """
        if router is None:
            z = np.zeros((len(Q), 0))
            return {}, z, z, np.zeros(len(Q), dtype=np.int64), np.full(len(Q), -np.inf)
        width = self._beam_width(router)
        cands = None
        if width > 0:
            cands = [router.beam(q, width)[0] for q in Q]
        elif router.ann is not None:
            cands = router.ann_candidates(Q, int(self.catalog.settings.ann_candidates))
        comps, z, conf, mask, scope = router.score(Q, texts, cands)
        if ev is not None and ev.weight_:  # the experts holding the query's nearest passages (routing/evidence.py)
            extra = np.where(mask, ev.logits(Q), np.nan)
            comps = {**comps, "evidence": extra}
            z = np.where(mask, z + np.nan_to_num(extra), -np.inf)
            conf = softmax(z)
        return comps, z, conf, mask.sum(axis=1), scope

    def _threshold(self, explicit: Optional[float], router, ev) -> tuple[float, Optional[float], float]:
        """``(confidence threshold, scope threshold or None, relative floor)``: the one place that decides
        when a route abstains and which experts after the best one are dropped.

        A ``min_confidence`` (the call's, else the database's) is a plain confidence rule: abstain when the
        best expert is below it, keep every later expert that reaches it (``0.0`` keeps them all). Without
        one, the calibrated default applies: abstain when the query's scope is below the gate's calibrated
        scope threshold (or, where the passage evidence carries weight, the lower threshold calibrated on its
        pseudo-queries: questions score lower than passages); a later expert is kept only when it reaches the
        calibrated confidence threshold and ``min_relative_confidence`` x the best expert's confidence.
        """
        if explicit is None:
            explicit = self.catalog.settings.min_confidence
        if explicit is not None:
            return float(explicit), None, 0.0
        rel = float(self.catalog.settings.min_relative_confidence)
        if router is None:
            return 0.0, None, rel
        ms = self.catalog.settings.min_scope
        if ms is not None:
            return float(router.gate.threshold_), float(ms), rel
        scope_thr = float(router.gate.scope_threshold_)
        if ev is not None and np.isfinite(ev.scope_threshold_):
            scope_thr = min(scope_thr, float(ev.scope_threshold_))  # questions over passages (routing/evidence.py)
        return float(router.gate.threshold_), scope_thr, rel

    def route(self, query: Union[str, np.ndarray], top_k: int = 2, k: int = 5,
              min_confidence: Optional[float] = None, *, log: Optional[bool] = None, explain: bool = False,
              context: Optional[Sequence[str]] = None, retrieval: Optional[str] = None) -> RouteResult:
        """Route one query (text or vector of shape ``(d,)``) to experts and retrieve passages.

        ``min_confidence=None`` uses the database default: unless ``configure(min_confidence=...)`` set
        one, the router abstains when the query's scope score (how much it looks like the experts'
        documents) is below the threshold calibrated on held-out documents (``refuse_rate``). A number
        is a plain rule on the top confidence; ``0.0`` never abstains.
        ``explain=True`` fills each expert's ``components`` and ``r.explanation``; ``context``: earlier
        turns of a conversation (list of str) mixed into the query (and its latest turn into the words the
        lexical retrieval matches) when the query cannot stand alone (one content word or none) or the
        passages ground that reading better than the query alone (``explanation["context_used"]``); ``retrieval``: ``"hybrid"``, ``"dense"`` or ``"lexical"`` (default: the
        ``retrieval`` setting).
        """
        if isinstance(query, (list, tuple)) and query and isinstance(query[0], str):
            raise InvalidInput("route() takes one query; use route_many() for a list")
        return self.route_many([query], top_k=top_k, k=k, min_confidence=min_confidence, log=log,
                               explain=explain, context=context, retrieval=retrieval)[0]

    def route_many(self, queries: Sequence[Union[str, np.ndarray]], top_k: int = 2, k: int = 5,
                   min_confidence: Optional[float] = None, *, log: Optional[bool] = None, explain: bool = False,
                   context: Optional[Sequence[str]] = None, retrieval: Optional[str] = None) -> list[RouteResult]:
        """Route a batch of queries: one embedding call, vectorised gating, one log transaction."""
        t0 = time.perf_counter()
        self.catalog.refresh()
        explicit = check_route_args(top_k, k, min_confidence)
        if retrieval is not None:
            check_mode(retrieval)
        ctx = check_context(context)
        if isinstance(queries, np.ndarray) and queries.ndim == 2:
            queries = list(queries)
        if not len(queries):
            return []
        texts, Q = encode_queries(self.embedding, list(queries))
        lex_texts: list[Optional[str]] = [t if t != "<vector>" else None for t in texts]
        router = self.gate.current()
        ev = self.evidence.current(router) if self.evidence is not None else None
        used = np.zeros(len(Q), dtype=bool)
        if ctx:
            Q, lex_texts, used = self._with_context(Q, lex_texts, ctx, router, ev)
        comps, z, conf, scored, scope = self._gate(router, ev, Q, [t or "" for t in lex_texts])
        thr, scope_thr, rel = self._threshold(explicit, router, ev)
        admit = scope >= scope_thr if scope_thr is not None else None
        n, E = conf.shape
        refused_by, exclude, z_sel = self._refusals(router, conf, z, thr, scope_thr)
        if exclude is not None:
            if admit is None:  # the confidence rule, over the experts that answer
                admit = np.where(exclude[None, :], -np.inf, conf).max(axis=1) >= thr
            admit = admit & np.array([b is None for b in refused_by], dtype=bool)
        bal = self.balancing.balancer(router) if router is not None and self.catalog.settings.balance else None
        results = []
        for i in range(n):
            adm = admit[i:i + 1] if admit is not None else None
            if bal is not None:
                sel = select(conf[i:i + 1], top_k, thr, bias=bal.bias, logits=z_sel[i:i + 1], blocked=bal.blocked(),
                             admit=adm, exclude=exclude, relative=rel)[0]
                bal.observe(z_sel[i], sel, top_k)
            else:
                sel = select(conf[i:i + 1], top_k, thr, admit=adm, exclude=exclude, relative=rel)[0] \
                    if E else np.zeros(0, np.int64)
            rows = [router.rows[j] for j in sel]
            es = [ExpertScore(router.rows[j]["name"], float(z[i, j]), float(conf[i, j])) for j in sel]
            hits = self.retrieval.hits(self.retrieval.retrieve(Q[i], rows, k, text=lex_texts[i], mode=retrieval,
                                                               explain=explain)) if rows and k else []
            r = RouteResult(query=texts[i], experts=es, hits=hits, abstained=not es,
                            scope=float(scope[i]) if np.isfinite(scope[i]) else None, refused_by=refused_by[i])
            if rows:
                r.path = router.path(rows[0]["id"])
            if explain:
                router.explain(r, comps, z[i], conf[i], i, sel, thr, bal.bias if bal is not None else None,
                               int(scored[i]), lex_texts[i], len(ctx), float(scope[i]), scope_thr)
                r.explanation["min_relative_confidence"] = rel
                r.explanation["context_used"] = bool(used[i])
                r.explanation["dropped"] = _dropped(router, conf[i], sel, top_k, thr, rel, exclude)
            results.append(r)
        elapsed = (time.perf_counter() - t0) * 1000.0 / len(results)
        for r in results:
            r.latency_ms = elapsed
        save_balance = bal is not None and log is not False
        logging = self._log_enabled(log)
        if save_balance or logging:
            with self.store.atomic():  # one commit per call for the balance state and the log together
                if save_balance:
                    self.balancing.save(router, bal)
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

    def _log_enabled(self, log: Optional[bool]) -> bool:
        """The call's ``log=``, else ``connect(log_queries=...)``, else the database setting."""
        if log is not None:
            return bool(log)
        return bool(self._log_override if self._log_override is not None else self.catalog.settings.log_queries)

    def _log(self, results: list[RouteResult], Q: np.ndarray) -> None:
        """Append the routes to the query log and set their ``query_id``."""
        now = time.time()
        keep_vec = self.catalog.settings.log_vectors
        entries = [{
            "ts": now, "query": r.query[:LOG_QUERY_CHARS], "query_vec": to_blob(Q[i]) if keep_vec else None,
            "abstained": r.abstained, "top_confidence": r.experts[0].confidence if r.experts else None,
            "latency_ms": r.latency_ms,
            "choices": [(self.catalog.by_name[e.name]["id"], rank, e.score, e.confidence) for rank, e in enumerate(r.experts)],
        } for i, r in enumerate(results)]
        for r, qid in zip(results, self.store.log.append(entries)):
            r.query_id = qid

    def _with_context(self, Q: np.ndarray, texts: list[Optional[str]], context: list[str], router, ev
                      ) -> tuple[np.ndarray, list[Optional[str]], np.ndarray]:
        """Each query read with the conversation or alone.

        With the conversation: ``q + w * sum_i 0.5^i c_i`` (latest turn first, ``w = context_weight``),
        renormalised, and the lexical signal sees the query plus the latest turn. That reading is used when
        the query cannot stand alone (at most :data:`ALONE_MAX_WORDS` content word: "why is that?", "and how
        do I rotate them?"), or when its nearest passage (of the evidence sample; without one, of the gate's
        centroids) is closer than the query's own nearest one: a follow-up is grounded by its conversation,
        a question that changes the subject is better read alone. (MTRAG, routed top_k=2 hybrid nDCG@10, with
        another question of the same domain as the earlier turn: 0.655 always mixed, 0.743 chosen this way,
        0.812 without it; generic follow-ups after the question: 0.767 always mixed, 0.769 chosen, 0.008 alone;
        benches/bench_retrieval.py.)
        Returns the queries ``(n, d)``, their lexical texts and ``(n,)`` bool: the conversation was used.
        """
        Qm = mix_context(Q, self.embedding.embed(list(context)), float(self.catalog.settings.context_weight))
        used = _grounded_better(Qm, Q, router, ev) | np.array(
            [t is None or len(content_words(t)) <= ALONE_MAX_WORDS for t in texts], dtype=bool)
        Q2 = np.where(used[:, None], Qm, Q).astype(np.float32)
        return Q2, [((t + " " + context[-1]) if t is not None else context[-1]) if u else t
                    for t, u in zip(texts, used)], used


def _grounded_better(A: np.ndarray, B: np.ndarray, router, ev) -> np.ndarray:
    """``(n,)`` bool: the nearest reference vector of ``A[i]`` is closer than that of ``B[i]`` (``(n, d)`` each);
    the references are the passages sampled for the evidence ``ev``, else the ``router``'s centroids (all True
    when there is no router yet)."""
    if router is None:
        return np.ones(len(A), dtype=bool)
    ref = ev.X_ if ev is not None and len(ev.X_) else router.gate.centroids_
    return (A @ ref.T).max(axis=1) > (B @ ref.T).max(axis=1)


def _dropped(router, conf: np.ndarray, sel: np.ndarray, top_k: int, thr: float, rel: float,
             exclude: Optional[np.ndarray]) -> list[dict]:
    """The experts among the ``top_k`` most confident (``conf`` ``(E,)``) that the route left out, and why."""
    c = np.where(exclude, -np.inf, conf) if exclude is not None else np.asarray(conf, np.float64)
    if not len(sel) or not c.size:
        return []
    best = float(conf[int(sel[0])])
    out = []
    for j in np.argsort(-c, kind="stable")[:top_k]:
        if int(j) in set(int(x) for x in sel) or not np.isfinite(c[j]):
            continue
        why = (f"confidence {c[j]:.3f} is below {rel:g} x the best expert's {best:.3f}" if c[j] < rel * best
               else f"confidence {c[j]:.3f} is below the floor {thr:.3f}" if c[j] < thr
               else "another expert ranked higher after load balancing")
        out.append({"name": router.rows[int(j)]["name"], "confidence": float(c[j]), "why": why})
    return out
