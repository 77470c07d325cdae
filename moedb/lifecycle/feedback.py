"""Feedback on routes: single events, streaming ingestion jobs, and retraining the gate with them.

An event says that routing a query to an expert was good (reward > 0) or bad (reward < 0). Events are
keyed (an explicit ``"id"``, else a hash of query or query id, expert, reward and time), so ingesting the
same file twice adds nothing the second time. :meth:`FeedbackService.retrain` folds them into the gate and
measures it on held-out feedback before and after.
"""
from __future__ import annotations

import os
import time as _time
from typing import Any, Callable, Optional, Union

import numpy as np

from ..engine.catalog import Catalog
from ..engine.embedding import FileEmbedder
from ..engine.gate import GateService
from ..engine.route import RouteService
from ..errors import FileProblem, InvalidInput, MoedbError
from ..store import Store
from ..text import is_unicode
from ..timeparse import parse_time
from ..vectors import F4, to_blob
from .events import EventError, IngestJob, check_reward, event_key, key_bucket, parse_event

Progress = Optional[Callable[[int, int], None]]


class FeedbackService:
    """Feedback of one file and the retraining of its gate."""

    def __init__(self, store: Store, catalog: Catalog, embedding: FileEmbedder, gate: GateService,
                 router: RouteService):
        self.store = store
        self.catalog = catalog
        self.embedding = embedding
        self.gate = gate
        self.router = router

    def feedback(self, query_id: Union[int, str], expert: str, reward: float = 1.0, *, id: Any = None,
                 time: Any = None) -> dict[str, Any]:
        """Record that routing a query to ``expert`` was good (``reward`` > 0) or bad (< 0).

        ``query_id``: the id of a logged route (``RouteResult.query_id``) or a query text.
        ``reward`` in [-1, 1]. ``id``: optional event id (a second event with the same id is
        ignored). Returns ``{"id", "key", "query_id", "expert", "reward", "already_present"}``.
        """
        r = check_reward(reward)
        row = self.catalog.require(expert)
        when = parse_time(time) if time is not None else _time.time()
        if isinstance(query_id, str):
            if not query_id.strip():
                raise InvalidInput("query is empty")
            if not is_unicode(query_id):
                raise InvalidInput("query is not valid Unicode (a lone surrogate)")
            text, qid, vec = query_id, None, self.embedding.embed([query_id])[0]
        elif isinstance(query_id, (int, np.integer)) and not isinstance(query_id, bool):
            qid = int(query_id)
            if not 0 < qid < 2**63:
                raise InvalidInput(f"unknown query id {qid} (not in the query log)")
            logged = self.store.log.queries([qid]).get(qid)
            if logged is None:
                raise InvalidInput(f"unknown query id {qid} (not in the query log)")
            text, vec = logged[0], self._logged_vector(qid, *logged)
        else:
            raise InvalidInput(f"query_id must be a logged query id (int) or a query text, got {query_id!r}")
        if id is not None and (isinstance(id, bool) or not isinstance(id, (str, int)) or id == ""):
            raise InvalidInput(f"feedback id must be a non-empty string or an integer, got {id!r}")
        key = event_key(text if qid is None else None, qid, expert, r, when, id)
        n = self.store.feedback.insert([(key, qid, text, to_blob(vec), row["id"], r, when, key_bucket(key), "api")])
        fid = self.store.feedback.id_of(key)
        return {"id": fid, "key": key, "query_id": qid, "expert": expert, "reward": r, "already_present": n == 0}

    def _logged_vector(self, qid: int, text: str, blob: Optional[bytes]) -> np.ndarray:
        """The vector of a logged query: the stored one, else the text re-embedded."""
        if blob is not None:
            return np.frombuffer(blob, dtype=F4).astype(np.float32)
        if text == "<vector>":
            raise InvalidInput(f"query {qid} was routed as a vector and logged without it (log_vectors is off)")
        return self.embedding.embed([text])[0]

    def ingest_feedback(self, path: Union[str, os.PathLike], *, progress: Progress = None,
                        batch: int = 256, chunk: int = 20_000) -> dict[str, Any]:
        """Ingest a JSONL file of feedback events, streaming it line by line.

        One event per line: ``{"query": "...", "expert": "...", "reward": 1}`` or
        ``{"query_id": 42, ...}``, optional ``"id"`` and ``"time"``. Malformed lines and unknown
        experts are skipped and reported with their line numbers; events already stored are
        counted as already present. Rows are written in transactions of up to ``chunk`` events
        (one transaction for most files). ``progress(bytes_read, file_size)``.

        Returns ``{"lines", "taken", "skipped", "already_present", "errors": [{"line", "error"}],
        "errors_truncated", "transactions"}``.
        """
        p = os.fspath(path)
        try:
            size = os.path.getsize(p)
            fh = open(p, "rb")
        except OSError as e:
            raise FileProblem(f"cannot read feedback file {p!r}: {e.strerror}") from None
        self.catalog.refresh()
        names = {r["name"]: r["id"] for r in self.catalog.rows}
        job = IngestJob(os.path.basename(p))
        batch_events: list[tuple[int, dict]] = []
        done = 0
        with fh:
            for lineno, raw in enumerate(fh, 1):
                done += len(raw)
                job.lines = lineno
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    job.error(lineno, "not valid UTF-8")
                    continue
                if not line.strip():
                    continue
                try:
                    batch_events.append((lineno, parse_event(line)))
                except EventError as e:
                    job.error(lineno, str(e))
                if len(batch_events) >= batch:
                    self._ingest_batch(batch_events, names, job)
                    batch_events = []
                    if len(job.rows) >= chunk:
                        self._flush_feedback(job)
                    if progress:
                        progress(done, size)
        if batch_events:
            self._ingest_batch(batch_events, names, job)
        self._flush_feedback(job)
        if progress:
            progress(size, size)
        return {"file": p, "lines": job.lines, "taken": job.taken, "skipped": job.skipped,
                "already_present": job.present, "errors": sorted(job.errors, key=lambda e: e["line"]),
                "errors_truncated": job.skipped > len(job.errors), "transactions": job.transactions}

    def _ingest_batch(self, events: list[tuple[int, dict]], names: dict[str, int], job: IngestJob) -> None:
        """Resolve experts, keys, logged queries and embeddings of a batch; queue the rows.

        Every event is checked in full (expert, logged query, vector) before its key counts: an invalid
        event is skipped with its line number each time it appears, never "already present"."""
        stored = self.store.feedback.keys_present([ev["key"] for _, ev in events])
        fresh: list[tuple[int, dict]] = []
        for lineno, ev in events:
            if ev["key"] in stored:
                job.present += 1
            elif ev["expert"] not in names:
                job.error(lineno, f"unknown expert {ev['expert']!r}")
            else:
                fresh.append((lineno, ev))
        vecs = self._event_vectors(fresh, job)
        now = _time.time()
        for lineno, ev in fresh:
            v = vecs.get(lineno)
            if v is None:
                continue  # skipped (and reported) by _event_vectors
            if ev["key"] in job.pending_keys:
                job.present += 1
                continue
            job.pending_keys.add(ev["key"])
            job.rows.append((ev["key"], ev["query_id"], ev["query"], to_blob(v), names[ev["expert"]], ev["reward"],
                             ev["time"] if ev["time"] is not None else now, key_bucket(ev["key"]), job.source))

    def _event_vectors(self, fresh: list[tuple[int, dict]], job: IngestJob) -> dict[int, Optional[np.ndarray]]:
        """``{line: query vector (d,)}`` of the events; a line whose query cannot be had (an unknown query
        id, a vector the log did not keep, a failed embedding) maps to ``None`` and is reported."""
        logged = self.store.log.queries([ev["query_id"] for _, ev in fresh if ev["query_id"] is not None])
        vecs: dict[int, Optional[np.ndarray]] = {}
        texts: dict[str, list[int]] = {}
        for lineno, ev in fresh:
            qid = ev["query_id"]
            if qid is None:
                texts.setdefault(ev["query"], []).append(lineno)
            elif qid not in logged:
                vecs[lineno] = None
                job.error(lineno, f"unknown query id {qid} (not in the query log)")
            else:
                ev["query"], blob = logged[qid]
                if blob is not None:
                    vecs[lineno] = np.frombuffer(blob, dtype=F4)
                elif ev["query"] == "<vector>":
                    vecs[lineno] = None
                    job.error(lineno, f"query {qid} was logged without its vector (log_vectors is off)")
                else:
                    texts.setdefault(ev["query"], []).append(lineno)
        if texts:
            uniq = list(texts)
            try:
                emb = self.embedding.embed(uniq)
            except MoedbError as e:
                for t in uniq:
                    for lineno in texts[t]:
                        vecs[lineno] = None
                        job.error(lineno, f"cannot embed the query: {e}")
            else:
                for t, v in zip(uniq, emb):
                    for lineno in texts[t]:
                        vecs[lineno] = v
        return vecs

    def _flush_feedback(self, job: IngestJob) -> None:
        if not job.rows:
            return
        n = self.store.feedback.insert(job.rows)
        job.transactions += 1
        job.taken += n
        job.present += len(job.rows) - n      # written meanwhile by another process
        job.rows = []
        job.pending_keys = set()

    def retrain(self, holdout: float = 0.1, *, min_heldout: int = 10) -> dict[str, Any]:
        """Fold feedback into the gate and report figures measured on held-out feedback.

        A deterministic ``holdout`` share of the feedback (by event key) is kept out of training
        and used to measure the gate before and after (when fewer than ``min_heldout`` events
        would be held out, nothing is held out and the figures are measured on the training
        feedback, flagged by ``"measured_on"``). The gate is fitted with no lock held and stored together
        with the holdout cut in one short transaction, so a reader in another process sees the old gate or
        the new one; the run's report is recorded right after.
        """
        if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0.0 <= holdout < 1.0:
            raise InvalidInput(f"holdout must be a fraction in [0, 1), got {holdout!r}")
        t0 = _time.perf_counter()
        total = self.store.feedback.usable_count()
        cut = int(round(holdout * 1000))
        held = self.store.feedback.rows(True, cut) if cut else None
        if held is None or len(held[0]) < min_heldout:
            cut, measured_on = 0, "training feedback (too few events to hold some out)"
            held = self.store.feedback.rows(None, 0)
        else:
            measured_on = "held-out feedback"
        _, hv, he, hr = held
        before = self._route_accuracy(hv, he, hr)
        max_id = self.store.feedback.max_id()
        figures = dict(self.gate.refit(holdout_cut=cut, write=lambda: self.store.feedback.set_holdout_cut(cut)) or {})
        self.catalog.touch()
        after = self._route_accuracy(hv, he, hr)
        report = {"feedback": total, "training_events": total - (len(he) if cut else 0),
                  "heldout_events": len(he) if cut else 0, "measured_on": measured_on,
                  "before": before, "after": after, "gate": figures,
                  "seconds": round(_time.perf_counter() - t0, 3)}
        with self.store.atomic():
            report["run"] = self.store.feedback.record_retrain(max_id, report)
        return report

    def _route_accuracy(self, vecs: np.ndarray, eids: np.ndarray, rewards: np.ndarray) -> dict[str, Any]:
        """How often the current gate agrees with feedback: top-1 is the expert (reward > 0), or is
        not (reward < 0). Routing to a descendant of the expert counts as routing to it."""
        self.catalog.refresh()
        m = len(eids)
        if m == 0:
            return {"events": 0, "accuracy": None, "positive": 0, "positive_hits": 0, "negative": 0,
                    "negative_avoided": 0}
        res = self.router.route_many(list(vecs), top_k=1, k=0, min_confidence=0.0, log=False)
        hit = np.zeros(m, bool)
        for i, r in enumerate(res):
            node = self.catalog.by_name.get(r.experts[0].name) if r.experts else None
            while node is not None:
                if node["id"] == eids[i]:
                    hit[i] = True
                    break
                node = self.catalog.by_name.get(node["parent"]) if node["parent"] else None
        pos, neg = rewards > 0, rewards < 0
        ok = np.where(pos, hit, ~hit)[pos | neg]
        return {"events": int((pos | neg).sum()), "accuracy": float(ok.mean()) if ok.size else None,
                "positive": int(pos.sum()), "positive_hits": int(hit[pos].sum()),
                "negative": int(neg.sum()), "negative_avoided": int((~hit[neg]).sum())}
