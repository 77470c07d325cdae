"""Merge CLINC150's 150 intents into their 10 domains, then split every domain back automatically.

1. intents: one expert per intent holding its 100 train utterances (the ground-truth experts).
2. domains: ``merge`` the 15 intents of each domain into one expert named after the domain.
3. split: ``split`` every domain with ``n`` chosen by silhouette (k-means, scikit-learn); optionally
   again with the true ``n=15`` from a copy of the merged file, to separate choosing k from k-means.

Reports how well the recovered experts match the intents (adjusted Rand index, per domain and over
all train utterances), the chosen k per domain, and test routing accuracy (top-1, never abstaining;
queries as cached MiniLM vectors, load balancing off): intent accuracy maps each recovered expert to
the majority intent of its documents; domain accuracy asks whether the top expert lies in the right
domain. The merges and the splits each run in one transaction with one gate refit at the end (as
``optimize --apply`` does), instead of one refit per call.

Usage: python benches/bench_split.py [--no-true-n] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import moedb  # noqa: E402
from clinc import OUT, clinc_embedded, find_shared  # noqa: E402


def route_top(db: moedb.Database, X: np.ndarray) -> list:
    out = []
    for s in range(0, len(X), 1000):
        out += [r.experts[0].name if r.experts else None
                for r in db.route_many(list(X[s:s + 1000]), top_k=1, k=0, min_confidence=0.0, log=False)]
    return out


def evaluate(db, X, y_int, y_dom, domain_of_expert, intent_of_expert) -> dict:
    top = route_top(db, X)
    return {"intent_acc": float(np.mean([intent_of_expert.get(t) == i for t, i in zip(top, y_int)]))
            if intent_of_expert else None,
            "domain_acc": float(np.mean([domain_of_expert.get(t) == d for t, d in zip(top, y_dom)]))}


def split_all(db, domains, n, seed) -> tuple[dict, float]:
    t = time.perf_counter()
    res = {}
    with db.store.atomic():
        for dom in domains:
            res[dom] = db.evolution.split(dom, n, None, None, seed)
        db.refit_router()
    return res, time.perf_counter() - t


def recovered(db, domains, intent_of_doc) -> tuple[dict, dict, dict]:
    """Per child: majority intent and domain; per domain: (true intents, child labels) of its documents."""
    intent_of, domain_of, pairs = {}, {}, {}
    for dom in domains:
        t, p = [], []
        for e in db.experts():
            if e.parent != dom:
                continue
            ids = [d["id"] for d in db.documents(e.name)]
            ints = [intent_of_doc[int(i)] for i in ids]
            intent_of[e.name] = Counter(ints).most_common(1)[0][0]
            domain_of[e.name] = dom
            t += ints
            p += [e.name] * len(ints)
        pairs[dom] = (t, p)
    return intent_of, domain_of, pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-true-n", action="store_true", help="skip the reference split with n=15")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if find_shared() is None:
        print("skip: CLINC150 not found (../shared/data/clinc150)")
        return
    from sklearn.metrics import adjusted_rand_score

    data = clinc_embedded()
    tr, te = data["train"], data["test"]
    domains = data["domains"]
    dom_of = data["domain_of"]
    y_int, y_dom = te["labels"], [dom_of[i] for i in te["labels"]]
    emb = moedb.embed.resolve(None)
    out: dict = {"rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clinc.db")
        db = moedb.connect(path, embedder=emb)
        db.configure(balance=False)
        labels = np.array(tr["labels"])
        t = time.perf_counter()
        for intent in data["intents"]:
            idx = np.flatnonzero(labels == intent)
            db.add_expert(intent, [{"id": str(i), "text": tr["texts"][i]} for i in idx], vectors=tr["X"][idx])
        db.refit_router()
        out["build_s"] = time.perf_counter() - t
        ident = {i: i for i in data["intents"]}
        ev = evaluate(db, te["X"], y_int, y_dom, {i: dom_of[i] for i in data["intents"]}, ident)
        out["rows"].append({"router": "150 intents (truth)", "experts": 150, **ev})
        t = time.perf_counter()
        with db.store.atomic():
            for dom, ints in domains.items():
                db.evolution.merge(list(ints), dom, None)
            db.refit_router()
        out["merge_s"] = time.perf_counter() - t
        sizes = {e.name: e.size for e in db.experts()}
        assert sum(sizes.values()) == len(labels) and len(sizes) == len(domains), "merge lost documents"
        ev = evaluate(db, te["X"], y_int, y_dom, {d: d for d in domains}, {})
        out["rows"].append({"router": "10 domains (merged)", "experts": 10, **ev})
        db.close()
        variants = [("split, n by silhouette", None)] + ([] if args.no_true_n else [("split, true n=15", 15)])
        for label, n in variants:
            p2 = os.path.join(tmp, f"split_{n}.db")
            shutil.copy(path, p2)
            db = moedb.connect(p2, embedder=emb)
            res, secs = split_all(db, list(domains), n, args.seed)
            intent_of, domain_of, pairs = recovered(db, domains, tr["labels"])
            ari = {d: adjusted_rand_score(*pairs[d]) for d in domains}
            all_t = [x for d in domains for x in pairs[d][0]]
            all_p = [x for d in domains for x in pairs[d][1]]
            ev = evaluate(db, te["X"], y_int, y_dom, domain_of, intent_of)
            out["rows"].append({"router": label, "experts": len(intent_of), **ev,
                                "ari_mean": float(np.mean(list(ari.values()))),
                                "ari_all": float(adjusted_rand_score(all_t, all_p)),
                                "k": {d: res[d]["n"] for d in domains}, "ari": ari, "split_s": secs,
                                "intents_recovered": len(set(intent_of.values()))})
            db.close()
    print(f"CLINC150: 150 intents -> 10 domains -> automatic split; test n={len(y_int)} (top-1, never abstaining)")
    print(f"{'router':<26}{'experts':>8}{'intent acc':>12}{'domain acc':>12}{'ARI mean':>10}{'ARI all':>9}"
          f"{'intents hit':>12}{'time s':>8}")
    for r in out["rows"]:
        ari = f"{r['ari_mean']:>10.3f}{r['ari_all']:>9.3f}{r['intents_recovered']:>12}{r['split_s']:>8.0f}" \
            if "ari_mean" in r else f"{'':>10}{'':>9}{'':>12}{'':>8}"
        ia = "n/a" if r["intent_acc"] is None else f"{r['intent_acc']:.4f}"
        print(f"{r['router']:<26}{r['experts']:>8}{ia:>12}{r['domain_acc']:>12.4f}{ari}")
    for r in out["rows"]:
        if "k" in r:
            print(f"{r['router']}: k per domain " + ", ".join(f"{d} {k}" for d, k in r["k"].items()))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_split.json").write_text(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
