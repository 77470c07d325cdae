"""Routed retrieval on MTRAG, side by side in one run: exhaustive dense / BM25 / hybrid search, routed
(top_k 1 and 2) dense and hybrid, with and without the passage evidence, and FAISS IVF (nlist = the
number of experts) at a comparable scanned fraction; how many experts each selection rule keeps; and
conversations (context that helps and context that does not).

The 4 domains of ``../shared/data/mtrag_gold`` are experts (1,152 passages); the 377 queries with their
qrels are only scored, never fitted on (moedb fits its evidence weight on pseudo-queries of its own
passages). MiniLM vectors are computed once and cached under benches/out/.

    python benches/bench_retrieval.py
"""
from __future__ import annotations

import collections
import json
import math
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_routing import LookupEmbedder  # noqa: E402
from clinc import embed_cached, find_shared  # noqa: E402


def ndcg(ranked, rel, k=10):
    dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(sorted(rel.values(), reverse=True)[:k]))
    return dcg / idcg if idcg else 0.0


def recall(ranked, rel, k=10):
    pos = [d for d, r in rel.items() if r > 0]
    return len([d for d in ranked[:k] if rel.get(d, 0) > 0]) / max(1, len(pos))


def load(shared: pathlib.Path):
    d = shared / "data" / "mtrag_gold"
    corpus = [json.loads(line) for line in open(d / "corpus.jsonl", encoding="utf-8")]
    queries = [json.loads(line) for line in open(d / "queries.jsonl", encoding="utf-8")]
    qrels: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for line in list(open(d / "qrels" / "test.tsv", encoding="utf-8"))[1:]:
        q, c, s = line.strip().split("\t")
        qrels[q][c] = int(s)
    queries = [q for q in queries if q["_id"] in qrels]
    return corpus, queries, qrels


def earlier_turns(queries):
    """Per query, the texts of the earlier turns of its conversation that the set holds (oldest first)."""
    conv = collections.defaultdict(list)
    for q in queries:
        cid, turn = q["_id"].split("<::>")
        conv[cid].append((int(turn), q["text"]))
    out = {}
    for q in queries:
        cid, turn = q["_id"].split("<::>")
        out[q["_id"]] = [t for n, t in sorted(conv[cid]) if n < int(turn)]
    return out


