"""Load-balancing state per expert: selection bias, load counters and the capacity window."""
from __future__ import annotations

from typing import Sequence

from .connection import Connection


class BalanceTable:
    """Per expert (``routing_balance``): bias, load, expected load, window start and count."""

    def __init__(self, db: Connection):
        self.db = db

    def rows(self) -> dict[int, tuple[float, float, float, float, int]]:
        """``{expert_id: (bias, load, expected, window_start, window_count)}``."""
        return {r[0]: tuple(r[1:]) for r in self.db.q(
            "SELECT expert_id, bias, load, expected, window_start, window_count FROM routing_balance")}

    def apply(self, updates: Sequence[tuple[int, float, float, float, int]], max_bias: float,
                      window_start: float, now: float) -> None:
        """Add deltas ``(expert_id, d_bias, d_load, d_expected, d_window)`` in one transaction.

        The bias stays within ``[-max_bias, max_bias]``; a window counter older than ``window_start``
        restarts from the new selections. Increments commute, so concurrent routers do not lose updates.
        """
        with self.db.atomic():
            self.db.conn.executemany(
                "INSERT INTO routing_balance(expert_id, bias, load, expected, window_start, window_count, updated_at) "
                "SELECT :id, max(-:m, min(:m, :db)), :dl, :de, :now, :dw, :now WHERE EXISTS "
                "(SELECT 1 FROM experts WHERE id=:id) "
                "ON CONFLICT(expert_id) DO UPDATE SET bias=max(-:m, min(:m, bias + :db)), load=load + :dl, "
                "expected=expected + :de, "
                "window_count=CASE WHEN window_start < :ws THEN :dw ELSE window_count + :dw END, "
                "window_start=CASE WHEN window_start < :ws THEN :now ELSE window_start END, updated_at=:now",
                [{"id": int(i), "db": float(db), "dl": float(dl), "de": float(de), "dw": int(dw), "m": float(max_bias),
                  "ws": float(window_start), "now": float(now)} for i, db, dl, de, dw in updates])

    def reset(self, biases: bool = True) -> None:
        """Zero the load counters (and the biases unless ``biases=False``)."""
        with self.db.atomic():
            if biases:
                self.db.conn.execute("DELETE FROM routing_balance")
            else:
                self.db.conn.execute("UPDATE routing_balance SET load=0, expected=0, window_count=0")
