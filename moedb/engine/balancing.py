"""Load balancing state of one file: the per-expert selection bias and load counters the router's
:class:`~moedb.routing.balance.Balancer` reads before a batch of routes and adds to after it."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..routing.balance import Balancer, load_figures
from ..store import Store
from .catalog import Catalog


class Balancing:
    """Reads and persists balancing state (``store.balance``) for the router's columns."""

    def __init__(self, store: Store, catalog: Catalog):
        self.store = store
        self.catalog = catalog

    def balancer(self, router) -> Balancer:
        s = self.catalog.settings
        rows = self.store.balance.rows()
        now = time.time()
        ws = now - float(s.capacity_window)
        bias = np.zeros(len(router.rows))
        used = np.zeros(len(router.rows), dtype=np.int64)
        for eid, (b, _, _, start, count) in rows.items():
            j = router.col.get(eid)
            if j is not None:
                bias[j] = b
                used[j] = count if start >= ws else 0
        return Balancer(bias, rate=float(s.balance_rate), max_bias=float(s.balance_max_bias),
                        margin=float(s.balance_margin), capacity=s.capacity, window_used=used,
                        means=router.means(), similarity=float(s.balance_similarity))

    def save(self, router, bal: Balancer) -> None:
        d = bal.delta_bias_
        touched = np.flatnonzero((d != 0) | (bal.load_ > 0) | (bal.expected_ > 0) | (bal.window_delta_ > 0))
        if not len(touched):
            return
        dw = bal.window_delta_  # every selection of this call counts against the capacity window
        now = time.time()
        self.store.balance.apply([(router.rows[j]["id"], d[j], bal.load_[j], bal.expected_[j], int(dw[j]))
                                  for j in touched], float(self.catalog.settings.balance_max_bias),
                                 now - float(self.catalog.settings.capacity_window), now)

    def stats(self) -> dict[str, Any]:
        """Load figures since the last reset: per expert ``{load, share, expected, bias}``, and ``cv``,
        ``max_over_mean`` of the load across routable experts."""
        self.catalog.refresh()
        rows = self.store.balance.rows()
        routable = self.catalog.answering()
        load = np.array([rows.get(r["id"], (0, 0))[1] for r in routable], dtype=np.float64)
        fig = load_figures(load)
        total = fig["total"] or 1.0
        fig["experts"] = {r["name"]: {"load": float(load[j]), "share": float(load[j] / total),
                                      "expected": float(rows.get(r["id"], (0, 0, 0))[2]),
                                      "bias": float(rows.get(r["id"], (0.0,))[0])}
                          for j, r in enumerate(routable)}
        return fig

    def reset(self, biases: bool = True) -> None:
        """Zero the load counters (and the selection biases unless ``biases=False``)."""
        self.store.balance.reset(biases)