def main() -> None:
    shared = find_shared()
    if shared is None or not (shared / "data" / "mtrag_gold").is_dir():
        raise SystemExit("../shared/data/mtrag_gold not found")
    import moedb

    corpus, queries, qrels = load(shared)
    cv = embed_cached([c["text"] for c in corpus], "mtrag_corpus")
    qv = embed_cached([q["text"] for q in queries], "mtrag_queries")
    table = {c["text"]: v for c, v in zip(corpus, cv)}
    table.update({q["text"]: v for q, v in zip(queries, qv)})
    domains = sorted({c["domain"] for c in corpus})
    size = collections.Counter(c["domain"] for c in corpus)
    N = len(corpus)
    tmp = tempfile.mkdtemp(prefix="moedb-retrieval-")
    db = moedb.connect(f"{tmp}/mtrag.moedb", embedder=LookupEmbedder(table), log_queries=False)
    t0 = time.perf_counter()
    for dom in domains:
        idx = [i for i, c in enumerate(corpus) if c["domain"] == dom]
        db.add_expert(dom, [{"id": corpus[i]["_id"], "text": corpus[i]["text"]} for i in idx], vectors=cv[idx])
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    figures = db.warm_router()
    fit_s = time.perf_counter() - t0
    rows: list[tuple] = []

    def score(name, run, scanned):
        t = time.perf_counter()
        n = r = 0.0
        for q in queries:
            ranked = run(q)
            n += ndcg(ranked, qrels[q["_id"]])
            r += recall(ranked, qrels[q["_id"]])
        ms = 1e3 * (time.perf_counter() - t) / len(queries)
        rows.append((name, n / len(queries), r / len(queries), scanned, ms))

    for mode in ("dense", "lexical", "hybrid"):
        score(f"exhaustive {mode}", lambda q, m=mode: [h.id for h in db.search(q["text"], k=10, retrieval=m)], 1.0)
    top1 = {}
    for evidence in (False, True):
        db.configure(passage_evidence=evidence)
        tag = "gate + passage evidence" if evidence else "gate alone"
        rs = {q["_id"]: db.route(q["text"], top_k=1, k=0, min_confidence=0.0) for q in queries}
        top1[tag] = float(np.mean([rs[q["_id"]].experts[0].name == q["domain"] for q in queries]))
        for top_k in (1, 2):
            for mode in ("dense", "hybrid"):
                scanned = []

                def run(q, top_k=top_k, mode=mode, scanned=scanned):
                    r = db.route(q["text"], top_k=top_k, k=10, min_confidence=0.0, retrieval=mode)
                    scanned.append(sum(size[e.name] for e in r.experts) / N)
                    return [h.id for h in r.hits]
                score(f"routed top_k={top_k} {mode} ({tag})", run, scanned)
                rows[-1] = rows[-1][:3] + (float(np.mean(scanned)),) + rows[-1][4:]
    # FAISS IVF with one list per expert, at one and two probes
    import faiss

    ids = [c["_id"] for c in corpus]
    quant = faiss.IndexFlatIP(cv.shape[1])
    ivf = faiss.IndexIVFFlat(quant, cv.shape[1], len(domains), faiss.METRIC_INNER_PRODUCT)
    ivf.train(cv)
    ivf.add(cv)
    list_sizes = np.array([ivf.invlists.list_size(i) for i in range(len(domains))])
    for probes in (1, 2):
        ivf.nprobe = probes
        _, lab = ivf.search(qv, 10)
        _, near = quant.search(qv, probes)
        scanned = float(np.mean(list_sizes[near].sum(axis=1) / N))
        pos = {q["_id"]: i for i, q in enumerate(queries)}
        score(f"FAISS IVF nlist={len(domains)} nprobe={probes}", lambda q: [ids[j] for j in lab[pos[q["_id"]]] if j >= 0],
              scanned)
    # the rule that decides how many of the top_k experts a route keeps (with the passage evidence; the rows
    # above keep every one, min_confidence=0.0)
    db.configure(passage_evidence=True)
    rules = {}
    for label, mc in (("a later expert at confidence >= 0.05", 0.05),
                      ("the default (calibrated abstention, drop rule)", None)):
        for mode in ("dense", "hybrid"):
            scanned, kept = [], []

            def run(q, mode=mode, mc=mc, scanned=scanned, kept=kept):
                r = db.route(q["text"], top_k=2, k=10, min_confidence=mc, retrieval=mode)
                scanned.append(sum(size[e.name] for e in r.experts) / N)
                kept.append(len(r.experts))
                return [h.id for h in r.hits]
            score(f"routed top_k=2 {mode}, {label}", run, scanned)
            rows[-1] = rows[-1][:3] + (float(np.mean(scanned)),) + rows[-1][4:]
            rules[rows[-1][0]] = collections.Counter(kept)
    # conversations: the set holds no earlier turn of any query's conversation (one turn per conversation).
    # Measured instead: the gain of context where the latest turn needs it (a generic follow-up asked after
    # the question, scored against the question's qrels) and its cost where it does not help (a question of
    # another conversation of the same domain, or of another domain, given as the earlier turn)
    prev = earlier_turns(queries)
    multi = [q for q in queries if prev[q["_id"]]]
    rng = np.random.default_rng(0)
    same = {q["_id"]: [o["text"] for o in queries if o["domain"] == q["domain"] and o is not q] for q in queries}
    other = {q["_id"]: [o["text"] for o in queries if o["domain"] != q["domain"]] for q in queries}
    follow = ["Can you tell me more about that?", "Why is that?", "What else should I know?",
              "And how does it work?", "Is that always the case?"]
    asked = {q["_id"]: follow[i % len(follow)] for i, q in enumerate(queries)}
    conv = {}
    for label, ctx in (("a follow-up alone", "follow"), ("a follow-up after the question", "question"),
                       ("no context", None), ("earlier turns in the set", prev),
                       ("another question of its domain", {k: [str(rng.choice(v))] for k, v in same.items()}),
                       ("a question of another domain", {k: [str(rng.choice(v))] for k, v in other.items()})):
        use = multi if label == "earlier turns in the set" else queries
        if label == "no context":  # the row measured above: route(q, top_k=2, k=10, min_confidence=0.0), hybrid
            conv[label] = (next(r[1] for r in rows if r[0] == "routed top_k=2 hybrid (gate + passage evidence)"),
                           len(use))
            continue
        n = 0.0
        for q in use:
            if isinstance(ctx, str):  # the follow-up is asked, with or without the question before it
                r = db.route(asked[q["_id"]], top_k=2, k=10, min_confidence=0.0,
                             context=[q["text"]] if ctx == "question" else None)
            else:
                r = db.route(q["text"], top_k=2, k=10, min_confidence=0.0, context=ctx[q["_id"]] if ctx else None)
            n += ndcg([h.id for h in r.hits], qrels[q["_id"]])
        conv[label] = (n / max(1, len(use)), len(use))

    ex = {r[0]: r for r in rows}
    print(f"MTRAG: {len(domains)} domains as experts, {N:,} passages, {len(queries)} queries; build {build_s:.1f} s, "
          f"gate + evidence fit {fit_s:.1f} s; evidence: {figures.get('evidence')}\n")
    print("| | nDCG@10 | recall@10 | passages scanned | recall vs exhaustive dense | ms/query |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = ex["exhaustive dense"][2]
    for name, n, r, s, ms in rows:
        print(f"| {name} | {n:.3f} | {r:.3f} | {s:.2f} | {r / base:.3f} | {ms:.1f} |")
    print("\n| top-1 expert = the query's domain | |\n| --- | --- |")
    for tag, acc in top1.items():
        print(f"| {tag} | {100 * acc:.1f}% |")
    print("\n| experts kept by the rule (top_k=2) | 0 (abstained) | 1 | 2 |\n| --- | --- | --- | --- |")
    for name, c in rules.items():
        print(f"| {name} | {c[0]} | {c[1]} | {c[2]} |")
    print("\n| conversation context, routed top_k=2 hybrid | queries | nDCG@10 |\n| --- | --- | --- |")
    for label, (v, m) in conv.items():
        print(f"| {label} | {m} | {v:.3f} |")


if __name__ == "__main__":
    main()
