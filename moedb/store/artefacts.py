"""Fitted routing artefacts (the gate, hnswlib indexes) stored as named blobs with a key and figures."""
from __future__ import annotations

import json
import time
from typing import Any, Optional

from .connection import Connection


class Artefacts:
    """Named artefacts (``routing_state``): ``(key, data bytes, figures dict)`` each, replaced atomically."""

    def __init__(self, db: Connection):
        self.db = db

    def get(self, name: str) -> Optional[tuple[str, bytes, dict[str, Any]]]:
        """``(key, data, figures)`` of a stored artefact, read in one statement, or ``None``."""
        row = self.db.q1("SELECT key, data, figures FROM routing_state WHERE name=?", (name,))
        if row is None:
            return None
        return row[0], bytes(row[1]), json.loads(row[2])

    def key(self, name: str) -> Optional[str]:
        row = self.db.q1("SELECT key FROM routing_state WHERE name=?", (name,))
        return row[0] if row else None

    def put(self, name: str, key: str, data: bytes, figures: Optional[dict] = None) -> None:
        """Replace an artefact atomically (one row, one transaction)."""
        with self.db.atomic():
            self.db.conn.execute(
                "INSERT INTO routing_state(name, key, data, figures, updated_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET key=excluded.key, data=excluded.data, figures=excluded.figures, "
                "updated_at=excluded.updated_at",
                (name, key, data, json.dumps(figures or {}, sort_keys=True), time.time()))

    def drop(self, prefix: str) -> int:
        """Delete artefacts whose name starts with ``prefix``; returns how many."""
        with self.db.atomic():
            n = self.db.q1("SELECT count(*) FROM routing_state WHERE substr(name, 1, ?) = ?", (len(prefix), prefix))[0]
            self.db.conn.execute("DELETE FROM routing_state WHERE substr(name, 1, ?) = ?", (len(prefix), prefix))
        return n

    def names(self) -> list[str]:
        return [r[0] for r in self.db.q("SELECT name FROM routing_state ORDER BY name")]
