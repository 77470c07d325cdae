"""Passages sized for the embedder: retrieval quality of ways to cut long passages, side by side in one run.

On ``../shared/data/mtrag_gold`` (1,152 passages, 64% of them longer than MiniLM's 256 word pieces, 377
queries with qrels) each passage is cut into pieces, every piece is embedded with the real MiniLM, and a
passage scores as its best piece (max-sim); exhaustive dense search over all pieces, the passages ranked.

- ``whole (truncated)``: one vector per passage; MiniLM cuts it off after 256 word pieces (the baseline:
  what a passage over the limit gets today);
- ``chars 1000``: :func:`moedb.ingest.chunk.split_text` (the former default for files);
- ``tokens 256/32`` (the new default), ``tokens 128/16``: :func:`moedb.ingest.passages.split_passages`.

Columns: nDCG@10 and recall@10 over passages, pieces embedded, largest piece in word pieces, share of
pieces over 256 (cut off when embedded), chunking time. Usage: python benches/bench_chunking.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from moedb.embed import resolve  # noqa: E402
from moedb.ingest.chunk import split_text  # noqa: E402
from moedb.ingest.passages import sizes_for, split_passages  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "mtrag_gold")


def load(quick: bool):
    corpus = [json.loads(x) for x in open(os.path.join(DATA, "corpus.jsonl"))]
    queries = {q["_id"]: q["text"] for q in map(json.loads, open(os.path.join(DATA, "queries.jsonl")))}
    qrels: dict[str, set[str]] = defaultdict(set)
    for line in list(open(os.path.join(DATA, "qrels", "test.tsv")))[1:]:
        q, d, s = line.rstrip("\n").split("\t")
        if int(s) > 0:
            qrels[q].add(d)
    qids = sorted(q for q in qrels if q in queries)
    if quick:
        qids = qids[:100]
    return corpus, [queries[q] for q in qids], [qrels[q] for q in qids]


def evaluate(emb, corpus, qvecs, rels, pieces_of) -> dict:
    t0 = time.perf_counter()
    owner, texts = [], []
    for i, d in enumerate(corpus):
        for p in pieces_of(d["text"]):
            owner.append(i)
            texts.append(p)
    t_chunk = time.perf_counter() - t0
    vecs = np.concatenate([emb.embed(texts[s:s + 128]) for s in range(0, len(texts), 128)])
    sims = qvecs @ vecs.T                                   # (queries, pieces)
    best = np.full((len(qvecs), len(corpus)), -np.inf, np.float32)
    np.maximum.at(best.T, np.asarray(owner), sims.T)        # max-sim per passage: (queries, passages)
    ids = [d["_id"] for d in corpus]
    ndcg, rec = [], []
    for row, rel in zip(best, rels):
        top = [ids[j] for j in np.argsort(-row, kind="stable")[:10]]
        gains = [1.0 / np.log2(r + 2) for r, d in enumerate(top) if d in rel]
        ideal = sum(1.0 / np.log2(r + 2) for r in range(min(len(rel), 10)))
        ndcg.append(sum(gains) / ideal)
        rec.append(sum(d in rel for d in top) / len(rel))
    n = np.asarray(emb.count_tokens(texts))
    return {"nDCG@10": float(np.mean(ndcg)), "recall@10": float(np.mean(rec)), "pieces": len(texts),
            "max tokens": int(n.max()), "over 256": float((n > 256).mean()), "chunking s": t_chunk}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="100 queries")
    args = ap.parse_args()
    if not os.path.isdir(DATA):
        sys.exit(f"skipped: {DATA} not found (../shared is not part of the repository)")
    emb = resolve(None)
    corpus, queries, rels = load(args.quick)
    qvecs = emb.embed(queries)
    s256 = sizes_for(emb.count_tokens, emb.max_tokens)
    s128 = sizes_for(emb.count_tokens, emb.max_tokens, chunk_tokens=128, overlap=16)
    ways = {"whole (truncated)": lambda t: [t],
            "chars 1000": lambda t: split_text(t, 1000),
            "tokens 256/32": lambda t: [c.text for c in split_passages(t, s256)],
            "tokens 128/16": lambda t: [c.text for c in split_passages(t, s128)]}
    print(f"{len(corpus)} passages, {len(queries)} queries (MTRAG gold), real MiniLM, exhaustive dense, max-sim\n")
    cols = ["nDCG@10", "recall@10", "pieces", "max tokens", "over 256", "chunking s"]
    print("| way | " + " | ".join(cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for name, way in ways.items():
        r = evaluate(emb, corpus, qvecs, rels, way)
        print(f"| {name} | {r['nDCG@10']:.3f} | {r['recall@10']:.3f} | {r['pieces']} | {r['max tokens']} | "
              f"{r['over 256']:.1%} | {r['chunking s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
