"""Passage evidence (routing/evidence.py): the numerics, and questions routed to the expert that holds
their answer where the gate alone misroutes them (MTRAG, real MiniLM)."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moedb
from moedb.routing.evidence import PassageEvidence


def _unit(rng, n, d):
    v = rng.normal(size=(n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_distribution_is_a_distribution(E, m, n, seed):
    rng = np.random.default_rng(seed)
    X = _unit(rng, m, 8)
    cols = rng.integers(0, E, m)
    scale = rng.uniform(0.5, 5.0, E)
    ev = PassageEvidence().fit(X, cols, scale, np.zeros((0, E)), np.zeros((0, 8)), np.zeros(0, np.int64),
                               np.zeros(0, np.int64))
    for d in ev.depths:
        ev.depth_ = d
        P = ev.distribution(_unit(rng, n, 8))
        assert P.shape == (n, E) and np.all(P >= 0) and np.allclose(P.sum(axis=1), 1.0)
        # only experts that own a sampled passage get evidence
        assert np.all(P[:, np.setdiff1d(np.arange(E), cols)] == 0) or len(np.unique(cols)) == 0
    assert ev.weight_ == 0.0 and not ev.logits(X[:2]).any()  # no pseudo-queries: the gate alone


def test_weight_follows_which_signal_classifies_pseudo_queries():
    rng = np.random.default_rng(1)
    E, per, d = 4, 30, 16
    centers = _unit(rng, E, d)
    X = np.concatenate([centers[e] + 0.3 * rng.normal(size=(per, d)) for e in range(E)]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    cols = np.repeat(np.arange(E), per)
    src = np.arange(0, E * per, 3)
    y = cols[src]
    good_gate = np.eye(E)[y] * 20.0  # a gate that is always right, by a wide margin
    bad_gate = np.eye(E)[(y + 1) % E] * 1.0  # a gate that is always wrong, by a small margin
    right = PassageEvidence().fit(X, cols, np.ones(E), good_gate, X[src], y, src)
    wrong = PassageEvidence().fit(X, cols, np.ones(E), bad_gate, X[src], y, src)
    assert right.weight_ == 0.0  # the gate alone is as good as it gets: no evidence weight
    assert wrong.weight_ > 0.0 and wrong.figures_["pseudo_accuracy"] > 0.9
    back = PassageEvidence.from_bytes(wrong.to_bytes())
    assert back.weight_ == wrong.weight_ and np.allclose(back.logits(X[:5]), wrong.logits(X[:5]))


@pytest.mark.slow  # (embeds ~1,000 MTRAG texts: about a minute on two idle cores)
def test_questions_reach_the_domain_holding_their_answer(tmp_path, shared_dir, embedder):
    d = shared_dir / "data" / "mtrag_gold"
    corpus = [json.loads(line) for line in open(d / "corpus.jsonl", encoding="utf-8")]
    queries = [json.loads(line) for line in open(d / "queries.jsonl", encoding="utf-8")]
    rng = np.random.default_rng(0)
    by = collections.defaultdict(list)
    for c in corpus:
        by[c["domain"]].append(c)
    with moedb.connect(str(tmp_path / "m.moedb"), embedder=embedder, log_queries=False) as db:
        for dom, cs in sorted(by.items()):
            pick = rng.choice(len(cs), min(120, len(cs)), replace=False)
            db.add_expert(dom, [{"id": cs[i]["_id"], "text": cs[i]["text"]} for i in pick])
        figures = db.warm_router()
        assert figures["evidence"]["weight"] > 0  # questions' evidence earned a weight on passages
        qs = [q for q in queries][::3]
        with_ev = [r.experts[0].name for r in db.route_many([q["text"] for q in qs], top_k=1, k=0,
                                                           min_confidence=0.0)]
        db.configure(passage_evidence=False)
        gate = [r.experts[0].name for r in db.route_many([q["text"] for q in qs], top_k=1, k=0, min_confidence=0.0)]
        gold = [q["domain"] for q in qs]
        acc_ev = np.mean([a == b for a, b in zip(with_ev, gold)])
        acc_gate = np.mean([a == b for a, b in zip(gate, gold)])
        assert acc_ev >= acc_gate + 0.08, (acc_ev, acc_gate)
        fixed = [q["text"] for q, a, b, g in zip(qs, with_ev, gate, gold) if a == g != b]
        assert fixed  # questions the gate alone sends elsewhere reach their domain
        db.configure(passage_evidence=True)
        r = db.route(fixed[0], top_k=1, min_confidence=0.0, explain=True)
        assert "evidence" in r.experts[0].components


def test_pseudo_queries_of_experts_larger_than_their_sample(tmp_path):
    """Experts four times their share of the sample: pseudo-queries come from the whole expert (a quarter of
    them from the sample), and with an embedder of vectors only each stands as its own passage's vector."""
    rng = np.random.default_rng(3)
    E, per, d = 4, 64, 16
    centers = _unit(rng, E, d)
    with moedb.connect(str(tmp_path / "v.moedb"), embedder=moedb.embed.VectorsOnly(d), log_queries=False) as db:
        for e in range(E):
            V = centers[e] + 0.5 * rng.normal(size=(per, d))
            db.add_expert(f"e{e}", [{"id": f"{e}-{i}", "text": f"passage {i} of expert {e}"} for i in range(per)],
                          vectors=V)
        db.configure(evidence_sample=E * per // 4)
        ev = db.evidence.current(db.gate.current())
        assert ev.figures_["sample"] == E * per // 4 and np.allclose(ev.scale_, 4.0)
        assert ev.figures_["pseudo_queries"] == E * per  # (400 // 4 = 100 per expert, capped at its 64)
        # each pseudo-query is its own passage's vector (the gate, trained on them, classifies them)
        assert ev.figures_["gate_accuracy"] > 0.6  # (one vector for all of them would give 0.25)
        # and never finds itself: left out where it is in the sample
        assert ev.figures_["accuracy_by_weight_depth"]["8.0@1"] < 1.0
