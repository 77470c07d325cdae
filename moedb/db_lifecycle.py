"""SQL of the lifecycle area; mixed into :class:`moedb.db.Store` (all SQL stays in the store).

Feedback events, retrain history, moving log references between experts, and the aggregates
behind load analytics (every aggregate runs in SQL on covering indexes, see 0003_lifecycle.sql).
"""
from __future__ import annotations

import json
import time
from typing import Any, Optional, Sequence

import numpy as np

F4 = np.dtype("<f4")


def _window(col: str, since: Optional[float], until: Optional[float]) -> tuple[str, list]:
    """``AND``-able SQL condition on a time column (``since <= col < until``) and its parameters."""
    parts, params = [], []
    if since is not None:
        parts.append(f"{col} >= ?")
        params.append(float(since))
    if until is not None:
        parts.append(f"{col} < ?")
        params.append(float(until))
    return (" AND ".join(parts) if parts else "1"), params


def _matrix(blobs: Sequence[bytes]) -> np.ndarray:
    """Stack ``<f4`` blobs into a float32 matrix ``(n, d)`` (``(0, 0)`` when empty)."""
    if not blobs:
        return np.zeros((0, 0), np.float32)
    return np.frombuffer(b"".join(blobs), dtype=F4).reshape(len(blobs), -1).astype(np.float32)


