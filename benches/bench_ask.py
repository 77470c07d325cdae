"""End-to-end ``db.ask`` latency per strategy on the stories260K model (llama backend), side by side
with calling the backend directly in the same run.

Setup: three experts in a temporary database, all on ../shared/models/stories260K.gguf through
llama-cpp-python: two with their own LoRA adapter (written here with the ``gguf`` package, random
weights) and one on the bare base model. Every strategy answers the same queries (top_k=2, k=2).

Per strategy it reports the median per question of:

- ``route``: routing alone (``db.route(q, k=0)``: embed + gate + log),
- ``retr``: retrieval (``db.route(q, k=K)`` minus routing),
- ``gen``: moedb's generation stage, ``llama``: time inside llama.cpp's ``create_completion`` during
  it (instrumented), ``synth``: the strategy's own work (scoring, merging),
- ``total``: the whole ``ask``,
- ``direct``: the same llama.cpp calls (same prompts, adapters and adapter switches, parameters,
  cold KV cache), replayed directly on the backend right after, and ``ratio`` = total / direct (moedb's own overhead on top of the
  generations it needs; routing and retrieval included).

Then parallel against sequential wall time with two experts, once on one shared base model (requests
are grouped per model, so they run one after the other either way) and once on two separate model
instances (two workers, llama.cpp releases the GIL).

    python benches/bench_ask.py [--queries 6] [--max-tokens 32]

Writes ``benches/out/bench_ask.json``.
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

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "benches" / "out"
SHARED = pathlib.Path(os.environ.get("MOEDB_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUERIES = ["What did Lily play with in the park?", "Where did the pirate ship sail?",
           "Who baked a cake with mom?", "What did the captain find in the box?",
           "Why was the little dog happy?", "What did Tom see in the sky?",
           "Where did the girl find her ball?", "What did the pirates eat?"]
EXPERTS = {
    "kids": ["Lily liked to play with her red ball in the park.", "The little dog was happy to see Lily.",
             "The girl found her ball under a big tree."],
    "pirates": ["The pirate ship sailed on the big blue sea.", "The captain found a box of gold.",
                "The pirates ate fish and bread on the ship."],
    "home": ["Tom and his mom baked a cake.", "Tom saw a bird fly in the sky.", "The sun was warm and bright."],
}
STRATEGIES = ["concatenate", "weighted", "best_only", "llm_merge", "debate", "voting", "cascade", "best_of_n"]


def write_lora(base: str, out: str, seed: int, rank: int = 4, alpha: float = 8.0, std: float = 0.3) -> None:
    """A LoRA adapter GGUF for ``base``: lora_a (rank, n_in) / lora_b (n_out, rank) for attn_q, attn_v, ffn_up."""
    import gguf

    r = gguf.GGUFReader(base)
    w = gguf.GGUFWriter(out, "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    rng = np.random.default_rng(seed)
    for t in r.tensors:
        if t.name.endswith((".attn_q.weight", ".attn_v.weight", ".ffn_up.weight")):
            n_in, n_out = int(t.shape[0]), int(t.shape[1])
            w.add_tensor(t.name + ".lora_a", rng.normal(0, std, (rank, n_in)).astype(np.float32))
            w.add_tensor(t.name + ".lora_b", rng.normal(0, std, (n_out, rank)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class Recorder:
    """Wraps ``llama_cpp.Llama.create_completion`` to time every call and remember how to replay it."""

    def __init__(self):
        import llama_cpp

        self.cls = llama_cpp.Llama
        self.orig = self.cls.create_completion
        self.calls: list[tuple] = []
        rec = self

        def wrapped(llm, prompt, *a, **kw):
            from moedb.generate import llama as L

            shared = next(m for m in L._POOL.values() if m.llm is llm)
            t0 = time.perf_counter()
            out = rec.orig(llm, prompt, *a, **kw)
            rec.calls.append((shared, shared.active, prompt, a, kw, time.perf_counter() - t0))
            return out

        self.cls.create_completion = wrapped

    def take(self) -> list[tuple]:
        calls, self.calls = self.calls, []
        return calls

    @staticmethod
    def snapshot() -> list[tuple]:
        """The active adapter of every loaded model (restored before a replay: same switches)."""
        from moedb.generate import llama as L

        return [(m, m.active) for m in L._POOL.values()]

    def replay(self, calls: list[tuple], before: list[tuple]) -> float:
        """Run the same llama.cpp calls directly, from the same adapter state; returns seconds."""
        for shared, (lora, scale) in before:
            shared.activate(lora, scale)
        t0 = time.perf_counter()
        for shared, (lora, scale), prompt, a, kw, _ in calls:
            shared.activate(lora, scale)
            shared.llm.reset()  # no head start from the KV cache of the call being replayed
            kw = {k: v for k, v in kw.items() if k != "stopping_criteria"}
            self.orig(shared.llm, prompt, *a, **kw)
        return time.perf_counter() - t0


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    model = SHARED / "models" / "stories260K.gguf"
    if not model.exists():
        sys.exit(f"{model} not found (../shared is needed for this bench)")
    import llama_cpp  # noqa: F401  (fail early with a clear error when the extra is missing)

    import moedb
    from moedb.generate.llama import llama_stats, unload_all

    OUT.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-ask-", dir=OUT))
    loras = {"kids": str(tmp / "kids.gguf"), "pirates": str(tmp / "pirates.gguf")}
    write_lora(str(model), loras["kids"], 1)
    write_lora(str(model), loras["pirates"], 2)
    db = moedb.connect(str(tmp / "ask.db"))
    base_cfg = {"backend": "llama", "model": str(model), "n_ctx": 512, "max_tokens": args.max_tokens,
                "temperature": 0.0}
    for name, docs in EXPERTS.items():
        cfg = {**base_cfg, "lora": loras[name]} if name in loras else dict(base_cfg)
        db.add_expert(name, docs, generator=cfg)
    db.set_synthesizer(base_cfg)
    queries = (QUERIES * 4)[:args.queries]
    rec = Recorder()
    db.ask(queries[0], top_k=2, k=2)  # warm up: model load, embedder, caches
    rec.take()

    # round-robin: every question goes through every strategy in turn, so machine load hits all alike
    m = {st: {k: [] for k in ("route", "retr", "gen", "llama", "synth", "total", "direct", "calls")}
         for st in STRATEGIES}
    for i, q in enumerate(queries):
        order = STRATEGIES if i % 2 == 0 else STRATEGIES[::-1]
        for strategy in order:
            kw = {"rounds": 2} if strategy == "debate" else {}
            kw.update({"options": {"min_score": 0.5}} if strategy == "cascade" else {})
            t0 = time.perf_counter()
            db.route(q, top_k=2, k=0, log=False)
            t1 = time.perf_counter()
            db.route(q, top_k=2, k=4, log=False)
            t2 = time.perf_counter()
            mm = m[strategy]
            mm["route"].append((t1 - t0) * 1e3)
            mm["retr"].append(max((t2 - t1) - (t1 - t0), 0.0) * 1e3)
            before = rec.snapshot()
            t0 = time.perf_counter()
            a = db.ask(q, top_k=2, k=2, strategy=strategy, **kw)
            total = (time.perf_counter() - t0) * 1e3
            calls = rec.take()
            direct = rec.replay(calls, before) * 1e3
            mm["gen"].append(a.latency["generation_ms"])
            mm["synth"].append(a.latency["synthesis_ms"])
            mm["llama"].append(sum(c[-1] for c in calls) * 1e3)
            mm["total"].append(total)
            mm["direct"].append(direct)
            mm["calls"].append(len(calls))
    rows = []
    for strategy in STRATEGIES:
        row = {"strategy": strategy, **{k: med(v) for k, v in m[strategy].items()}}
        row["ratio"] = row["total"] / row["direct"] if row["direct"] > 0 else float("nan")
        rows.append(row)

    print(f"\nask latency per question, median of {len(queries)} questions (ms); stories260K, "
          f"max_tokens={args.max_tokens}, top_k=2, k=2")
    hdr = f"{'strategy':<12}{'calls':>6}{'route':>8}{'retr':>8}{'gen':>9}{'llama':>9}{'synth':>8}" \
          f"{'total':>9}{'direct':>9}{'ratio':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['strategy']:<12}{r['calls']:>6.0f}{r['route']:>8.1f}{r['retr']:>8.1f}{r['gen']:>9.1f}"
              f"{r['llama']:>9.1f}{r['synth']:>8.1f}{r['total']:>9.1f}{r['direct']:>9.1f}{r['ratio']:>7.2f}")

    # parallel vs sequential: shared base (grouped) and two separate model instances
    par_rows = []
    for label, separate in (("one shared base model", False), ("two model instances", True)):
        if separate:  # a different n_ctx makes a second, independent llama.cpp model in the pool
            db.set_generator("kids", {**base_cfg, "lora": loras["kids"], "n_ctx": 384})
        res = {"parallel": ([], []), "sequential": ([], [])}
        for i, q in enumerate(queries):
            for collab in (("parallel", "sequential") if i % 2 == 0 else ("sequential", "parallel")):
                t0 = time.perf_counter()
                a = db.ask(q, top_k=2, k=2, strategy="concatenate", collaboration=collab)
                res[collab][0].append((time.perf_counter() - t0) * 1e3)
                res[collab][1].append(a.usage["prompt_tokens"])
                rec.take()
        res = {c: (med(ts), med(toks)) for c, (ts, toks) in res.items()}
        par_rows.append({"setup": label, "parallel_ms": res["parallel"][0], "sequential_ms": res["sequential"][0],
                         "parallel_prompt_tokens": res["parallel"][1],
                         "sequential_prompt_tokens": res["sequential"][1],
                         "speedup": res["sequential"][0] / res["parallel"][0]})
    print("\nparallel vs sequential, concatenate with 2 experts, median wall time per question (ms)")
    print(f"{'setup':<24}{'parallel':>10}{'sequential':>12}{'seq/par':>9}{'prompt tok par/seq':>20}")
    for r in par_rows:
        print(f"{r['setup']:<24}{r['parallel_ms']:>10.1f}{r['sequential_ms']:>12.1f}{r['speedup']:>9.2f}"
              f"{r['parallel_prompt_tokens']:>12.0f}/{r['sequential_prompt_tokens']:<.0f}")
    stats = llama_stats()
    print("\nllama pool:", json.dumps({k.split('/')[-1]: {kk: v for kk, v in s.items() if kk != 'activations'}
                                       for k, s in stats.items()}))
    (OUT / "bench_ask.json").write_text(json.dumps({"strategies": rows, "parallel": par_rows,
                                                    "queries": len(queries), "max_tokens": args.max_tokens},
                                                   indent=2))
    db.close()
    unload_all()


if __name__ == "__main__":
    main()
