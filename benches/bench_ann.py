"""hnswlib at scale: what moedb's approximate indexes find next to exact search, in one run.

Two files built from the cached CLINC150 MiniLM vectors (served by lookup, so no embedding is timed):

* **centroids** - 6,000 experts (every intent's train utterances dealt into 40 near-equivalent
  replicas): 6,000 centroids, over the ``ann_min_centroids`` default (4,000), so routing asks hnswlib
  for ``ann_candidates`` centroids and scores only their experts. Compared with the same file and
  ``ann_min_centroids`` raised past the count (every expert scored exactly): agreement of the chosen
  expert, intent-level accuracy of both, and p50 routing latency, timed in alternating blocks of 50 queries.
* **documents** - one expert holding the train, val and out-of-scope utterances (19,200), with
  ``ann_min_docs`` lowered to 10,000 so that its documents are searched with hnswlib (the search
  settings, ``ann_ef`` and the graph, stay at their defaults). Recall@10 of the passages ``route``
  returns against exhaustive search of the same vectors, for the 4,500 test utterances.

    python benches/bench_ann.py          # ~5 min on 2 cores the first time (files cached in benches/out/)
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_routing import LookupEmbedder  # noqa: E402
from clinc import OUT, add_replica_experts, clinc_embedded, find_shared, vector_table  # noqa: E402
from moedb.settings import DEFAULTS  # noqa: E402

REPLICAS = 40


def p50_blocks(db, key, va, vb, fn, items, block=50) -> tuple[float, float]:
    """p50 ms of ``fn`` with setting ``key`` = ``va`` and = ``vb``, alternating blocks of ``block`` items
    (both see the same machine noise; the setting changes, and its first route, are not timed)."""
    ta, tb = [], []
    for s in range(0, len(items), block):
        for v, ts in ((va, ta), (vb, tb)):
            db.configure(**{key: v})
            fn(items[s])
            for x in items[s:s + block]:
                t = time.perf_counter()
                fn(x)
                ts.append((time.perf_counter() - t) * 1000)
    db.configure(**{key: getattr(DEFAULTS, key)})
    return float(np.median(ta)), float(np.median(tb))


def with_and_without(db, key, threshold, fn):
    """``(fn() with hnswlib from ``threshold`` items, fn() with exact search)``: setting ``key`` is
    ``threshold``, then past any size; it is left at its default."""
    db.configure(**{key: threshold})
    a = fn()
    db.configure(**{key: 10**9})
    b = fn()
    db.configure(**{key: getattr(DEFAULTS, key)})
    return a, b


def centroid_file(data, table, res):
    import moedb

    path = OUT / "bench_ann_centroids.db"
    fresh = not path.exists()
    db = moedb.connect(str(path), embedder=LookupEmbedder(table), log_queries=False)
    if fresh:
        t = time.perf_counter()
        db.configure(gate_folds=0, gate_max_iter=40, balance=False)
        add_replica_experts(db, data, REPLICAS, seed=0)
        res["centroids_add_experts_s"] = time.perf_counter() - t  # 6,000 add_expert calls, one at a time
    return db


def document_file(data, table):
    import moedb

    path = OUT / "bench_ann_documents.db"
    fresh = not path.exists()
    db = moedb.connect(str(path), embedder=LookupEmbedder(table), log_queries=False)
    if fresh:
        docs, vecs = [], []
        for s in ("train", "val", "oos_train", "oos_val", "oos_test"):
            docs += [{"text": t, "id": f"{s}:{i}"} for i, t in enumerate(data[s]["texts"])]
            vecs.append(data[s]["X"])
        db.add_expert("everything", docs, vectors=np.concatenate(vecs))
    db.configure(ann_min_docs=10_000)
    return db


def main() -> None:
    if find_shared() is None:
        print("skip: CLINC150 not found under ../shared/data/clinc150")
        return
    data = clinc_embedded()
    table = vector_table(data)
    te = data["test"]
    OUT.mkdir(parents=True, exist_ok=True)
    res: dict = {}

    # ---- centroids of 6,000 experts
    t = time.perf_counter()
    db = centroid_file(data, table, res)
    db.configure(ann_min_centroids=DEFAULTS.ann_min_centroids)  # whatever an interrupted run left
    db.route("warm up", log=False)
    res["centroids_fit_or_load_s"] = time.perf_counter() - t
    n_centroids = db.router_figures()["centroids"]
    default_min = db.settings()["ann_min_centroids"]

    def routes(texts):
        return [[e.name for e in r.experts] for r in db.route_many(texts, top_k=2, k=0, log=False,
                                                                   min_confidence=0.0)]

    ann, exact = with_and_without(db, "ann_min_centroids", DEFAULTS.ann_min_centroids, lambda: routes(te["texts"]))
    intent = lambda name: name.split("#")[0]  # noqa: E731
    lab = te["labels"]

    def acc(rs):
        return float(np.mean([bool(r) and intent(r[0]) == y for r, y in zip(rs, lab)]))

    q = te["texts"][:400]

    p_ann, p_exact = p50_blocks(db, "ann_min_centroids", DEFAULTS.ann_min_centroids, 10**9,
                                lambda x: db.route(x, top_k=2, k=0, log=False), q)
    res["centroids"] = {
        "experts": len(db.experts()), "centroids": n_centroids, "ann_min_centroids": default_min,
        "ann_candidates": db.settings()["ann_candidates"], "ann_ef": db.settings()["ann_ef"],
        "top1_same_expert": float(np.mean([a[:1] == b[:1] for a, b in zip(ann, exact)])),
        "top2_same_set": float(np.mean([set(a) == set(b) for a, b in zip(ann, exact)])),
        "intent_acc_ann": acc(ann), "intent_acc_exact": acc(exact),
        "p50_ms_ann": p_ann, "p50_ms_exact": p_exact}
    db.close()

    # ---- documents inside one large expert
    t = time.perf_counter()
    dbd = document_file(data, table)
    dbd.route("warm up", log=False, k=10)
    res["documents_build_or_load_s"] = time.perf_counter() - t

    def hits(texts):
        return [[h.id for h in r.hits] for r in dbd.route_many(texts, top_k=1, k=10, log=False,
                                                               min_confidence=0.0)]

    approx, full = with_and_without(dbd, "ann_min_docs", 10_000, lambda: hits(te["texts"]))
    # the exhaustive baseline computed independently of route(): every document's cosine
    X = np.concatenate([data[s]["X"] for s in ("train", "val", "oos_train", "oos_val", "oos_test")])
    ids = [f"{s}:{i}" for s in ("train", "val", "oos_train", "oos_val", "oos_test") for i in range(len(data[s]["texts"]))]
    S = te["X"] @ X.T
    brute = [[ids[j] for j in np.argsort(-row, kind="stable")[:10]] for row in S]
    recall = lambda a, b: float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b)]))  # noqa: E731

    p_ann_d, p_exact_d = p50_blocks(dbd, "ann_min_docs", 10_000, 10**9,
                                    lambda x: dbd.route(x, top_k=1, k=10, log=False), q)
    res["documents"] = {"documents": int(len(X)), "ann_ef": dbd.settings()["ann_ef"], "k": 10,
                        "recall_at_10_ann_vs_brute_force": recall(approx, brute),
                        "recall_at_10_exact_path_vs_brute_force": recall(full, brute),
                        "p50_ms_ann": p_ann_d, "p50_ms_exact": p_exact_d}
    dbd.close()
    (OUT / "bench_ann.json").write_text(json.dumps(res, indent=2))

    c, d = res["centroids"], res["documents"]
    print(f"\nhnswlib vs exact, CLINC150 MiniLM vectors, one run (latency: p50, timed in alternating blocks)")
    print(f"centroids: {c['experts']} experts, {c['centroids']} centroids (hnswlib from {c['ann_min_centroids']}, "
          f"{c['ann_candidates']} candidates, ef {c['ann_ef']})")
    if "centroids_add_experts_s" in res:
        print(f"  (built now: {c['experts']} add_expert calls {res['centroids_add_experts_s']:.1f} s, gate fit, "
              f"index and first route {res['centroids_fit_or_load_s']:.1f} s in all)")
    print(f"  same top-1 expert {100 * c['top1_same_expert']:.1f}%   same top-2 set {100 * c['top2_same_set']:.1f}%   "
          f"intent accuracy {100 * c['intent_acc_ann']:.1f}% (hnswlib) vs {100 * c['intent_acc_exact']:.1f}% (exact)")
    print(f"  routing p50 {c['p50_ms_ann']:.3f} ms (hnswlib) vs {c['p50_ms_exact']:.3f} ms (exact): "
          f"x{c['p50_ms_exact'] / c['p50_ms_ann']:.2f}")
    print(f"documents: one expert of {d['documents']} documents, route(k=10), ef {d['ann_ef']}")
    print(f"  recall@10 vs brute force: hnswlib {d['recall_at_10_ann_vs_brute_force']:.4f}, exact path "
          f"{d['recall_at_10_exact_path_vs_brute_force']:.4f}")
    print(f"  route+retrieve p50 {d['p50_ms_ann']:.3f} ms (hnswlib) vs {d['p50_ms_exact']:.3f} ms (exact): "
          f"x{d['p50_ms_exact'] / d['p50_ms_ann']:.2f}")


if __name__ == "__main__":
    main()
