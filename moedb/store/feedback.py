"""Feedback events (keyed, so a job re-run adds nothing twice) and the history of retrain runs."""
from __future__ import annotations

import json
import time
from typing import Any, Optional, Sequence

import numpy as np

from .connection import Connection, matrix as _matrix


class FeedbackTable:
    """Feedback events: query (text and vector), expert, reward, time, holdout bucket."""

    def __init__(self, db: Connection):
        self.db = db

    def keys_present(self, keys: Sequence[str]) -> set[str]:
        """The subset of ``keys`` already stored as feedback event keys."""
        return {r[0] for r in self.db.in_chunks("SELECT event_key FROM feedback WHERE event_key IN ({marks})", keys)}

    def insert(self, rows: Sequence[tuple]) -> int:
        """Insert feedback rows in one transaction; returns how many were new.

        Each row: ``(event_key, query_id, query, query_vec <f4 bytes|None, expert_id, reward, ts,
        bucket, source)``. A key already present is left alone (``INSERT OR IGNORE``).
        """
        now = time.time()
        n = 0
        with self.db.atomic():
            if any(r[3] is not None for r in rows):
                self.db.check_embedder()
            for r in rows:
                self.db.conn.execute(
                    "INSERT OR IGNORE INTO feedback(event_key, query_id, query, query_vec, expert_id, reward, ts, "
                    "bucket, source, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)", (*r, now))
                n += self.db.conn.changes()
        return n

    def rows(self, heldout: Optional[bool], cut: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Usable feedback of live experts: ``(row ids (m,), vectors (m, d), expert ids (m,), rewards (m,))``.

        ``heldout=True`` keeps rows with ``bucket < cut``, ``False`` those with ``bucket >= cut``,
        ``None`` all of them.
        """
        cond = {True: "AND f.bucket < ?", False: "AND f.bucket >= ?", None: ""}[heldout]
        params = [cut] if heldout is not None else []
        rows = self.db.q(
            "SELECT f.id, f.query_vec, f.expert_id, f.reward FROM feedback f JOIN experts e ON e.id = f.expert_id "
            f"WHERE f.query_vec IS NOT NULL {cond} ORDER BY f.id", params)
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        vecs = _matrix([r[1] for r in rows])
        eids = np.fromiter((r[2] for r in rows), np.int64, len(rows))
        rewards = np.fromiter((r[3] for r in rows), np.float64, len(rows))
        return ids, vecs, eids, rewards

    def usable_count(self) -> int:
        """Feedback rows with a vector whose expert still exists (what the gate can learn from)."""
        return self.db.q1("SELECT count(*) FROM feedback f JOIN experts e ON e.id = f.expert_id "
                       "WHERE f.query_vec IS NOT NULL")[0]

    def count(self, since_id: int = 0) -> int:
        return self.db.q1("SELECT count(*) FROM feedback WHERE id > ?", (since_id,))[0]

    def max_id(self) -> int:
        return self.db.q1("SELECT coalesce(max(id), 0) FROM feedback")[0]

    def of_expert(self, expert_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Feedback of one expert that carries a vector: ``(row ids (m,), vectors (m, d))``."""
        rows = self.db.q("SELECT id, query_vec FROM feedback WHERE expert_id=? AND query_vec IS NOT NULL ORDER BY id",
                      (expert_id,))
        return np.fromiter((r[0] for r in rows), np.int64, len(rows)), _matrix([r[1] for r in rows])

    def set_expert(self, feedback_ids: Sequence[int], expert_id: int) -> None:
        with self.db.atomic():
            self.db.conn.executemany("UPDATE feedback SET expert_id=? WHERE id=?",
                                  [(expert_id, int(i)) for i in feedback_ids])

    def record_retrain(self, feedback_max: int, figures: dict[str, Any]) -> int:
        with self.db.atomic():
            self.db.conn.execute("INSERT INTO retrain_runs(ts, feedback_max, figures) VALUES (?,?,?)",
                              (time.time(), int(feedback_max), json.dumps(figures, sort_keys=True)))
            return self.db.conn.last_insert_rowid()

    def last_retrain(self) -> Optional[dict[str, Any]]:
        r = self.db.q1("SELECT id, ts, feedback_max, figures FROM retrain_runs ORDER BY id DESC LIMIT 1")
        if r is None:
            return None
        return {"id": r[0], "ts": r[1], "feedback_max": r[2], "figures": json.loads(r[3])}

    def id_of(self, key: str) -> Optional[int]:
        """The row id of the event with this key (``None`` if there is none)."""
        row = self.db.q1("SELECT id FROM feedback WHERE event_key=?", (key,))
        return row[0] if row else None

    def holdout_cut(self) -> int:
        """Events with ``bucket < cut`` are held out of training (set by the last retrain)."""
        return int((self.db.get_meta("lifecycle", {}) or {}).get("holdout_cut", 0))

    def set_holdout_cut(self, cut: int) -> None:
        with self.db.atomic():
            cur = self.db.get_meta("lifecycle", {}) or {}
            self.db.set_meta("lifecycle", {**cur, "holdout_cut": int(cut)})
