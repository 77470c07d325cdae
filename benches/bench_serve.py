"""``moedb serve`` under load (issue 17): ``POST /v1/route`` throughput and latency p50/p99 at 1, 8 and 32
concurrent clients, next to in-process ``Database.route()`` on the same file and queries, in one run.

The server is ``moedb serve`` in its own process on 127.0.0.1 (no API key; ``--readers`` connections);
the clients are this process, a bounded loop of ``--requests`` requests per row. One client: in
alternation, in-process ``route(q)`` (this process, the same file, logging on as in the server), then
``POST /v1/route`` with the same ``q``, then ``GET /v1/health`` (the HTTP floor), so that the machine's
load (2 cores shared with other jobs) hits the three alike; HTTP overhead = the median of the paired
differences HTTP - in-process. 8 and 32 clients: asyncio + httpx, one connection per client.
Targets: no error at 32 clients, overhead p50 under 3 ms.

The experts: CLINC150's ten domains (30 train utterances of each intent, 450 passages per expert) when
../shared is present, else three small built-in experts; queries: CLINC150 test utterances.

    python benches/bench_serve.py [--requests 400] [--readers 2]

Writes ``benches/out/bench_serve.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402

import moedb  # noqa: E402
from clinc import find_shared, load_clinc  # noqa: E402
from serverkit import EXPERTS, free_port  # noqa: E402

OUT = ROOT / "benches" / "out"


def build(path: str) -> tuple[list[str], str]:
    """The bench file and its queries; returns ``(queries, description)``."""
    with moedb.connect(path) as db:
        if find_shared() is not None:
            data = load_clinc()
            per: dict[str, list[str]] = {}
            seen: dict[str, int] = {}
            for text, intent in zip(data["train"]["texts"], data["train"]["labels"]):
                if seen.get(intent, 0) < 30:
                    seen[intent] = seen.get(intent, 0) + 1
                    per.setdefault(data["domain_of"][intent], []).append(text)
            for dom, texts in sorted(per.items()):
                db.add_expert(dom, texts)
            queries = data["test"]["texts"][::9][:300]
            what = f"CLINC150: {len(per)} domain experts, {sum(map(len, per.values()))} passages"
        else:
            for name, docs in EXPERTS.items():
                db.add_expert(name, docs)
            queries = [d for docs in EXPERTS.values() for d in docs]
            what = "three built-in experts, 12 passages (../shared absent)"
        db.warm_router()
    return queries, what


def figures(lat_ms: list[float], wall: float, errors: int) -> dict:
    a = np.asarray(lat_ms)
    return {"requests": len(lat_ms), "errors": errors, "per_s": len(lat_ms) / wall,
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


async def load(url: str, queries: list[str], clients: int, total: int, path: str = "/v1/route") -> dict:
    """``clients`` concurrent clients sending ``total`` requests in all (routes, or ``GET path``)."""
    lat: list[float] = []
    errors = 0
    counter = iter(range(total))

    async def client():
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            for i in counter:
                t0 = time.perf_counter()
                if path == "/v1/route":
                    r = await c.post(path, json={"query": queries[i % len(queries)], "top_k": 2, "k": 5})
                else:
                    r = await c.get(path)
                lat.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return figures(lat, time.perf_counter() - t0, errors)


def paired(url: str, path: str, queries: list[str], total: int) -> tuple[dict, dict, dict, dict, float]:
    """One client, in alternation: in-process ``route(q)``, then ``POST /v1/route`` with ``q``, then
    ``GET /v1/health`` (no work: the HTTP floor), so that the machine's load hits all three alike.
    Returns their figures, the server's own time of the routes (its ``Server-Timing`` header: from the
    request reaching the app to the response starting), and the median of the paired differences
    HTTP - in-process (ms)."""
    lat: dict[str, list[float]] = {"local": [], "http": [], "health": [], "app": []}
    wall = dict.fromkeys(lat, 0.0)
    errors = 0
    with moedb.connect(path) as db, httpx.Client(base_url=url, timeout=120) as c:
        db.warm_router()
        for q in queries[:20]:
            db.route(q)
            c.post("/v1/route", json={"query": q})
        for i in range(total):
            q = queries[i % len(queries)]
            t0 = time.perf_counter()
            db.route(q, top_k=2, k=5)
            t1 = time.perf_counter()
            r = c.post("/v1/route", json={"query": q, "top_k": 2, "k": 5})
            t2 = time.perf_counter()
            h = c.get("/v1/health")
            t3 = time.perf_counter()
            errors += (r.status_code != 200) + (h.status_code != 200)
            lat["app"].append(float(r.headers["server-timing"].split("dur=")[1]))  # the app's own time
            wall["app"] += lat["app"][-1] / 1000
            for key, dt in (("local", t1 - t0), ("http", t2 - t1), ("health", t3 - t2)):
                lat[key].append(dt * 1000)
                wall[key] += dt
    diff = float(np.median(np.subtract(lat["http"], lat["local"])))
    out = {k: figures(v, wall[k], 0) for k, v in lat.items()}
    out["http"]["errors"] = errors
    return out["local"], out["http"], out["health"], out["app"], diff


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    ap.add_argument("--readers", type=int, default=2, help="the server's --readers")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MOEDB_CACHE", str(pathlib.Path(tmp) / "cache"))
        path = str(pathlib.Path(tmp) / "bench.db")
        queries, what = build(path)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "moedb.cli", "--db", path, "serve", "--port", str(port),
                                 "--readers", str(args.readers), "--log-level", "warning"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            asyncio.run(load(url, queries, 4, 40))  # warm every reader
            local, http, health, app, overhead = paired(url, path, queries, args.requests)
            rows = {"in-process route(), 1 caller": local, "HTTP /v1/route, 1 client": http,
                    "  of which inside the server app (Server-Timing)": app,
                    "HTTP GET /v1/health, 1 client (no work: the HTTP floor)": health}
            for c in (8, 32):
                rows[f"HTTP /v1/route, {c} clients"] = asyncio.run(load(url, queries, c, args.requests))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"{what}; {len(queries)} distinct queries; server --readers {args.readers}; "
          f"{args.requests} requests per row; {os.cpu_count()} cores\n")
    print("| | requests/s | p50 ms | p99 ms | errors |\n| --- | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        rate = "" if "Server-Timing" in name else f"{r['per_s']:.1f}"
        print(f"| {name} | {rate} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |")
    print(f"\nHTTP overhead: median of paired (HTTP - in-process) latencies of the same query, one client: "
          f"{overhead:.2f} ms (target < 3 ms)")
    (OUT / "bench_serve.json").write_text(json.dumps({"data": what, "readers": args.readers, "rows": rows,
                                                      "overhead_p50_ms": overhead}, indent=2))


if __name__ == "__main__":
    main()
