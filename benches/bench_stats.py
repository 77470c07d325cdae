"""``db.stats()`` over a large synthetic query log, next to a pull-everything-into-NumPy baseline.

Builds (once, cached under benches/out/) a file with 150 experts and N logged routes (default one
million, top-2 choices each, so 2N choice rows) written in bulk through ``Store.log_routes``:
Zipf-like load, 5% abstentions, gamma latencies, timestamps over 30 days. Then times

- ``db.stats()`` on the whole log, on the last 7 days and on one day (SQL aggregation on covering
  indexes), against
- the baseline: fetch every (ts, latency, top expert, confidence) row into NumPy and aggregate there,

checks that both give the same per-expert counts and percentiles, and prints the query plans.

Usage: python benches/bench_stats.py [--rows 1000000] [--vectors] [--rebuild]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import moedb  # noqa: E402
from moedb.analytics.stats import imbalance  # noqa: E402

OUT = os.path.join(HERE, "out")
T0 = 1_700_000_000.0
DAYS = 30
E = 150


def build(path: str, rows: int, vectors: bool, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    db = moedb.connect(path, embedder=moedb.VectorsOnly(8, name="synthetic"))
    for e in range(E):
        db.add_expert(f"expert-{e:03d}", [f"d{e}-{j}" for j in range(3)], vectors=rng.normal(size=(3, 8)))
    ids = np.array([r["id"] for r in db.store.experts.rows()])
    p = 1.0 / np.arange(1, E + 1) ** 1.1
    p /= p.sum()
    t = time.perf_counter()
    chunk = 100_000
    for s in range(0, rows, chunk):
        n = min(chunk, rows - s)
        ts = np.sort(T0 + rng.uniform(0, DAYS * 86400, n))
        lat = rng.gamma(2.0, 2.5, n)
        abst = rng.random(n) < 0.05
        a = rng.choice(E, n, p=p)
        b = (a + 1 + rng.integers(0, E - 1, n)) % E
        conf = rng.uniform(0.3, 1.0, n)
        vec = rng.normal(size=(n, 384)).astype("<f4") if vectors else None
        entries = [{"ts": float(ts[i]), "query": f"synthetic query {s + i}",
                    "query_vec": vec[i].tobytes() if vectors else None, "abstained": bool(abst[i]),
                    "top_confidence": None if abst[i] else float(conf[i]), "latency_ms": float(lat[i]),
                    "choices": [] if abst[i] else [(int(ids[a[i]]), 0, 0.5, float(conf[i])),
                                                   (int(ids[b[i]]), 1, 0.2, float((1 - conf[i]) / 2))]}
                   for i in range(n)]
        db.store.log.append(entries)
    db.store.conn.execute("ANALYZE")
    print(f"built {rows} routes in {time.perf_counter() - t:.1f}s ({rows / (time.perf_counter() - t):.0f} routes/s)")
    db.close()


def baseline(db: moedb.Database, since=None, until=None) -> dict:
    """Fetch every row of the window into NumPy and aggregate there."""
    cond, params = [], []
    if since is not None:
        cond.append("l.ts >= ?")
        params.append(since)
    if until is not None:
        cond.append("l.ts < ?")
        params.append(until)
    where = ("WHERE " + " AND ".join(cond)) if cond else ""
    rows = db.store.q("SELECT l.ts, l.latency_ms, l.abstained, c.expert_id, c.confidence FROM query_log l "
                      f"LEFT JOIN query_choices c ON c.query_id = l.id AND c.rank = 0 {where}", params)
    a = np.array([(r[0], r[1], r[2], r[3] if r[3] is not None else -1, r[4] if r[4] is not None else np.nan)
                  for r in rows], dtype=np.float64)
    lat, eid = a[:, 1], a[:, 3].astype(np.int64)
    per = {}
    for e in np.unique(eid[eid >= 0]):
        m = eid == e
        per[int(e)] = {"queries": int(m.sum()), "p50": float(np.percentile(lat[m], 50, method="lower")),
                       "p95": float(np.percentile(lat[m], 95, method="lower"))}
    counts = [v["queries"] for v in per.values()] + [0] * (E - len(per))     # every expert, idle ones too
    return {"queries": len(a), "p50": float(np.percentile(lat, 50, method="lower")), "per": per,
            "imbalance": imbalance(counts)}


def timed(f, *a, repeat=3, **kw):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = f(*a, **kw)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--vectors", action="store_true",
                    help="log a 384-d query vector per route, as moedb does by default (rows of ~1.6 KB)")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"bench_stats_{args.rows}{'_vec' if args.vectors else ''}.db")
    db = None
    if not args.rebuild and os.path.exists(path):
        try:
            db = moedb.connect(path, embedder=moedb.VectorsOnly(8, name="synthetic"))
            if db.store.log.count() != args.rows:
                db.close()
                db = None
        except moedb.MoedbError:
            db = None
    if db is None:
        build(path, args.rows, args.vectors)
        db = moedb.connect(path, embedder=moedb.VectorsOnly(8, name="synthetic"))
    names = {r["id"]: r["name"] for r in db.store.experts.rows()}
    end = T0 + DAYS * 86400
    windows = [("all 30 days", None, None), ("last 7 days", end - 7 * 86400, None),
               ("one day", end - 2 * 86400, end - 86400)]
    print(f"query log: {args.rows} routes, {db.store.q1('SELECT count(*) FROM query_choices')[0]} choice rows, "
          f"{E} experts, query vectors {'logged' if args.vectors else 'not logged'}, "
          f"file {os.path.getsize(path) / 1e6:.0f} MB")
    print(f"{'window':<14}{'rows':>10}{'stats() s':>11}{'numpy pull s':>14}{'ratio':>8}  same figures")
    res = []
    for label, lo, hi in windows:
        ts, s = timed(db.stats, since=lo, until=hi, repeat=2)
        tb, b = timed(baseline, db, lo, hi, repeat=1)
        by = {e["name"]: e for e in s["experts"] if e["queries"]}
        same = (s["queries"] == b["queries"] and s["latency_ms"]["p50"] == b["p50"]
                and all(by[names[e]]["queries"] == v["queries"] and by[names[e]]["latency_p95_ms"] == v["p95"]
                        and by[names[e]]["latency_p50_ms"] == v["p50"] for e, v in b["per"].items())
                and abs(s["imbalance"]["gini"] - b["imbalance"]["gini"]) < 1e-9)
        print(f"{label:<14}{s['queries']:>10}{ts:>11.2f}{tb:>14.2f}{tb / ts:>7.1f}x  {same}")
        res.append({"window": label, "rows": s["queries"], "stats_s": ts, "baseline_s": tb, "same": same})
    s = db.stats()
    imb = s["imbalance"]
    print(f"imbalance: CV {imb['cv']:.2f}, Gini {imb['gini']:.3f}, max/mean {imb['max_mean']:.1f}, "
          f"entropy {imb['entropy_bits']:.2f} bits; {len(s['load_over_time']['buckets'])} time buckets of "
          f"{s['load_over_time']['bucket_seconds']:g} s")
    print("query plans:")
    for sql in ["SELECT expert_id, count(*), avg(confidence) FROM query_choices WHERE rank=0 GROUP BY expert_id",
                "SELECT c.expert_id, count(*) FROM query_log l JOIN query_choices c ON c.query_id = l.id AND "
                "c.rank = 0 WHERE l.ts >= 1 AND l.ts < 2 GROUP BY c.expert_id"]:
        plan = "; ".join(r[3] for r in db.store.q("EXPLAIN QUERY PLAN " + sql))
        print(f"  {sql[:70]}...\n    -> {plan}")
    db.close()
    with open(os.path.join(OUT, f"bench_stats{'_vec' if args.vectors else ''}.json"), "w") as fh:
        json.dump({"rows": args.rows, "vectors": args.vectors, "results": res}, fh, indent=2)


if __name__ == "__main__":
    main()
