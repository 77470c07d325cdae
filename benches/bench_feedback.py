"""Does feedback close the gap between a few-shot router and a fully trained one? (CLINC150)

1. 5-shot: one expert per intent (150) built from 5 train utterances each.
2. Users route the other train utterances (as vectors, logged); each route becomes feedback:
   +1 when the top expert is the utterance's intent, else -1 for that expert and +1 for the
   right intent. The events go through a JSONL file and ``db.ingest_feedback`` (the job users run),
   then ``db.retrain()``.
3. Full: a router whose experts hold all 100 train utterances per intent from the start.

Test accuracy (top-1, in-scope test split, never abstaining) of the three, side by side, and the
share of the 5-shot -> full gap that feedback closes (target >= 80%). Queries are given as their
MiniLM vectors (cached by benches/clinc.py), so the lexical signal sees no query text in any of the
three routers; load balancing is off so that only the gate decides.

Usage: python benches/bench_feedback.py [--shots 5] [--seed 0] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import moedb  # noqa: E402
from clinc import OUT, clinc_embedded, find_shared  # noqa: E402


def build(path: str, emb, intents: list[str], texts: list[str], labels: np.ndarray, X: np.ndarray,
          idx: np.ndarray) -> moedb.Database:
    """A database with one expert per intent holding the train utterances ``idx``."""
    db = moedb.connect(path, embedder=emb)
    db.configure(balance=False)
    for j, name in enumerate(intents):
        mine = idx[labels[idx] == j]
        db.add_expert(name, [{"id": str(i), "text": texts[i]} for i in mine], vectors=X[mine])
    return db


def accuracy(db: moedb.Database, X: np.ndarray, y: np.ndarray, intents: list[str]) -> float:
    pred = []
    for s in range(0, len(X), 1000):
        pred += [r.experts[0].name if r.experts else None
                 for r in db.route_many(list(X[s:s + 1000]), top_k=1, k=0, min_confidence=0.0, log=False)]
    return float(np.mean([p == intents[t] for p, t in zip(pred, y)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="use only this many feedback utterances")
    args = ap.parse_args()
    if find_shared() is None:
        print("skip: CLINC150 not found (../shared/data/clinc150)")
        return
    t_all = time.perf_counter()
    data = clinc_embedded()
    intents = data["intents"]
    pos = {n: i for i, n in enumerate(intents)}
    tr, te = data["train"], data["test"]
    ytr = np.array([pos[x] for x in tr["labels"]])
    yte = np.array([pos[x] for x in te["labels"]])
    rng = np.random.default_rng(args.seed)
    shot = np.concatenate([rng.permutation(np.flatnonzero(ytr == j))[:args.shots] for j in range(len(intents))])
    rest = np.setdiff1d(np.arange(len(ytr)), shot)
    rest = rng.permutation(rest)[:args.limit] if args.limit else rest
    emb = moedb.embed.resolve(None)
    out: dict = {"intents": len(intents), "shots": args.shots, "feedback_utterances": int(len(rest)),
                 "test": int(len(yte))}
    with tempfile.TemporaryDirectory() as tmp:
        # ---- few-shot router + feedback
        t0 = time.perf_counter()
        db = build(os.path.join(tmp, "few.db"), emb, intents, tr["texts"], ytr, tr["X"], shot)
        fit0 = db.refit_router()
        out["few_fit_s"] = time.perf_counter() - t0
        out["few_acc"] = accuracy(db, te["X"], yte, intents)
        events = os.path.join(tmp, "feedback.jsonl")
        t0 = time.perf_counter()
        n_events = right = 0
        with open(events, "w") as fh:
            for s in range(0, len(rest), 1000):
                part = rest[s:s + 1000]
                for i, r in zip(part, db.route_many(list(tr["X"][part]), top_k=1, k=0, min_confidence=0.0)):
                    top = r.experts[0].name
                    truth = intents[ytr[i]]
                    if top == truth:
                        right += 1
                        evs = [{"query_id": r.query_id, "expert": truth, "reward": 1}]
                    else:
                        evs = [{"query_id": r.query_id, "expert": top, "reward": -1},
                               {"query_id": r.query_id, "expert": truth, "reward": 1}]
                    for e in evs:
                        fh.write(json.dumps(e) + "\n")
                    n_events += len(evs)
        out["user_routes_s"] = time.perf_counter() - t0
        out["user_routes_right"] = right / len(rest)
        t0 = time.perf_counter()
        ing = db.ingest_feedback(events)
        out["ingest_s"] = time.perf_counter() - t0
        out["ingest"] = {k: ing[k] for k in ("lines", "taken", "skipped", "already_present", "transactions")}
        t0 = time.perf_counter()
        again = db.ingest_feedback(events)
        out["reingest_s"] = time.perf_counter() - t0
        out["reingest_taken"] = again["taken"]
        t0 = time.perf_counter()
        rep = db.retrain()
        out["retrain_s"] = time.perf_counter() - t0
        out["retrain"] = {"training_events": rep["training_events"], "heldout_events": rep["heldout_events"],
                          "heldout_before": rep["before"]["accuracy"], "heldout_after": rep["after"]["accuracy"],
                          "mix": rep["gate"].get("mix")}
        out["fed_acc"] = accuracy(db, te["X"], yte, intents)
        out["few_mix"] = fit0.get("mix")
        db.close()
        # ---- fully trained router
        t0 = time.perf_counter()
        full = build(os.path.join(tmp, "full.db"), emb, intents, tr["texts"], ytr, tr["X"], np.arange(len(ytr)))
        fitf = full.refit_router()
        out["full_fit_s"] = time.perf_counter() - t0
        out["full_acc"] = accuracy(full, te["X"], yte, intents)
        out["full_mix"] = fitf.get("mix")
        full.close()
    gap = out["full_acc"] - out["few_acc"]
    out["gap_closed"] = (out["fed_acc"] - out["few_acc"]) / gap if gap > 0 else None
    out["total_s"] = time.perf_counter() - t_all
    print(f"CLINC150, {len(intents)} intents, test n={len(yte)} (top-1 accuracy, never abstaining)")
    print(f"{'router':<34}{'docs/intent':>12}{'feedback':>10}{'test acc':>10}{'vs full':>9}")
    rows = [(f"{args.shots}-shot", args.shots, 0, out["few_acc"]),
            (f"{args.shots}-shot + feedback + retrain", args.shots, ing["taken"], out["fed_acc"]),
            ("full (all train utterances)", 100, 0, out["full_acc"])]
    for name, d, f, a in rows:
        print(f"{name:<34}{d:>12}{f:>10}{a:>10.4f}{a / out['full_acc']:>9.3f}")
    gc = out["gap_closed"]
    print(f"gap closed by feedback: {'n/a' if gc is None else f'{gc:.1%}'} (target >= 80%)")
    print(f"users' routes right before feedback: {out['user_routes_right']:.3f}; retrain on held-out feedback: "
          f"{out['retrain']['heldout_before']:.3f} -> {out['retrain']['heldout_after']:.3f} "
          f"({out['retrain']['heldout_events']} held out)")
    print(f"ingest {ing['lines']} events: {out['ingest_s']:.1f}s ({ing['lines'] / out['ingest_s']:.0f}/s), re-ingest "
          f"{out['reingest_s']:.1f}s adding {out['reingest_taken']}; retrain {out['retrain_s']:.1f}s; "
          f"fit few {out['few_fit_s']:.1f}s, full {out['full_fit_s']:.1f}s")
    print(f"gate mix weights: 5-shot {out['few_mix']}, after feedback {out['retrain']['mix']}, full {out['full_mix']}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_feedback.json").write_text(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