class LifecycleSQL:
    """Store methods for lifecycle: feedback, retrain runs, log references, load aggregates."""

    # ------------------------------------------------------------------ feedback
    def feedback_keys_present(self, keys: Sequence[str]) -> set[str]:
        """The subset of ``keys`` already stored as feedback event keys."""
        found: set[str] = set()
        keys = list(keys)
        for s in range(0, len(keys), 500):
            chunk = keys[s:s + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.q(f"SELECT event_key FROM feedback WHERE event_key IN ({marks})", chunk))
        return found

    def insert_feedback(self, rows: Sequence[tuple]) -> int:
        """Insert feedback rows in one transaction; returns how many were new.

        Each row: ``(event_key, query_id, query, query_vec <f4 bytes|None, expert_id, reward, ts,
        bucket, source)``. A key already present is left alone (``INSERT OR IGNORE``).
        """
        now = time.time()
        n = 0
        with self.atomic():
            for r in rows:
                self.conn.execute(
                    "INSERT OR IGNORE INTO feedback(event_key, query_id, query, query_vec, expert_id, reward, ts, "
                    "bucket, source, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)", (*r, now))
                n += self.conn.changes()
        return n

    def logged_queries(self, query_ids: Sequence[int]) -> dict[int, tuple[str, Optional[bytes]]]:
        """``{query_id: (query text, query_vec bytes or None)}`` for the ids present in the log."""
        out: dict[int, tuple[str, Optional[bytes]]] = {}
        ids = [int(i) for i in query_ids]
        for s in range(0, len(ids), 500):
            chunk = ids[s:s + 500]
            marks = ",".join("?" * len(chunk))
            for qid, text, vec in self.q(f"SELECT id, query, query_vec FROM query_log WHERE id IN ({marks})", chunk):
                out[qid] = (text, vec)
        return out

    def feedback_rows(self, heldout: Optional[bool], cut: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Usable feedback of live experts: ``(row ids (m,), vectors (m, d), expert ids (m,), rewards (m,))``.

        ``heldout=True`` keeps rows with ``bucket < cut``, ``False`` those with ``bucket >= cut``,
        ``None`` all of them.
        """
        cond = {True: "AND f.bucket < ?", False: "AND f.bucket >= ?", None: ""}[heldout]
        params = [cut] if heldout is not None else []
        rows = self.q(
            "SELECT f.id, f.query_vec, f.expert_id, f.reward FROM feedback f JOIN experts e ON e.id = f.expert_id "
            f"WHERE f.query_vec IS NOT NULL {cond} ORDER BY f.id", params)
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        vecs = _matrix([r[1] for r in rows])
        eids = np.fromiter((r[2] for r in rows), np.int64, len(rows))
        rewards = np.fromiter((r[3] for r in rows), np.float64, len(rows))
        return ids, vecs, eids, rewards

    def feedback_usable_count(self) -> int:
        """Feedback rows with a vector whose expert still exists (what the gate can learn from)."""
        return self.q1("SELECT count(*) FROM feedback f JOIN experts e ON e.id = f.expert_id "
                       "WHERE f.query_vec IS NOT NULL")[0]

    def feedback_count(self, since_id: int = 0) -> int:
        return self.q1("SELECT count(*) FROM feedback WHERE id > ?", (since_id,))[0]

    def feedback_max_id(self) -> int:
        return self.q1("SELECT coalesce(max(id), 0) FROM feedback")[0]

    def feedback_of_expert(self, expert_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Feedback of one expert that carries a vector: ``(row ids (m,), vectors (m, d))``."""
        rows = self.q("SELECT id, query_vec FROM feedback WHERE expert_id=? AND query_vec IS NOT NULL ORDER BY id",
                      (expert_id,))
        return np.fromiter((r[0] for r in rows), np.int64, len(rows)), _matrix([r[1] for r in rows])

    def set_feedback_expert(self, feedback_ids: Sequence[int], expert_id: int) -> None:
        with self.atomic():
            self.conn.executemany("UPDATE feedback SET expert_id=? WHERE id=?",
                                  [(expert_id, int(i)) for i in feedback_ids])

    def reassign_references(self, from_id: int, to_id: int) -> tuple[int, int]:
        """Point feedback and logged choices of one expert at another; returns ``(feedback, choices)`` moved."""
        with self.atomic():
            self.conn.execute("UPDATE feedback SET expert_id=? WHERE expert_id=?", (to_id, from_id))
            nf = self.conn.changes()
            self.conn.execute("UPDATE query_choices SET expert_id=? WHERE expert_id=?", (to_id, from_id))
            nc = self.conn.changes()
        return nf, nc

    def references(self, expert_id: int) -> tuple[int, int]:
        """How many feedback rows and logged choices name an expert."""
        nf = self.q1("SELECT count(*) FROM feedback WHERE expert_id=?", (expert_id,))[0]
        nc = self.q1("SELECT count(*) FROM query_choices WHERE expert_id=?", (expert_id,))[0]
        return nf, nc

    # ------------------------------------------------------------------ retrain runs
    def record_retrain(self, feedback_max: int, figures: dict[str, Any]) -> int:
        with self.atomic():
            self.conn.execute("INSERT INTO retrain_runs(ts, feedback_max, figures) VALUES (?,?,?)",
                              (time.time(), int(feedback_max), json.dumps(figures, sort_keys=True)))
            return self.conn.last_insert_rowid()

    def last_retrain(self) -> Optional[dict[str, Any]]:
        r = self.q1("SELECT id, ts, feedback_max, figures FROM retrain_runs ORDER BY id DESC LIMIT 1")
        if r is None:
            return None
        return {"id": r[0], "ts": r[1], "feedback_max": r[2], "figures": json.loads(r[3])}

    # ------------------------------------------------------------------ load aggregates
    def log_summary(self, since: Optional[float], until: Optional[float]) -> dict[str, Any]:
        """Totals over the window: queries, abstentions, first and last time."""
        w, p = _window("ts", since, until)
        n, abst, t0, t1 = self.q1(
            f"SELECT count(*), coalesce(sum(abstained), 0), min(ts), max(ts) FROM query_log WHERE {w}", p)
        return {"queries": n, "abstained": abst, "first": t0, "last": t1}

    def load_by_expert(self, since: Optional[float], until: Optional[float]) -> dict[int, dict[str, float]]:
        """Per expert id: ``top`` (routes where it ranked first), ``mean_confidence`` there, ``selected``
        (routes that chose it at any rank)."""
        out: dict[int, dict[str, float]] = {}
        if since is None and until is None:
            top = self.q("SELECT expert_id, count(*), avg(confidence) FROM query_choices WHERE rank=0 "
                         "GROUP BY expert_id")
            sel = self.q("SELECT expert_id, count(DISTINCT query_id) FROM query_choices GROUP BY expert_id")
        else:
            w, p = _window("l.ts", since, until)
            top = self.q("SELECT c.expert_id, count(*), avg(c.confidence) FROM query_log l "
                         f"JOIN query_choices c ON c.query_id = l.id AND c.rank = 0 WHERE {w} GROUP BY c.expert_id", p)
            sel = self.q("SELECT c.expert_id, count(DISTINCT c.query_id) FROM query_log l "
                         f"JOIN query_choices c ON c.query_id = l.id WHERE {w} GROUP BY c.expert_id", p)
        for eid, n, conf in top:
            out[eid] = {"top": n, "mean_confidence": conf, "selected": 0}
        for eid, n in sel:
            out.setdefault(eid, {"top": 0, "mean_confidence": None, "selected": 0})["selected"] = n
        return out

    def latency_percentiles(self, since: Optional[float], until: Optional[float],
                            ps: Sequence[float] = (0.5, 0.95)) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        """Nearest-rank latency percentiles: overall and per top-ranked expert id.

        Returns ``({"p50": ms, ...}, {expert_id: {"p50": ms, ...}})``; computed with window
        functions in SQL (one sort of the window's latencies).
        """
        w, p = _window("l.ts", since, until)
        picks = ", ".join(
            f"max(CASE WHEN rn = CAST({q!r} * (n - 1) AS INTEGER) + 1 THEN x END)" for q in ps)
        names = [f"p{int(round(q * 100))}" for q in ps]
        row = self.q1(
            f"SELECT {picks} FROM (SELECT l.latency_ms x, row_number() OVER (ORDER BY l.latency_ms) rn, "
            f"count(*) OVER () n FROM query_log l WHERE {w})", p)
        overall = {k: v for k, v in zip(names, row or [None] * len(ps))}
        per: dict[int, dict[str, float]] = {}
        for r in self.q(
                f"SELECT e, {picks} FROM (SELECT c.expert_id e, l.latency_ms x, "
                "row_number() OVER (PARTITION BY c.expert_id ORDER BY l.latency_ms) rn, "
                "count(*) OVER (PARTITION BY c.expert_id) n FROM query_log l "
                f"JOIN query_choices c ON c.query_id = l.id AND c.rank = 0 WHERE {w}) GROUP BY e", p):
            per[r[0]] = dict(zip(names, r[1:]))
        return overall, per

    def load_over_time(self, since: Optional[float], until: Optional[float], start: float,
                       width: float) -> list[tuple[int, Optional[int], int]]:
        """``(bucket index, top expert id or None for abstentions, routes)`` with bucket
        ``floor((ts - start) / width)``."""
        w, p = _window("l.ts", since, until)
        return self.q(
            "SELECT CAST((l.ts - ?) / ? AS INTEGER) b, c.expert_id, count(*) FROM query_log l "
            f"LEFT JOIN query_choices c ON c.query_id = l.id AND c.rank = 0 WHERE {w} GROUP BY b, c.expert_id "
            "ORDER BY b", [float(start), float(width), *p])

    def feedback_by_expert(self, since: Optional[float], until: Optional[float]) -> dict[int, dict[str, float]]:
        """Per expert id: feedback events, good (reward > 0), bad (reward < 0), mean reward."""
        w, p = _window("ts", since, until)
        return {eid: {"events": n, "good": g, "bad": b, "mean_reward": m} for eid, n, g, b, m in self.q(
            "SELECT expert_id, count(*), sum(reward > 0), sum(reward < 0), avg(reward) FROM feedback "
            f"WHERE {w} GROUP BY expert_id", p)}

    def confused_pairs(self, ratio: float) -> list[tuple[int, int, int]]:
        """``(first expert id, second expert id, routes)`` where the second confidence of a logged
        route is at least ``ratio`` times the first (the router could hardly tell them apart)."""
        return self.q(
            "SELECT a.expert_id, b.expert_id, count(*) FROM query_choices a JOIN query_choices b "
            "ON b.query_id = a.query_id AND b.rank = 1 WHERE a.rank = 0 AND b.confidence >= ? * a.confidence "
            "GROUP BY a.expert_id, b.expert_id", (float(ratio),))
