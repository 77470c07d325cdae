"""The query log: one row per route (``query_log``) and its chosen experts (``query_choices``)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..vectors import F4
from .connection import Connection


class QueryLog:
    """Logged routes and the experts they chose."""

    def __init__(self, db: Connection):
        self.db = db

    def append(self, entries: Sequence[dict[str, Any]]) -> list[int]:
        """Append routes to the query log in one transaction; returns their query ids.

        Each entry: ``ts, query, query_vec (bytes|None), abstained, top_confidence, latency_ms,
        choices: [(expert_id, rank, score, confidence)]``.
        """
        ids = []
        with self.db.atomic():
            cur = self.db.conn.cursor()
            for e in entries:
                cur.execute(
                    "INSERT INTO query_log(ts, query, query_vec, abstained, top_confidence, latency_ms) "
                    "VALUES (?,?,?,?,?,?)",
                    (e["ts"], e["query"], e.get("query_vec"), int(e["abstained"]), e.get("top_confidence"),
                     e["latency_ms"]),
                )
                qid = self.db.conn.last_insert_rowid()
                ids.append(qid)
                if e["choices"]:
                    cur.executemany(
                        "INSERT INTO query_choices(query_id, expert_id, rank, score, confidence) VALUES (?,?,?,?,?)",
                        [(qid, eid, rank, score, conf) for eid, rank, score, conf in e["choices"]],
                    )
        return ids

    def count(self) -> int:
        return self.db.q1("SELECT count(*) FROM query_log")[0]

    def entry(self, query_id: int) -> Optional[dict[str, Any]]:
        row = self.db.q1("SELECT id, ts, query, query_vec, abstained, top_confidence, latency_ms FROM query_log "
                      "WHERE id=?", (query_id,))
        if row is None:
            return None
        qid, ts, query, qv, abst, topc, lat = row
        choices = self.db.q(
            "SELECT e.name, c.rank, c.score, c.confidence FROM query_choices c JOIN experts e ON e.id=c.expert_id "
            "WHERE c.query_id=? ORDER BY c.rank", (qid,))
        return {"id": qid, "ts": ts, "query": query,
                "query_vec": np.frombuffer(qv, dtype=F4) if qv else None, "abstained": bool(abst),
                "top_confidence": topc, "latency_ms": lat,
                "choices": [{"expert": n, "rank": r, "score": s, "confidence": c} for n, r, s, c in choices]}

    def queries(self, query_ids: Sequence[int]) -> dict[int, tuple[str, Optional[bytes]]]:
        """``{query_id: (query text, query_vec bytes or None)}`` for the ids present in the log."""
        rows = self.db.in_chunks("SELECT id, query, query_vec FROM query_log WHERE id IN ({marks})",
                                 [int(i) for i in query_ids])
        return {qid: (text, vec) for qid, text, vec in rows}
