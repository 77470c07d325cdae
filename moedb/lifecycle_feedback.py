"""Feedback on routes: single events, streaming ingestion jobs, and the gate's training examples.

An event says that routing a query to an expert was good (reward > 0) or bad (reward < 0).
Events are keyed (an explicit ``"id"``, else a hash of query or query id, expert, reward and
time), so ingesting the same file twice adds nothing the second time.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import time as _time
from typing import Any, Callable, Optional, Union

import numpy as np

from .errors import FileProblem, InvalidInput, MoedbError
from .vectors import F4, to_blob

Progress = Optional[Callable[[int, int], None]]
MAX_ERRORS = 1000          # error messages kept in an ingestion summary (all are counted)


class EventError(ValueError):
    """One feedback event that cannot be taken (the message names the problem)."""


def check_reward(reward: Any) -> float:
    """A reward as float in [-1, 1]; raises :class:`InvalidInput` otherwise."""
    if isinstance(reward, bool) or not isinstance(reward, (int, float, np.integer, np.floating)):
        raise InvalidInput(f"reward must be a number in [-1, 1], got {reward!r}")
    r = float(reward)
    if not math.isfinite(r) or not -1.0 <= r <= 1.0:
        raise InvalidInput(f"reward must be in [-1, 1], got {reward!r}")
    return r


def parse_time(value: Any, what: str = "time") -> Optional[float]:
    """Epoch seconds from a number, a ``datetime`` or an ISO-8601 string (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidInput(f"{what}: expected epoch seconds or an ISO-8601 date, got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            raise InvalidInput(f"{what}: not a finite number")
        return v
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    if isinstance(value, _dt.date):
        return _dt.datetime(value.year, value.month, value.day).timestamp()
    if isinstance(value, str):
        try:
            return _dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise InvalidInput(f"{what}: expected epoch seconds or an ISO-8601 date, got {value!r}")


def event_key(query: Optional[str], query_id: Optional[int], expert: str, reward: float,
              when: Optional[float], explicit_id: Any = None) -> str:
    """The idempotency key of an event: ``id:<id>`` or ``h:<sha1 of the event's content>``."""
    if explicit_id is not None:
        return f"id:{explicit_id}"
    payload = json.dumps({"query": query, "query_id": query_id, "expert": expert, "reward": reward,
                          "time": when}, sort_keys=True, ensure_ascii=False)
    return "h:" + hashlib.sha1(payload.encode("utf-8")).hexdigest()


def key_bucket(key: str) -> int:
    """Deterministic bucket 0..999 of an event key (used for the held-out split)."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 1000


def parse_event(line: str) -> dict[str, Any]:
    """Validate one JSONL line into ``{query, query_id, expert, reward, time, key}``; raises EventError."""
    try:
        ev = json.loads(line)
    except json.JSONDecodeError as e:
        raise EventError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(ev, dict):
        raise EventError(f"expected a JSON object, got {type(ev).__name__}")
    expert = ev.get("expert")
    if not isinstance(expert, str) or not expert.strip():
        raise EventError("missing or empty \"expert\"")
    if "reward" not in ev:
        raise EventError("missing \"reward\"")
    try:
        reward = check_reward(ev["reward"])
    except InvalidInput as e:
        raise EventError(str(e)) from None
    query, qid = ev.get("query"), ev.get("query_id")
    if (query is None) == (qid is None):
        raise EventError("give exactly one of \"query\" and \"query_id\"")
    if query is not None and (not isinstance(query, str) or not query.strip()):
        raise EventError("\"query\" must be a non-empty string")
    if qid is not None and (isinstance(qid, bool) or not isinstance(qid, int) or qid < 1):
        raise EventError(f"\"query_id\" must be a positive integer, got {qid!r}")
    try:
        when = parse_time(ev.get("time"), "\"time\"")
    except InvalidInput as e:
        raise EventError(str(e)) from None
    explicit = ev.get("id")
    if explicit is not None and (isinstance(explicit, bool) or not isinstance(explicit, (str, int))
                                 or (isinstance(explicit, str) and not explicit)):
        raise EventError(f"\"id\" must be a non-empty string or an integer, got {explicit!r}")
    return {"query": query, "query_id": qid, "expert": expert, "reward": reward, "time": when,
            "key": event_key(query, qid, expert, reward, when, explicit)}


class _Job:
    """State of one ingestion: counts, bounded error list, rows prepared but not yet written."""

    def __init__(self, source: str):
        self.source = source
        self.lines = self.taken = self.skipped = self.present = 0
        self.errors: list[dict[str, Any]] = []
        self.rows: list[tuple] = []
        self.pending_keys: set[str] = set()
        self.transactions = 0

    def error(self, lineno: int, msg: str) -> None:
        self.skipped += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"line": lineno, "error": msg})


class FeedbackMixin:
    """Feedback methods of :class:`moedb.Database`."""

    # ------------------------------------------------------------------ single events
    def feedback(self, query_id: Union[int, str], expert: str, reward: float = 1.0, *, id: Any = None,
                 time: Any = None) -> dict[str, Any]:
        """Record that routing a query to ``expert`` was good (``reward`` > 0) or bad (< 0).

        ``query_id``: the id of a logged route (``RouteResult.query_id``) or a query text.
        ``reward`` in [-1, 1]. ``id``: optional event id (a second event with the same id is
        ignored). Returns ``{"id", "key", "query_id", "expert", "reward", "already_present"}``.
        """
        r = check_reward(reward)
        row = self._require(expert)
        when = parse_time(time) if time is not None else _time.time()
        if isinstance(query_id, str):
            if not query_id.strip():
                raise InvalidInput("query is empty")
            text, qid, vec = query_id, None, self._embed([query_id])[0]
        elif isinstance(query_id, (int, np.integer)) and not isinstance(query_id, bool):
            qid = int(query_id)
            logged = self.store.logged_queries([qid]).get(qid)
            if logged is None:
                raise InvalidInput(f"unknown query id {qid} (not in the query log)")
            text, vec = logged[0], self._logged_vector(qid, *logged)
        else:
            raise InvalidInput(f"query_id must be a logged query id (int) or a query text, got {query_id!r}")
        if id is not None and (isinstance(id, bool) or not isinstance(id, (str, int)) or id == ""):
            raise InvalidInput(f"feedback id must be a non-empty string or an integer, got {id!r}")
        key = event_key(text if qid is None else None, qid, expert, r, when, id)
        n = self.store.insert_feedback([(key, qid, text, to_blob(vec), row["id"], r, when, key_bucket(key), "api")])
        fid = self.store.q1("SELECT id FROM feedback WHERE event_key=?", (key,))[0]
        return {"id": fid, "key": key, "query_id": qid, "expert": expert, "reward": r, "already_present": n == 0}

    def _logged_vector(self, qid: int, text: str, blob: Optional[bytes]) -> np.ndarray:
        """The vector of a logged query: the stored one, else the text re-embedded."""
        if blob is not None:
            return np.frombuffer(blob, dtype=F4).astype(np.float32)
        if text == "<vector>":
            raise InvalidInput(f"query {qid} was routed as a vector and logged without it (log_vectors is off)")
        return self._embed([text])[0]

    # ------------------------------------------------------------------ ingestion job
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
        self._refresh()
        names = {r["name"]: r["id"] for r in self._experts}
        job = _Job(os.path.basename(p))
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
                "already_present": job.present, "errors": job.errors,
                "errors_truncated": job.skipped > len(job.errors), "transactions": job.transactions}

    def _ingest_batch(self, events: list[tuple[int, dict]], names: dict[str, int], job: _Job) -> None:
        """Resolve experts, keys, logged queries and embeddings of a batch; queue the rows."""
        stored = self.store.feedback_keys_present([ev["key"] for _, ev in events])
        fresh: list[tuple[int, dict]] = []
        for lineno, ev in events:
            if ev["key"] in stored or ev["key"] in job.pending_keys:
                job.present += 1
            elif ev["expert"] not in names:
                job.error(lineno, f"unknown expert {ev['expert']!r}")
            else:
                job.pending_keys.add(ev["key"])
                fresh.append((lineno, ev))
        logged = self.store.logged_queries([ev["query_id"] for _, ev in fresh if ev["query_id"] is not None])
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
                emb = self._embed(uniq)
            except MoedbError as e:
                emb = None
                for t in uniq:
                    for lineno in texts[t]:
                        vecs[lineno] = None
                        job.error(lineno, f"cannot embed the query: {e}")
            if emb is not None:
                for t, v in zip(uniq, emb):
                    for lineno in texts[t]:
                        vecs[lineno] = v
        now = _time.time()
        for lineno, ev in fresh:
            v = vecs.get(lineno)
            if v is None:
                job.pending_keys.discard(ev["key"])
                continue
            job.rows.append((ev["key"], ev["query_id"], ev["query"], to_blob(v), names[ev["expert"]], ev["reward"],
                             ev["time"] if ev["time"] is not None else now, key_bucket(ev["key"]), job.source))

    def _flush_feedback(self, job: _Job) -> None:
        if not job.rows:
            return
        n = self.store.insert_feedback(job.rows)
        job.transactions += 1
        job.taken += n
        job.present += len(job.rows) - n      # written meanwhile by another process
        job.rows = []
        job.pending_keys = set()

    # ------------------------------------------------------------------ gate examples
    def _holdout_cut(self) -> int:
        """Feedback rows with ``bucket < cut`` are held out of training (set by :meth:`retrain`)."""
        return int((self.store.get_meta("lifecycle", {}) or {}).get("holdout_cut", 0))

    def _feedback_examples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feedback as training examples for the gate.

        Returns ``(vectors (m, d) float32, expert_ids (m,) int64, rewards (m,) float64)``;
        reward > 0 makes the query an example of that expert, < 0 a counter-example. Events of
        removed experts and the held-out share chosen by the last :meth:`retrain` are left out.
        """
        _, vecs, eids, rewards = self.store.feedback_rows(False, self._holdout_cut())
        if vecs.size == 0:
            vecs = np.zeros((0, self.dim), np.float32)
        return vecs, eids, rewards
