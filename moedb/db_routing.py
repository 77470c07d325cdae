"""SQL of the routing area; mixed into :class:`moedb.db.Store` (all SQL stays in the store).

Tables (migration 0002): ``routing_state`` (fitted gate and hnswlib indexes, one row each) and
``routing_balance`` (per-expert selection bias, load counters, capacity window).
"""
from __future__ import annotations

import json
import time
from typing import Any, Optional, Sequence


class RoutingSQL:
    """Store methods for routing."""

    # ------------------------------------------------------------------ fitted artefacts
    def routing_get(self, name: str) -> Optional[tuple[str, bytes, dict[str, Any]]]:
        """``(key, data, figures)`` of a stored artefact, read in one statement, or ``None``."""
        row = self.q1("SELECT key, data, figures FROM routing_state WHERE name=?", (name,))
        if row is None:
            return None
        return row[0], bytes(row[1]), json.loads(row[2])

    def routing_key(self, name: str) -> Optional[str]:
        row = self.q1("SELECT key FROM routing_state WHERE name=?", (name,))
        return row[0] if row else None

    def routing_put(self, name: str, key: str, data: bytes, figures: Optional[dict] = None) -> None:
        """Replace an artefact atomically (one row, one transaction)."""
        with self.atomic():
            self.conn.execute(
                "INSERT INTO routing_state(name, key, data, figures, updated_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET key=excluded.key, data=excluded.data, figures=excluded.figures, "
                "updated_at=excluded.updated_at",
                (name, key, data, json.dumps(figures or {}, sort_keys=True), time.time()))

    def routing_drop(self, prefix: str) -> int:
        """Delete artefacts whose name starts with ``prefix``; returns how many."""
        with self.atomic():
            n = self.q1("SELECT count(*) FROM routing_state WHERE substr(name, 1, ?) = ?", (len(prefix), prefix))[0]
            self.conn.execute("DELETE FROM routing_state WHERE substr(name, 1, ?) = ?", (len(prefix), prefix))
        return n

    def routing_names(self) -> list[str]:
        return [r[0] for r in self.q("SELECT name FROM routing_state ORDER BY name")]

    # ------------------------------------------------------------------ load balancing
    def balance_rows(self) -> dict[int, tuple[float, float, float, float, int]]:
        """``{expert_id: (bias, load, expected, window_start, window_count)}``."""
        return {r[0]: tuple(r[1:]) for r in self.q(
            "SELECT expert_id, bias, load, expected, window_start, window_count FROM routing_balance")}

    def balance_apply(self, updates: Sequence[tuple[int, float, float, float, int]], max_bias: float,
                      window_start: float, now: float) -> None:
        """Add deltas ``(expert_id, d_bias, d_load, d_expected, d_window)`` in one transaction.

        The bias stays within ``[-max_bias, max_bias]``; a window counter older than ``window_start``
        restarts from the new selections. Increments commute, so concurrent routers do not lose updates.
        """
        with self.atomic():
            self.conn.executemany(
                "INSERT INTO routing_balance(expert_id, bias, load, expected, window_start, window_count, updated_at) "
                "SELECT :id, max(-:m, min(:m, :db)), :dl, :de, :now, :dw, :now WHERE EXISTS "
                "(SELECT 1 FROM experts WHERE id=:id) "
                "ON CONFLICT(expert_id) DO UPDATE SET bias=max(-:m, min(:m, bias + :db)), load=load + :dl, "
                "expected=expected + :de, "
                "window_count=CASE WHEN window_start < :ws THEN :dw ELSE window_count + :dw END, "
                "window_start=CASE WHEN window_start < :ws THEN :now ELSE window_start END, updated_at=:now",
                [{"id": int(i), "db": float(db), "dl": float(dl), "de": float(de), "dw": int(dw), "m": float(max_bias),
                  "ws": float(window_start), "now": float(now)} for i, db, dl, de, dw in updates])

    def balance_reset(self, biases: bool = True) -> None:
        """Zero the load counters (and the biases unless ``biases=False``)."""
        with self.atomic():
            if biases:
                self.conn.execute("DELETE FROM routing_balance")
            else:
                self.conn.execute("UPDATE routing_balance SET load=0, expected=0, window_count=0")

    # ------------------------------------------------------------------ training data
    def routing_documents(self, expert_ids: Sequence[int]
                          ) -> dict[int, tuple[list[int], list[str], bytes, list[int]]]:
        """``{expert_id: (rowids, texts, concatenated <f4 embeddings, tuned flags)}`` for fitting the gate."""
        out: dict[int, tuple[list[int], list[str], list[bytes], list[int]]] = {
            int(i): ([], [], [], []) for i in expert_ids}
        if not out:
            return {}
        ids = list(out)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for rid, eid, text, emb, tuned in self.q(
                    f"SELECT id, expert_id, text, embedding, tuned FROM documents WHERE expert_id IN ({marks}) "
                    "ORDER BY id", chunk):
                o = out[eid]
                o[0].append(rid)
                o[1].append(text)
                o[2].append(emb)
                o[3].append(tuned)
        return {i: (a, b, b"".join(c), t) for i, (a, b, c, t) in out.items()}
