"""Feedback events: checking a reward, parsing a JSONL line, the idempotency key and holdout bucket of an
event, and the state of one ingestion job.

An event says that routing a query to an expert was good (reward > 0) or bad (reward < 0).
Events are keyed (an explicit ``"id"``, else a hash of query or query id, expert, reward and
time), so ingesting the same file twice adds nothing the second time.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Optional

import numpy as np

from ..errors import InvalidInput
from ..text import is_unicode
from ..timeparse import parse_time

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
    except RecursionError:
        raise EventError("not valid JSON for an event (nested too deeply)") from None
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
    if query is not None and not is_unicode(query):
        raise EventError("\"query\" is not valid Unicode (a lone surrogate)")
    if qid is not None and (isinstance(qid, bool) or not isinstance(qid, int) or not 1 <= qid < 2**63):
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


class IngestJob:
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
