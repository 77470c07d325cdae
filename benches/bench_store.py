"""Store and routing speed, side by side in one run.

1. Ingestion: real MiniLM embedding time vs store time (validation + SQLite writes) for the same passages.
2. Route latency (embedding excluded: queries are vectors) at 10 / 100 / 1,000 experts x 10k / 100k
   documents of synthetic clustered vectors, next to a plain NumPy exhaustive scan of the same vectors.

Usage: python benches/bench_store.py [--quick] [--queries N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import moedb  # noqa: E402

DIM = 384


def pct(xs, p):
    return float(np.percentile(np.asarray(xs), p))


def ingestion(n_passages: int) -> dict:
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "data")
    from moedb.ingest.chunk import iter_files, read_passages

    base = [p.text for f in iter_files([here]) for p in read_passages(f, 300)]
    texts = [f"{base[i % len(base)]} (variant {i})" for i in range(n_passages)]
    emb = moedb.embed.resolve(None)
    emb.embed(texts[:8])  # load the model outside the timing
    t0 = time.perf_counter()
    vecs = np.concatenate([emb.embed(texts[s:s + 256]) for s in range(0, len(texts), 256)])
    t_embed = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        db = moedb.connect(os.path.join(tmp, "ingest.db"), embedder=emb)
        db.add_expert("e")
        t0 = time.perf_counter()
        db.add_documents("e", texts, vectors=vecs)
        t_store = time.perf_counter() - t0
        db.close()
    return {"n": n_passages, "embedder": emb.name + f" ({getattr(emb, 'kind', 'sentence-transformers')})",
            "embed_s": t_embed, "store_s": t_store}


def build(path: str, n_experts: int, n_docs: int, rng) -> tuple[moedb.Database, np.ndarray, np.ndarray]:
    centers = rng.normal(size=(n_experts, DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = np.arange(n_docs) % n_experts
    docs = centers[labels] + 0.08 * rng.normal(size=(n_docs, DIM)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    db = moedb.connect(path, embedder=moedb.VectorsOnly(DIM, name="synthetic"), log_queries=False)
    for e in range(n_experts):
        idx = np.flatnonzero(labels == e)
        db.add_expert(f"e{e:04d}", [{"text": f"doc {i}", "id": str(i)} for i in idx], vectors=docs[idx])
    return db, docs, centers


def latency(n_experts: int, n_docs: int, n_queries: int, k: int, rng) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        db, docs, centers = build(os.path.join(tmp, "lat.db"), n_experts, n_docs, rng)
        build_s = time.perf_counter() - t0
        qi = rng.integers(0, n_docs, n_queries)
        Q = docs[qi] + 0.05 * rng.normal(size=(n_queries, DIM)).astype(np.float32)
        Q /= np.linalg.norm(Q, axis=1, keepdims=True)
        db.route(Q[0], top_k=2, k=k, min_confidence=0.0)  # warm caches (gate fit, doc matrices)
        route_ms, scan_ms, agree = [], [], 0
        for q in Q:
            t = time.perf_counter()
            r = db.route(q, top_k=2, k=k, min_confidence=0.0)
            route_ms.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            s = docs @ q
            top = np.argpartition(-s, k)[:k]
            top = top[np.argsort(-s[top])]
            scan_ms.append((time.perf_counter() - t) * 1e3)
            agree += len({h.id for h in r.hits} & {str(i) for i in top})
        logged = []
        db_log = moedb.connect(db.path, embedder=db.embedder, log_queries=True)
        for q in Q[: min(200, n_queries)]:
            t = time.perf_counter()
            db_log.route(q, top_k=2, k=k, min_confidence=0.0)
            logged.append((time.perf_counter() - t) * 1e3)
        db_log.close()
        db.close()
    return {"experts": n_experts, "docs": n_docs, "build_s": build_s,
            "route_p50": pct(route_ms, 50), "route_p99": pct(route_ms, 99),
            "route_log_p50": pct(logged, 50),
            "scan_p50": pct(scan_ms, 50), "scan_p99": pct(scan_ms, 99),
            "overlap": agree / (k * n_queries)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--passages", type=int, default=2000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)

    ing = ingestion(300 if args.quick else args.passages)
    print(f"\n## Ingestion of {ing['n']} passages (embedder {ing['embedder']})")
    print(f"{'stage':<28}{'seconds':>10}{'passages/s':>14}{'share':>9}")
    total = ing["embed_s"] + ing["store_s"]
    for label, s in (("embedding", ing["embed_s"]), ("store (validate + SQLite)", ing["store_s"])):
        print(f"{label:<28}{s:>10.2f}{ing['n'] / s:>14.0f}{s / total:>9.1%}")
    print(f"store time / embedding time = {ing['store_s'] / ing['embed_s']:.1%}")

    sizes = [(10, 10_000), (100, 10_000)] if args.quick else \
        [(10, 10_000), (100, 10_000), (1000, 10_000), (10, 100_000), (100, 100_000), (1000, 100_000)]
    print("\n## Route latency, embedding excluded (ms per query; k=10, top_k=2)")
    hdr = (f"{'experts':>8}{'docs':>9}{'route p50':>11}{'route p99':>11}{'+log p50':>10}"
           f"{'numpy scan p50':>16}{'scan p99':>10}{'route/scan':>12}{'hit overlap':>13}")
    print(hdr)
    for e, n in sizes:
        r = latency(e, n, args.queries, 10, rng)
        print(f"{r['experts']:>8}{r['docs']:>9}{r['route_p50']:>11.3f}{r['route_p99']:>11.3f}"
              f"{r['route_log_p50']:>10.3f}{r['scan_p50']:>16.3f}{r['scan_p99']:>10.3f}"
              f"{r['route_p50'] / r['scan_p50']:>12.2f}{r['overlap']:>13.1%}")
    print("\nroute = gate + retrieval inside the 2 chosen experts + fetching passages from SQLite;"
          " numpy scan = one matrix-vector product over all documents + top-k (no text fetched)."
          " 'hit overlap' = share of the scan's top-10 that routing also returned.")


if __name__ == "__main__":
    main()
