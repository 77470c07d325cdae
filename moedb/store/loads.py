"""Load aggregates over the query log and feedback, for analytics; all run in SQL on covering indexes
(see 0003_lifecycle.sql)."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from .connection import Connection, window as _window


class LoadQueries:
    """Per-expert load, latency percentiles, feedback success and router confusion over a time window."""

    def __init__(self, db: Connection):
        self.db = db

    def summary(self, since: Optional[float], until: Optional[float]) -> dict[str, Any]:
        """Totals over the window: queries, abstentions, first and last time."""
        w, p = _window("ts", since, until)
        n, abst, t0, t1 = self.db.q1(
            f"SELECT count(*), coalesce(sum(abstained), 0), min(ts), max(ts) FROM query_log WHERE {w}", p)
        return {"queries": n, "abstained": abst, "first": t0, "last": t1}

    def selections(self, since: Optional[float], until: Optional[float]) -> dict[int, int]:
        """Per expert id: how many times routes chose it at any rank."""
        if since is None and until is None:
            return dict(self.db.q("SELECT expert_id, count(*) FROM query_choices GROUP BY expert_id"))
        w, p = _window("l.ts", since, until)
        return dict(self.db.q("SELECT c.expert_id, count(*) FROM query_log l CROSS JOIN query_choices c "
                           f"ON c.query_id = l.id WHERE {w} GROUP BY c.expert_id", p))

    def top_load(self, since: Optional[float], until: Optional[float], start: float,
                 width: float) -> list[tuple[int, int, int, float]]:
        """``(expert id, bucket, routes where it ranked first, sum of its confidence there)`` with
        bucket ``floor((ts - start) / width)``: one index-only pass over the window."""
        w, p = _window("l.ts", since, until)
        return self.db.q(
            "SELECT c.expert_id, CAST((l.ts - ?) / ? AS INTEGER) b, count(*), sum(c.confidence) "
            "FROM query_log l INDEXED BY query_log_ts_cover CROSS JOIN query_choices c "
            f"ON c.query_id = l.id AND c.rank = 0 WHERE {w} GROUP BY c.expert_id, b",
            [float(start), float(width), *p])

    def abstentions(self, since: Optional[float], until: Optional[float], start: float,
                              width: float) -> list[tuple[int, int]]:
        """``(bucket, abstained routes)`` over the window."""
        w, p = _window("ts", since, until)
        return self.db.q(f"SELECT CAST((ts - ?) / ? AS INTEGER) b, count(*) FROM query_log WHERE abstained = 1 AND {w} "
                      "GROUP BY b", [float(start), float(width), *p])

    def by_expert(self, since: Optional[float], until: Optional[float]) -> dict[int, dict[str, float]]:
        """Per expert id: ``top`` (routes where it ranked first), ``mean_confidence`` there."""
        if since is None and until is None:
            rows = self.db.q("SELECT expert_id, count(*), avg(confidence) FROM query_choices WHERE rank=0 "
                          "GROUP BY expert_id")
        else:
            w, p = _window("l.ts", since, until)
            rows = self.db.q("SELECT c.expert_id, count(*), avg(c.confidence) FROM query_log l CROSS JOIN query_choices c "
                          f"ON c.query_id = l.id AND c.rank = 0 WHERE {w} GROUP BY c.expert_id", p)
        return {eid: {"top": n, "mean_confidence": conf} for eid, n, conf in rows}

    def latency_percentiles(self, since: Optional[float], until: Optional[float], n: int,
                            ps: Sequence[float] = (0.5, 0.95),
                            res: int = 64) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        """Exact nearest-rank latency percentiles (the value at sorted position ``floor(p * (n - 1))``),
        overall and per top-ranked expert id; ``n`` is the number of routes in the window.

        Without a window the overall figures are walks of the latency index. Otherwise, and per
        expert, two passes that never sort the window: a histogram over log-latency brackets
        (``floor(ln(ms) * res)``, monotone in the latency) locates the bracket holding each rank,
        then only the rows of those brackets are read, through the latency index, to pick the
        exact value. Returns ``({"p50": ms, ...}, {expert_id: {"p50": ms, ...}})``.
        """
        names = [f"p{int(round(q * 100))}" for q in ps]
        w, p = _window("l.ts", since, until)
        bracket = (f"CASE WHEN l.latency_ms > 0 THEN CAST(floor(ln(l.latency_ms) * {int(res)}) AS INTEGER) "
                   "ELSE -1000000 END")
        # the log side in time order through its covering index: index-only (log rows carry query
        # vectors and are large) and the choices lookups arrive in query-id order
        log = "FROM query_log l INDEXED BY query_log_ts_cover"
        join = "CROSS JOIN query_choices c ON c.query_id = l.id AND c.rank = 0"
        hist: dict[Optional[int], list[tuple[int, int]]] = {}
        for eid, h, cnt in self.db.q(f"SELECT c.expert_id, {bracket} h, count(*) {log} {join} WHERE {w} "
                                  "GROUP BY c.expert_id, h", p):
            hist.setdefault(eid, []).append((h, cnt))
        overall: dict[str, Optional[float]] = {k: None for k in names}
        if n and not p:
            for name, q in zip(names, ps):
                overall[name] = self.db.q1("SELECT latency_ms FROM query_log ORDER BY latency_ms LIMIT 1 OFFSET ?",
                                        (int(q * (n - 1)),))[0]
        elif n:
            hist[None] = self.db.q(f"SELECT {bracket} h, count(*) {log} WHERE {w} GROUP BY h", p)
        want: dict[tuple[Optional[int], int], list[tuple[int, str]]] = {}   # (expert, bracket) -> [(rank, name)]
        for key, hs in hist.items():
            hs.sort()
            total = sum(c for _, c in hs)
            for name, q in zip(names, ps):
                k, seen = int(q * (total - 1)), 0
                for h, c in hs:
                    if k < seen + c:
                        want.setdefault((key, h), []).append((k - seen, name))
                        break
                    seen += c
        vals: dict[tuple[Optional[int], int], list[float]] = {k: [] for k in want}
        for part, keyed in ((f"{join}", True), ("", False)):
            brackets = sorted({h for (key, h) in want if (key is not None) == keyed})
            if not brackets:
                continue
            # the rows whose latency falls in a wanted bracket (ranges widened a hair; the bracket
            # expression itself decides membership), read through the latency index
            ranges: list[list[float]] = []
            for h in brackets:
                lo_, hi_ = (-math.inf, 0.0) if h == -1000000 else (math.exp(h / res) * (1 - 1e-9),
                                                                   math.exp((h + 1) / res) * (1 + 1e-9))
                if ranges and lo_ <= ranges[-1][1]:
                    ranges[-1][1] = max(ranges[-1][1], hi_)
                else:
                    ranges.append([lo_, hi_])
            cond = " OR ".join("(l.latency_ms >= ? AND l.latency_ms <= ?)" for _ in ranges)
            who = "c.expert_id" if keyed else "NULL"
            for eid, h, x in self.db.q(f"SELECT {who}, {bracket} h, l.latency_ms FROM query_log l {part} "
                                    f"WHERE ({cond}) AND {w}", [v for r in ranges for v in r] + p):
                if (eid, h) in vals:
                    vals[(eid, h)].append(x)
        per: dict[int, dict[str, float]] = {eid: {} for eid in hist if eid is not None}
        for (key, h), picks in want.items():
            xs = sorted(vals[(key, h)])
            for r, name in picks:
                (overall if key is None else per[key])[name] = xs[r]
        return overall, per

    def feedback(self, since: Optional[float], until: Optional[float]) -> dict[int, dict[str, float]]:
        """Per expert id: feedback events, good (reward > 0), bad (reward < 0), mean reward."""
        w, p = _window("ts", since, until)
        return {eid: {"events": n, "good": g, "bad": b, "mean_reward": m} for eid, n, g, b, m in self.db.q(
            "SELECT expert_id, count(*), sum(reward > 0), sum(reward < 0), avg(reward) FROM feedback "
            f"WHERE {w} GROUP BY expert_id", p)}

    def confused_pairs(self, ratio: float) -> list[tuple[int, int, int]]:
        """``(first expert id, second expert id, routes)`` where the second confidence of a logged
        route is at least ``ratio`` times the first (the router could hardly tell them apart)."""
        return self.db.q(
            "SELECT a.expert_id, b.expert_id, count(*) FROM query_choices a JOIN query_choices b "
            "ON b.query_id = a.query_id AND b.rank = 1 WHERE a.rank = 0 AND b.confidence >= ? * a.confidence "
            "GROUP BY a.expert_id, b.expert_id", (float(ratio),))
