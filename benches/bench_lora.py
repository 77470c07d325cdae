"""LoRA experts three ways, same queries in one run: per-request adapter switching on one llama-server
(the ``llama_server`` backend) vs one llama-server per adapter (the ``openai`` backend, one server per
expert with its adapter applied) vs llama-cpp-python in-process (the ``llama`` backend, one shared base
model, requests grouped per adapter).

Setup: ../shared/models/stories260K.gguf, ``--adapters`` LoRA adapters written here with ``gguf``
(tests/lora_helpers.py), ``--queries`` prompts asked of every adapter (adapters x queries requests),
temperature 0, ``--max-tokens`` at most. Every setup gets one thread per process (``-t 1`` /
``n_threads=1``; the one-server setup is also run with 2 threads) and the same requests through
moedb's runner (``run_batch``: one concurrent group per adapter for the servers, one sequential group
ordered per adapter in-process); one warm-up request per adapter is not timed. The llama-server binary
is the one scripts/build_llama_server.sh builds.

Reported per setup: completion tokens / wall time of the whole batch, p50 and p90 of the per-request
latency (one ``generate``, queueing in its group excluded), the batch's wall time, and memory: the
resident set (RSS) of the server process(es) for the servers, and for in-process the growth of this
Python process's RSS from loading the model and adapters and generating (the interpreter itself not
counted). The three setups run one after the other on the same machine, so a busy machine slows all.

    python benches/bench_lora.py [--adapters 4] [--queries 8] [--max-tokens 48]

Writes ``benches/out/bench_lora.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "benches" / "out"
SHARED = pathlib.Path(os.environ.get("MOEDB_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # lora_helpers: adapter files and llama-server processes

from lora_helpers import LlamaServer, llama_server_binary, rss_mb, write_lora  # noqa: E402
from moedb.generate import GenRequest, make_generator, validate_config  # noqa: E402
from moedb.generate.runner import plan_groups, run_batch  # noqa: E402

PROMPTS = ["Once upon a time, there was a little girl named Lily.", "Tom had a big red ball.",
           "The pirate ship sailed on the sea.", "One day, a little dog found a box.",
           "Mom and Sue baked a cake.", "The sun was warm and the birds sang.",
           "Ben wanted to fly like a bird.", "The cat sat on the mat and looked at the moon.",
           "Anna and her friend went to the park.", "There was a big tree in the garden."]


def measure(name: str, jobs: list, rss) -> dict:
    """Run ``jobs`` ((generator, request) pairs) through moedb's runner after one untimed warm-up request
    per generator; tokens/s, latency percentiles, wall time, memory (``rss()`` in MB) and the groups."""
    seen = {}
    for g, req in jobs:
        seen.setdefault(id(g), (g, req))
    for g, req in seen.values():
        g.generate(req)
    t0 = time.perf_counter()
    out = run_batch(jobs, parallel=True, max_workers=16)
    wall = time.perf_counter() - t0
    bad = [o for o in out if isinstance(o, Exception)]
    if bad:
        raise SystemExit(f"{name}: {len(bad)} requests failed, e.g. {bad[0]}")
    lat = sorted(o.seconds for o in out)
    tokens = sum(o.completion_tokens for o in out)
    return {"setup": name, "requests": len(out), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_ms": statistics.median(lat) * 1000, "p90_ms": lat[int(0.9 * (len(lat) - 1))] * 1000,
            "rss_mb": rss(), "groups": len(plan_groups(jobs)), "texts": [o.text for o in out]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    model = SHARED / "models" / "stories260K.gguf"
    if not model.exists():
        raise SystemExit(f"{model} not found (../shared is not part of the repository)")
    binary, why = llama_server_binary()
    if binary is None:
        raise SystemExit(why)
    queries = [PROMPTS[i % len(PROMPTS)] for i in range(args.queries)]
    common = {"max_tokens": args.max_tokens, "temperature": 0.0, "timeout": 120.0}
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_lora_"))
    loras = [str(tmp / f"expert{i}.gguf") for i in range(args.adapters)]
    for i, p in enumerate(loras):
        write_lora(str(model), p, seed=i + 1)
    names = [pathlib.Path(p).name for p in loras]

    def requests(gens: list) -> list:
        return [(gens[a], GenRequest(query=q, expert=f"expert{a}")) for q in queries for a in range(len(gens))]

    results = []
    # 1. one llama-server holding every adapter, the adapter chosen per request (1 thread, then 2: the
    #    servers of setup 2 have one thread each, as many threads in all as adapters)
    lora_args = [x for p in loras for x in ("--lora", p)] + ["--lora-init-without-apply"]
    for threads in (1, 2):
        with LlamaServer(binary, str(model), lora_args, parallel=args.adapters, ctx=1024 * args.adapters,
                         threads=threads) as srv:
            gens = [make_generator(validate_config({"backend": "llama_server", "server": srv.url, "lora": n,
                                                    "mode": "completion", **common})) for n in names]
            label = "one llama-server, per-request adapter" + (f", {threads} threads" if threads > 1 else "")
            results.append(measure(label, requests(gens), srv.rss_mb))
    # 2. one llama-server per adapter, each applying its adapter to every request
    servers = [LlamaServer(binary, str(model), ["--lora", p], parallel=1, ctx=1024) for p in loras]
    try:
        for s in servers:
            s.start()
        gens = [make_generator(validate_config({"backend": "openai", "base_url": s.url + "/v1", "mode": "completion",
                                                **common})) for s in servers]
        results.append(measure(f"{len(servers)} llama-servers, one per adapter", requests(gens),
                               lambda: sum(s.rss_mb() for s in servers)))
    finally:
        for s in servers:
            s.stop()
    # 3. llama-cpp-python in this process: one base model, adapters loaded once, requests grouped per adapter
    before = rss_mb(os.getpid())
    gens = [make_generator(validate_config({"backend": "llama", "model": str(model), "lora": p, "n_ctx": 1024,
                                            "n_threads": 1, "mode": "completion", **common})) for p in loras]
    results.append(measure("llama-cpp-python in-process, grouped", requests(gens),
                           lambda: rss_mb(os.getpid()) - before))

    same = [r["setup"] for r in results[1:] if r["texts"] != results[0]["texts"]]
    print(f"\n{args.adapters} adapters x {args.queries} queries = {results[0]['requests']} requests, "
          f"max_tokens {args.max_tokens}, temperature 0, stories260K, 1 thread per process unless said\n")
    head = (f"{'setup':48} {'tokens/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'wall s':>7} {'tokens':>7} {'groups':>6} "
            f"{'RSS MB':>7}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['setup']:48} {r['tokens_per_s']:9.0f} {r['p50_ms']:8.1f} {r['p90_ms']:8.1f} {r['wall_s']:7.2f} "
              f"{r['tokens']:7d} {r['groups']:6d} {r['rss_mb']:7.1f}")
    print("\nRSS: the server process(es); in-process: growth of this Python process (interpreter not counted).")
    print("same texts as per-request switching: " + ("yes, every setup" if not same else "NO for " + ", ".join(same)))
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "bench_lora.json", "w") as f:
        json.dump({"args": vars(args), "results": [{k: v for k, v in r.items() if k != "texts"} for r in results],
                   "same_texts": not same}, f, indent=2)


if __name__ == "__main__":
    main()
