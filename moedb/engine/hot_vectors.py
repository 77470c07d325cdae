"""A bounded cache of hot experts' document vectors.

Retrieval inside an expert runs in SQL (sqlite-vec) unless the expert's vectors are in this cache,
where an exact NumPy scan is faster still. The cache holds at most ``budget`` bytes, evicts the least
recently used expert, and admits an expert on its second miss among the recent ones (a one-off touch,
such as a random route over a million passages, costs a k-nearest query in SQL, not a load of the
expert into memory). Entries are keyed by expert id and valid for one expert version.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np


class HotVectors:
    """``(rowids (n,) int64, unit vectors (n, d) float32)`` of hot experts, within ``budget`` bytes."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self._entries: OrderedDict[int, tuple[int, np.ndarray, np.ndarray]] = OrderedDict()
        self._missed: OrderedDict[int, None] = OrderedDict()
        self.bytes = 0

    def get(self, expert_id: int, version: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The cached vectors of this expert version, or ``None``."""
        e = self._entries.get(expert_id)
        if e is None or e[0] != version:
            return None
        self._entries.move_to_end(expert_id)
        return e[1], e[2]

    def admit(self, expert_id: int) -> bool:
        """Record a miss; ``True`` when this expert was missed recently too (worth loading)."""
        if expert_id in self._missed:
            del self._missed[expert_id]
            return True
        self._missed[expert_id] = None
        while len(self._missed) > 4096:
            self._missed.popitem(last=False)
        return False

    def put(self, expert_id: int, version: int, ids: np.ndarray, m: np.ndarray) -> None:
        """Cache an expert's vectors (nothing when they alone exceed the budget)."""
        self.drop(expert_id)
        size = ids.nbytes + m.nbytes
        if size > self.budget:
            return
        self._entries[expert_id] = (version, ids, m)
        self.bytes += size
        while self.bytes > self.budget:
            _, (_, i, v) = self._entries.popitem(last=False)
            self.bytes -= i.nbytes + v.nbytes

    def drop(self, expert_id: int) -> None:
        e = self._entries.pop(expert_id, None)
        if e is not None:
            self.bytes -= e[1].nbytes + e[2].nbytes

    def keep(self, live: dict[int, int]) -> None:
        """Drop entries whose expert is gone or at another version (``live``: ``{id: version}``)."""
        for i in [i for i, e in self._entries.items() if live.get(i) != e[0]]:
            self.drop(i)

    def clear(self) -> None:
        self._entries.clear()
        self._missed.clear()
        self.bytes = 0
