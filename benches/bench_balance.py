"""Load balancing on CLINC150 replicas: skewed traffic, load spread across replicas with and without balancing.

Every intent's train utterances are split at random into ``--replicas`` near-equivalent experts. Traffic
is drawn from the test split with a Zipf skew over queries (popular questions repeat), routed one batch
at a time through the query log as an application would. For each run we report, over intents, the
coefficient of variation (CV) and max/mean of the load across an intent's replicas, and the
intent-level accuracy (the chosen replica belongs to the right intent). Same embeddings, same run.

    python benches/bench_balance.py [--replicas 3] [--queries 6000]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_routing import LookupEmbedder  # noqa: E402
from clinc import OUT, add_replica_experts, embed_cached, find_shared, load_clinc, vector_table  # noqa: E402
from moedb.settings import DEFAULTS  # noqa: E402


def build(path, data, table, replicas, seed=0):
    import moedb

    fresh = not path.exists()
    db = moedb.connect(str(path), embedder=LookupEmbedder(table))
    if fresh:
        db.configure(gate_folds=2)
        add_replica_experts(db, data, replicas, seed)
    return db


def run(db, texts, labels, balance: bool, batch: int = 50):
    db.configure(balance=balance, min_confidence=0.0)
    db.reset_balance()
    chosen = []
    t = time.perf_counter()
    for s in range(0, len(texts), batch):
        for r in db.route_many(texts[s:s + batch], top_k=1, k=0):
            chosen.append(r.experts[0].name)
    secs = time.perf_counter() - t
    intent = [c.split("#")[0] for c in chosen]
    acc = float(np.mean([a == b for a, b in zip(intent, labels)]))
    loads: dict[str, dict[str, int]] = {}
    for c in chosen:
        n, r = c.split("#")
        loads.setdefault(n, {}).setdefault(r, 0)
        loads[n][r] += 1
    return chosen, acc, loads, secs


def spread(loads, replicas, min_traffic=30):
    """Traffic-weighted mean CV and max/mean across each intent's replicas (intents with enough traffic)."""
    cvs, mms, ws = [], [], []
    for n, d in loads.items():
        v = np.array([d.get(str(r), 0) for r in range(replicas)], dtype=float)
        if v.sum() < min_traffic:
            continue
        cvs.append(v.std() / v.mean())
        mms.append(v.max() / v.mean())
        ws.append(v.sum())
    ws = np.array(ws)
    return float(np.average(cvs, weights=ws)), float(np.average(mms, weights=ws)), len(ws)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--queries", type=int, default=6000)
    ap.add_argument("--zipf", type=float, default=1.1, help="skew exponent over test queries")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--split", default="test", choices=["val", "test"], help="where the traffic comes from "
                    "(choose balancing settings on val, report on test)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a balancing setting for the run with balancing, e.g. balance_max_bias=1.0")
    args = ap.parse_args()
    if find_shared() is None:
        print("skip: CLINC150 not found under ../shared/data/clinc150")
        return
    data = load_clinc()
    for s in ("train", args.split):
        data[s]["X"] = embed_cached(data[s]["texts"], f"clinc_{s}")
    table = vector_table(data, ("train", args.split))
    path = OUT / f"bench_balance_r{args.replicas}.db"
    if args.fresh and path.exists():
        path.unlink()
    t = time.perf_counter()
    db = build(path, data, table, args.replicas)
    db.route("warm up", log=False)
    fit_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    te = data[args.split]
    p = 1.0 / np.arange(1, len(te["texts"]) + 1) ** args.zipf
    order = rng.permutation(len(te["texts"]))
    pick = order[rng.choice(len(p), size=args.queries, p=p / p.sum())]
    texts = [te["texts"][i] for i in pick]
    labels = [te["labels"][i] for i in pick]
    extra = {k: json.loads(v) for k, v in (x.split("=", 1) for x in args.set)}
    db.configure(**{k: v for k, v in DEFAULTS.as_dict().items() if k.startswith("balance_")})
    res = {"split": args.split, "settings": extra, "replicas": args.replicas, "queries": args.queries, "distinct_queries": int(len(set(pick))),
           "zipf": args.zipf, "fit_or_load_s": fit_s}
    for tag, on in (("without balancing", False), ("with balancing", True)):
        if on and extra:
            db.configure(**extra)
        _, acc, loads, secs = run(db, texts, labels, on)
        cv, mm, n = spread(loads, args.replicas)
        res[tag] = {"intent_acc": acc, "replica_cv": cv, "replica_max_over_mean": mm, "intents": n,
                    "ms_per_query": 1000 * secs / len(texts)}
    st = db.balance_stats()
    res["bias_abs_max"] = max(abs(e["bias"]) for e in st["experts"].values())
    db.close()
    (OUT / f"bench_balance_{args.split}.json").write_text(json.dumps(res, indent=2))
    print(f"\nCLINC150, {args.replicas} replicas per intent ({150 * args.replicas} experts), {args.queries} queries "
          f"({res['distinct_queries']} distinct, Zipf {args.zipf}) from {args.split}, top_k=1, settings {extra or 'default'}")
    print(f"{'':<20} {'intent acc':>10} {'replica CV':>11} {'max/mean':>9} {'ms/query':>9}")
    for tag in ("without balancing", "with balancing"):
        r = res[tag]
        print(f"{tag:<20} {100 * r['intent_acc']:9.2f}% {r['replica_cv']:11.3f} {r['replica_max_over_mean']:9.2f}"
              f" {r['ms_per_query']:9.2f}")
    print(f"(CV and max/mean: traffic-weighted over the {res['with balancing']['intents']} intents with >= 30 queries;"
          f" max |bias| {res['bias_abs_max']:.2f})")


if __name__ == "__main__":
    main()
