"""A store at scale, side by side in one run: this moedb vs the version before the vector and text
indexes (the per-process NumPy copy of every touched expert), on the same file contents.

For each version, in fresh processes (so memory and first-route figures are each process's own):
1. build: E experts x N passages of clustered synthetic vectors (``VectorsOnly(384)``) with 30-word
   texts, one ``add_expert`` each (a script looping ``add_expert``), then ``warm_router()`` once (the gate
   fitted and stored at the end of the bulk build); store-only ingest rate and that fit's time;
2. first route in a fresh process (connect + the first ``route``), and the gate's state then;
3. 1,000 random routes (``top_k=2, k=10``, query vectors near a random expert): p50/p99, and the peak RSS
   of that process;
4. exhaustive ``search`` p50 over 20 queries, next to a NumPy scan of the same vectors held in memory;
5. file size.
Also the MiniLM embedding rate, to put the store's ingest cost in proportion.

Usage: python benches/bench_scale.py [--experts 1000] [--docs 1000] [--prev COMMIT] [--keep DIR]
(--prev: the earlier version to compare, default the commit before the indexes landed.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PREV = "acbf3fd"  # the last commit before issue 13 (vectors as blobs + a NumPy copy per process)

WORKER = textwrap.dedent(r'''
import json, os, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import moedb
mode, path, E, N, seed = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
DIM = 384
rng = np.random.default_rng(seed)
centers = rng.normal(size=(E, DIM)).astype(np.float32)
centers /= np.linalg.norm(centers, axis=1, keepdims=True)
vocab = [f"w{i}" for i in range(5000)]
out = {}
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def queries(n):
    e = rng.integers(0, E, n)
    q = centers[e] + 0.06 * rng.normal(size=(n, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)
if mode == "build":
    db = moedb.connect(path, embedder=moedb.VectorsOnly(DIM, name="synthetic"), log_queries=False)
    store_s = 0.0
    for e in range(E):
        v = centers[e] + 0.08 * rng.normal(size=(N, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        words = rng.choice(len(vocab), size=(N, 30))
        docs = [{"id": str(j), "text": " ".join(vocab[w] for w in row) + f" topic{e}"} for j, row in enumerate(words)]
        t = time.perf_counter()
        db.add_expert(f"e{e:04d}", docs, vectors=v)
        store_s += time.perf_counter() - t
    t = time.perf_counter()
    db.warm_router()  # the end of a bulk build: fit the gate once and store it (the CLI does this too)
    out = {"docs_per_s": E * N / store_s, "store_s": store_s, "fit_s": time.perf_counter() - t}
    db.close()
elif mode == "first":
    t = time.perf_counter()
    db = moedb.connect(path, embedder=moedb.VectorsOnly(DIM, name="synthetic"), log_queries=False)
    db.route(queries(1)[0], top_k=2, k=10)
    out = {"first_route_s": time.perf_counter() - t, "rss_mb": rss_mb()}
elif mode == "routes":
    db = moedb.connect(path, embedder=moedb.VectorsOnly(DIM, name="synthetic"), log_queries=False)
    db.route(queries(1)[0], top_k=2, k=10)
    lat = []
    for q in queries(1000):
        t = time.perf_counter()
        db.route(q, top_k=2, k=10)
        lat.append(time.perf_counter() - t)
    out = {"p50_ms": 1e3 * float(np.percentile(lat, 50)), "p99_ms": 1e3 * float(np.percentile(lat, 99)),
           "rss_mb": rss_mb()}
elif mode == "search":
    db = moedb.connect(path, embedder=moedb.VectorsOnly(DIM, name="synthetic"), log_queries=False)
    lat = []
    for q in queries(20):
        t = time.perf_counter()
        db.search(q, k=10)
        lat.append(time.perf_counter() - t)
    out = {"search_p50_ms": 1e3 * float(np.percentile(lat, 50)), "rss_mb": rss_mb()}
elif mode == "numpy":
    import apsw
    c = apsw.Connection(path)
    blobs = [r[0] for r in c.execute("SELECT embedding FROM documents ORDER BY id")]
    M = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), DIM)
    del blobs
    lat = []
    for q in queries(20):
        t = time.perf_counter()
        s = M @ q
        top = np.argpartition(-s, 10)[:10]
        top[np.argsort(-s[top])]
        lat.append(time.perf_counter() - t)
    out = {"search_p50_ms": 1e3 * float(np.percentile(lat, 50)), "rss_mb": rss_mb()}
elif mode == "embed":
    emb = moedb.embed.resolve(None)
    texts = [" ".join(rng.choice(["the", "router", "passage", "expert", "query", "retrieval", "store",
                                  "vector", "index", "answer"], 40)) for _ in range(512)]
    emb.embed(texts[:8])
    t = time.perf_counter()
    for s in range(0, len(texts), 64):
        emb.embed(texts[s:s + 64])
    out = {"embed_per_s": len(texts) / (time.perf_counter() - t)}
print(json.dumps(out))
''')


def run(code_dir: str, mode: str, path: str, E: int, N: int, seed: int = 0) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(WORKER)
    try:
        p = subprocess.run([sys.executable, f.name, code_dir, mode, path, str(E), str(N), str(seed)],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.unlink(f.name)
    if p.returncode != 0:
        raise SystemExit(f"{mode} failed ({code_dir}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=1000)
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--prev", default=PREV)
    ap.add_argument("--keep", help="folder for the files (default: a temporary one, removed)")
    a = ap.parse_args()
    tmp = a.keep or tempfile.mkdtemp(prefix="moedb-scale-")
    prev = os.path.join(tmp, "prev-code")
    if not os.path.isdir(prev):
        os.makedirs(prev)
        subprocess.run(f"git -C {ROOT} archive {a.prev} moedb | tar -x -C {prev}", shell=True, check=True)
    versions = {"this moedb": os.path.abspath(ROOT), f"before ({a.prev})": prev}
    res: dict[str, dict] = {}
    for label, code in versions.items():
        path = os.path.join(tmp, label.split()[0] + ".moedb")
        r: dict = {}
        if not os.path.exists(path):
            r.update(run(code, "build", path, a.experts, a.docs))
        r["first"] = run(code, "first", path, a.experts, a.docs, 1)
        r["routes"] = run(code, "routes", path, a.experts, a.docs, 2)
        r["search"] = run(code, "search", path, a.experts, a.docs, 3)
        r["size_mb"] = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s)) / 2**20
        res[label] = r
        print(label, json.dumps(r), flush=True)
    scan = run(versions["this moedb"], "numpy", os.path.join(tmp, "this.moedb"), a.experts, a.docs, 3)
    emb = run(versions["this moedb"], "embed", os.path.join(tmp, "none"), a.experts, a.docs)
    new, old = res["this moedb"], res[f"before ({a.prev})"]
    rows = [
        ("ingest, store only (docs/s)", lambda r: r.get("docs_per_s"), "{:,.0f}"),
        ("gate fit at the end of the build (s)", lambda r: r.get("fit_s"), "{:.1f}"),
        ("first route, fresh process (s)", lambda r: r["first"]["first_route_s"], "{:.2f}"),
        ("route+retrieve p50 (ms)", lambda r: r["routes"]["p50_ms"], "{:.2f}"),
        ("route+retrieve p99 (ms)", lambda r: r["routes"]["p99_ms"], "{:.2f}"),
        ("peak RSS, 1,000 routes (MB)", lambda r: r["routes"]["rss_mb"], "{:,.0f}"),
        ("exhaustive search p50 (ms)", lambda r: r["search"]["search_p50_ms"], "{:.1f}"),
        ("peak RSS, 20 searches (MB)", lambda r: r["search"]["rss_mb"], "{:,.0f}"),
        ("file size (MB)", lambda r: r["size_mb"], "{:,.0f}"),
    ]
    print(f"\n{a.experts:,} experts x {a.docs:,} passages ({a.experts * a.docs:,} vectors, d=384)\n")
    print(f"| | this moedb | before ({a.prev}) | ratio |\n| --- | --- | --- | --- |")
    for name, get, fmt in rows:
        x, y = get(new), get(old)
        ratio = f"x{x / y:.2f}" if x and y else ""
        print(f"| {name} | {fmt.format(x) if x is not None else 'n/a'} | "
              f"{fmt.format(y) if y is not None else 'n/a'} | {ratio} |")
    print(f"| NumPy scan of all vectors in memory, p50 (ms) / RSS (MB) | {scan['search_p50_ms']:.1f} / "
          f"{scan['rss_mb']:,.0f} | | |")
    if new.get("docs_per_s"):
        share = emb["embed_per_s"] / new["docs_per_s"]
        print(f"\nMiniLM embeds {emb['embed_per_s']:.0f} passages/s here: the store's ingest cost is "
              f"{100 * share:.1f}% of the embedding time.")


if __name__ == "__main__":
    main()
