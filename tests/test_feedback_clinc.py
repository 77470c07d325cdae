"""Feedback changes later decisions of the real router, on a CLINC150 subset (needs ../shared)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import moedb


@pytest.mark.slow
@pytest.mark.shared
def test_retrain_fixes_routes_that_were_wrong_on_clinc(shared_dir, tmp_path, embedder):
    raw = json.loads((shared_dir / "data" / "clinc150" / "data_full.json").read_text())
    intents = sorted({lab for _, lab in raw["train"]})[::10][:15]        # 15 intents across domains
    rng = np.random.default_rng(0)
    shots, fb_texts, fb_y = {}, [], []
    for j, name in enumerate(intents):
        utts = [t for t, lab in raw["train"] if lab == name]
        utts = [utts[i] for i in rng.permutation(len(utts))]
        shots[name] = utts[:3]
        fb_texts += utts[3:33]
        fb_y += [j] * 30
    te = [(t, intents.index(lab)) for t, lab in raw["test"] if lab in intents]
    db = moedb.connect(str(tmp_path / "clinc.db"), embedder=embedder)
    db.configure(balance=False)
    for name in intents:
        db.add_expert(name, shots[name])
    F = embedder.embed(fb_texts)
    T = embedder.embed([t for t, _ in te])
    yte = np.array([y for _, y in te])

    def top(X, log=False):
        return [r.experts[0].name for r in db.route_many(list(X), top_k=1, k=0, min_confidence=0.0, log=log)]

    before_test = np.mean([p == intents[y] for p, y in zip(top(T), yte)])
    routed = db.route_many(list(F), top_k=1, k=0, min_confidence=0.0)
    events = tmp_path / "fb.jsonl"
    wrong = []
    with open(events, "w") as fh:
        for i, (r, y) in enumerate(zip(routed, fb_y)):
            got = r.experts[0].name
            if got != intents[y]:
                wrong.append(i)
                fh.write(json.dumps({"query_id": r.query_id, "expert": got, "reward": -1}) + "\n")
            fh.write(json.dumps({"query_id": r.query_id, "expert": intents[y], "reward": 1}) + "\n")
    assert len(wrong) >= 10, "the few-shot router should make mistakes for this test to mean anything"
    out = db.ingest_feedback(events)
    assert out["skipped"] == 0 and out["taken"] == len(fb_texts) + len(wrong)
    rep = db.retrain(holdout=0.0)
    assert rep["after"]["accuracy"] > rep["before"]["accuracy"]
    again = top(F[wrong])
    fixed = np.mean([g == intents[fb_y[i]] for g, i in zip(again, wrong)])
    after_test = np.mean([p == intents[y] for p, y in zip(top(T), yte)])
    assert fixed >= 0.5, f"only {fixed:.0%} of the wrongly routed queries are routed right after retraining"
    assert (1 - after_test) <= 0.6 * (1 - before_test), (before_test, after_test)    # test errors fall by 40%+
