"""Cold-start speed of ``moedb route`` (issue 3, "Shell speed"), side by side in one run.

Times, in fresh processes, round-robin so that machine load hits every command alike:

- ``moedb --db TMP route "..."`` with the default embedder (ONNX runtime of the bundled MiniLM),
- ``python -c "import sentence_transformers"`` (the baseline: target route <= 1/3 of it),
- ``moedb route`` forced onto sentence-transformers (``MOEDB_EMBEDDER=sentence-transformers``),
- ``moedb --db TMP list`` (the CLI floor: no embedding at all),

each the median of ``--runs`` runs after one warm-up run of ``moedb route`` that builds the ONNX
cache (a fresh ``MOEDB_CACHE``; its time is reported too). Then, in this process: embedding time per
query and per 1000 texts for ONNX vs sentence-transformers, and the largest cosine deviation between
them (1000 CLINC150 utterances when ../shared is present, else standard-library docstrings, plus long
texts that hit the 256 word-piece truncation). Finally the heavy modules ``moedb route`` imports.

    python benches/bench_cli.py [--runs 5] [--texts 1000]

Writes ``benches/out/bench_cli.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "benches" / "out"
sys.path.insert(0, str(ROOT / "benches"))

QUERY = "how do I rotate the signing keys of our JWT tokens?"
HEAVY = ("torch", "sentence_transformers", "transformers", "sklearn", "scipy", "matplotlib", "llama_cpp",
         "httpx", "mlx", "onnx")
EXPERTS = {
    "security": ["JWT tokens expire after one hour; rotate signing keys every month.",
                 "Use OAuth scopes to limit what a token can access.", "Passwords are hashed with argon2id."],
    "cooking": ["Simmer the tomato sauce for twenty minutes.", "Knead the dough until it is smooth and elastic.",
                "Season the soup with salt and pepper at the end."],
    "travel": ["The train from Paris to Lyon takes two hours.", "Book flights early for lower fares.",
               "Pack light for a weekend trip."],
    "billing": ["Invoices are sent on the first day of the month.", "Refunds take five business days.",
                "Update the card on file from the account page."],
}


def moedb_cmd() -> list[str]:
    """The installed console script next to this interpreter (not a pyenv shim), else ``-m moedb.cli``."""
    script = pathlib.Path(sys.executable).parent / "moedb"
    return [str(script)] if script.exists() else [sys.executable, "-m", "moedb.cli"]


def run(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return dt


def build_db(path: str) -> None:
    """A small file built in this process with an ONNX cache of its own (the CLI's stays empty)."""
    import moedb
    from moedb.embed import OnnxMiniLMEmbedder

    emb = OnnxMiniLMEmbedder(cache=tempfile.mkdtemp(prefix="moedb-bench-build-"))
    with moedb.connect(path, embedder=emb) as db:
        for name, docs in EXPERTS.items():
            db.add_expert(name, docs)
    shutil.rmtree(emb.cache, ignore_errors=True)


def bench_commands(db: str, cache: str, runs: int) -> dict:
    base = {**os.environ, "MOEDB_CACHE": cache, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    base.pop("MOEDB_EMBEDDER", None)
    route = moedb_cmd() + ["--db", db, "route", QUERY]
    cmds = {
        "moedb route (ONNX)": (route, base),
        "python -c 'import sentence_transformers'": ([sys.executable, "-c", "import sentence_transformers"], base),
        "moedb route (sentence-transformers)": (route, {**base, "MOEDB_EMBEDDER": "sentence-transformers"}),
        "moedb list (CLI floor, no embedding)": (moedb_cmd() + ["--db", db, "list"], base),
    }
    first = run(route, base)  # builds the ONNX cache
    for cmd, env in cmds.values():  # warm the page cache for every command once
        run(cmd, env)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(runs):
        for name, (cmd, env) in cmds.items():
            times[name].append(run(cmd, env))
    return {"first_route_s": first, "times": times}


def sample_texts(n: int) -> tuple[list[str], str]:
    try:
        from clinc import find_shared, load_clinc

        if find_shared() is not None:
            d = load_clinc()
            rng = np.random.default_rng(0)
            pool = d["test"]["texts"] + d["oos_test"]["texts"]
            return [pool[i] for i in rng.permutation(len(pool))[:n]], "CLINC150 test utterances"
    except ImportError:
        pass
    import inspect
    import collections
    import pathlib as pl

    docs = []
    for mod in (os, json, collections, pl, statistics, inspect, subprocess, shutil):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc:
                docs += [p.replace("\n", " ") for p in doc.split("\n\n") if len(p.split()) >= 3]
    docs = list(dict.fromkeys(docs))
    return (docs * (n // max(len(docs), 1) + 1))[:n], "standard-library docstring paragraphs"


def bench_embedding(n_texts: int) -> dict:
    from moedb.embed import OnnxMiniLMEmbedder, SentenceTransformerEmbedder

    texts, source = sample_texts(n_texts)
    long_texts = [" ".join(texts[i:i + 80]) for i in range(0, 400, 80)]  # > 256 word pieces each
    queries = texts[:30]
    out = {"texts_source": source, "n_texts": len(texts)}
    vecs = {}
    for name, emb in (("onnx", OnnxMiniLMEmbedder()), ("sentence-transformers", SentenceTransformerEmbedder())):
        t = time.perf_counter()
        emb.embed(["warm up"])
        out[f"{name}_load_s"] = time.perf_counter() - t
        per_q = []
        for q in queries:
            t = time.perf_counter()
            emb.embed([q])
            per_q.append(time.perf_counter() - t)
        t = time.perf_counter()
        v = emb.embed(texts)
        out[f"{name}_per_1000_s"] = (time.perf_counter() - t) * 1000 / len(texts)
        out[f"{name}_per_query_ms"] = statistics.median(per_q) * 1000
        vecs[name] = np.vstack([v, emb.embed(long_texts)])
    cos = np.sum(vecs["onnx"] * vecs["sentence-transformers"], axis=1)
    out["max_cosine_deviation"] = float(np.max(1.0 - cos))
    out["mean_cosine_deviation"] = float(np.mean(1.0 - cos))
    return out


def heavy_imports(db: str, cache: str) -> list[str]:
    env = {**os.environ, "MOEDB_CACHE": cache}
    env.pop("MOEDB_EMBEDDER", None)
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "moedb.cli", "--db", db, "route", QUERY],
                       capture_output=True, text=True, env=env)
    mods = {line.split("|")[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    return sorted(m for m in mods if m.split(".")[0] in HEAVY)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per command (median reported)")
    ap.add_argument("--texts", type=int, default=1000, help="texts for the embedding throughput")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="moedb-bench-cli-")
    try:
        db, cache = os.path.join(tmp, "bench.db"), os.path.join(tmp, "cache")
        build_db(db)
        cli = bench_commands(db, cache, max(args.runs, 1))
        heavy = heavy_imports(db, cache)
        os.environ["MOEDB_CACHE"] = cache
        emb = bench_embedding(args.texts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base_name = "python -c 'import sentence_transformers'"
    base = statistics.median(cli["times"][base_name])
    print(f"\ncold start, {args.runs} runs each (median; fresh process per run), command: {' '.join(moedb_cmd())}")
    print(f"{'command':44s} {'median s':>9s} {'min s':>7s} {'vs import ST':>13s}")
    for name, ts in cli["times"].items():
        med = statistics.median(ts)
        print(f"{name:44s} {med:9.3f} {min(ts):7.3f} {med / base:12.2f}x")
    ratio = statistics.median(cli["times"]["moedb route (ONNX)"]) / base
    print(f"first moedb route with an empty cache (builds the ONNX export): {cli['first_route_s']:.2f} s")
    print(f"target: moedb route <= 1/3 of the import -> ratio {ratio:.2f} "
          f"({'met' if ratio <= 1 / 3 else 'NOT met'})")
    print(f"heavy modules imported by `moedb route`: {', '.join(heavy) if heavy else 'none'}")

    print(f"\nembedding in-process ({emb['n_texts']} {emb['texts_source']})")
    print(f"{'':28s} {'ONNX':>10s} {'sent-trans':>11s} {'ratio':>7s}")
    for key, label, unit in (("load_s", "load + first call", "s"), ("per_query_ms", "per query (median)", "ms"),
                             ("per_1000_s", "per 1000 texts", "s")):
        a, b = emb[f"onnx_{key}"], emb[f"sentence-transformers_{key}"]
        print(f"{label + ' (' + unit + ')':28s} {a:10.3f} {b:11.3f} {a / b:6.2f}x")
    print(f"max cosine deviation ONNX vs sentence-transformers: {emb['max_cosine_deviation']:.2e} "
          f"(mean {emb['mean_cosine_deviation']:.2e}, signed: 1 - cos can dip below 0 by float rounding; "
          "requirement <= 1e-3)")

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_cli.json").write_text(json.dumps({"cli": cli, "ratio_route_vs_import": ratio,
                                                     "heavy_imports": heavy, "embedding": emb}, indent=2))


if __name__ == "__main__":
    main()
