"""Refusal experts: examples of out-of-scope queries that make routes abstain, never answer themselves,
stay out of the tree, balancing, search and stats, and persist; bad input changes nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest

import moedb
from conftest import run_cli
from moedb.routing.hybrid import HybridGate
from test_routing_db import D, cluster, file_state, fill, unit


@pytest.fixture
def vdb(tmp_path):
    d = moedb.connect(str(tmp_path / "v.db"), embedder=moedb.VectorsOnly(D))
    yield d
    d.close()


def near_region(rng, centers, j, mix=0.3):
    """An out-of-scope region right next to expert ``j`` (cosine about 0.95 to its centre): the scope
    alone lets most of its queries through to expert ``j``."""
    other = unit(rng.normal(size=D))
    return unit(centers[j] + mix * other)


def test_refusal_expert_catches_its_region_and_is_never_selected(vdb):
    rng = np.random.default_rng(11)
    centers = fill(vdb, rng, [f"e{i}" for i in range(6)], n=40)
    oos_c = near_region(rng, centers, 0)
    oos_queries = cluster(rng, oos_c, 60)
    inscope = np.concatenate([cluster(rng, c, 20) for c in centers])
    before = vdb.route_many(list(oos_queries), top_k=1, k=0, log=False)
    caught_before = np.mean([r.abstained for r in before])
    vdb.add_expert("off_topic", [f"oos {i}" for i in range(40)], vectors=cluster(rng, oos_c, 40), refuse=True)
    assert vdb.expert("off_topic").refuse and not vdb.expert("e0").refuse
    figs = vdb.router_figures()
    # calibrated on in-scope held-out documents only; the refusal expert's own held-out examples are caught
    assert figs["heldout"] == 6 * 40 and figs["refusal_heldout"] == 40
    assert figs["heldout_refused"] == pytest.approx(0.02, abs=0.015)
    assert figs["refusal_heldout_refused"] >= 0.8
    after = vdb.route_many(list(oos_queries), top_k=1, k=0, log=False)
    caught_after = np.mean([r.abstained for r in after])
    assert caught_before <= 0.5 and caught_after >= 0.8
    assert any(r.refused_by == "off_topic" for r in after)
    for r in after:
        if r.abstained:
            assert r.experts == [] and r.hits == []
        if r.refused_by is not None:
            assert r.abstained and r.to_dict()["refused_by"] == "off_topic"
    rin = vdb.route_many(list(inscope), top_k=7, k=3, min_confidence=0.0, log=False)
    # never selected (even with top_k = every expert and no floor), never a source of passages
    assert all("off_topic" not in [e.name for e in r.experts] for r in rin)
    assert all(h.expert != "off_topic" for r in rin for h in r.hits)
    assert not any(r.abstained for r in rin)  # min_confidence=0.0 still never abstains
    assert not any(r.abstained for r in vdb.route_many(list(oos_queries), top_k=1, k=0, min_confidence=0.0,
                                                       log=False))
    rin = vdb.route_many(list(inscope), top_k=1, k=0, log=False)
    assert np.mean([r.abstained for r in rin]) <= 0.08
    truth = np.repeat([f"e{i}" for i in range(6)], 20)
    assert np.mean([r.experts[0].name == t for r, t in zip(rin, truth) if not r.abstained]) >= 0.95
    # search, balancing figures and load stats leave it out
    assert all(h.expert != "off_topic" for h in vdb.search(oos_queries[0], k=20))
    assert "off_topic" not in vdb.balance_stats()["experts"]
    vdb.route_many(list(inscope[:30]), top_k=1, k=0, log=True)
    assert "off_topic" not in [row["name"] for row in vdb.stats()["experts"]]


def test_refusal_explain_persistence_and_turning_it_off(vdb):
    rng = np.random.default_rng(12)
    centers = fill(vdb, rng, ["a", "b", "c"], n=40)
    oos_c = near_region(rng, centers, 1)
    vdb.add_expert("nope", [f"n{i}" for i in range(40)], vectors=cluster(rng, oos_c, 40), refuse=True)
    q = cluster(rng, oos_c, 20)
    rs = vdb.route_many(list(q), top_k=1, k=0, log=False, explain=True)
    refused = [r for r in rs if r.refused_by]
    assert refused, "the refusal expert should be the best match for queries from its own region"
    ex = refused[0].explanation
    assert ex["refused_by"] == "nope" and ex["refusal_experts"] == 1 and ex["abstained"]
    path = vdb.path
    vdb.close()
    again = moedb.connect(path, embedder=moedb.VectorsOnly(D))
    try:
        assert again.expert("nope").refuse
        r2 = again.route_many(list(q), top_k=1, k=0, log=False)
        assert [r.refused_by for r in r2] == [r.refused_by for r in rs]
        # an ordinary expert again: it is selected for its own region
        again.update_expert("nope", refuse=False)
        r3 = again.route_many(list(q), top_k=1, k=0, min_confidence=0.0, log=False)
        assert np.mean([r.experts[0].name == "nope" for r in r3]) >= 0.7
        assert all(r.refused_by is None for r in r3)
    finally:
        again.close()


def test_refusal_bad_input_is_refused_and_changes_nothing(vdb):
    rng = np.random.default_rng(13)
    fill(vdb, rng, ["p", "q"], n=20)
    vdb.add_expert("kid", [f"k{i}" for i in range(10)], vectors=cluster(rng, unit(rng.normal(size=D)), 10),
                   parent="p")
    vdb.add_expert("no", [f"n{i}" for i in range(20)], vectors=cluster(rng, unit(rng.normal(size=D)), 20),
                   refuse=True)
    vdb.route(cluster(rng, unit(rng.normal(size=D)), 1)[0], log=False)
    before = file_state(vdb)
    cases = [
        (lambda: vdb.add_expert("x", refuse="yes"), "refuse must be True or False"),
        (lambda: vdb.add_expert("x", parent="p", refuse=True), "cannot have a parent"),
        (lambda: vdb.add_expert("x", parent="no"), "refusal expert and cannot be a parent"),
        (lambda: vdb.update_expert("p", refuse=True), "has children"),
        (lambda: vdb.update_expert("no", parent="q"), "cannot have a parent"),
        (lambda: vdb.update_expert("kid", parent="no"), "cannot be a parent"),
        (lambda: vdb.merge_experts(["q", "no"], "q"), "cannot merge refusal experts"),
        (lambda: vdb.split_expert("no", 2), "refusal expert"),
    ]
    for call, msg in cases:
        with pytest.raises(moedb.InvalidInput, match=msg):
            call()
    assert file_state(vdb) == before


def test_gate_threshold_counts_refusals_by_the_refusal_expert():
    """The scope threshold and the refusal expert together refuse about refuse_rate of held-out in-scope
    documents; without any refusal expert the gate is what it was (refusal margin 0)."""
    rng = np.random.default_rng(3)
    centers = unit(rng.normal(size=(5, D)))
    groups = [cluster(rng, c, 60) for c in centers]
    oos = cluster(rng, unit(centers[0] + 0.9 * unit(rng.normal(size=D))), 60)
    g = HybridGate(refuse_rate=0.05, lexical=False).fit(groups + [oos], refuse=[False] * 5 + [True])
    assert g.figures_["heldout"] == 300 and g.figures_["refusal_heldout"] == 60
    assert g.figures_["heldout_refused"] == pytest.approx(0.05, abs=0.02)
    g0 = HybridGate(refuse_rate=0.05, lexical=False).fit(groups)
    assert not g0.refuse_.any() and "refusal_heldout" not in g0.figures_
    Q = np.concatenate([cluster(rng, c, 10) for c in centers])
    comps, scope = g.score(Q)
    z = sum(comps.values())
    # the scope is lowered exactly by refuse_weight * (lse(z_refusal) - lse(z_others))
    from moedb.routing.gating import logsumexp

    cen, logits, _ = g._parts(Q, None, None)
    base = g._scope_from(cen[:, :5].max(axis=1), logsumexp(logits[:, :5]))
    assert np.allclose(scope, base - g.refuse_weight * (z[:, 5] - logsumexp(z[:, :5])), atol=1e-6)
    # persisted with its refusal mask
    g2 = HybridGate.from_bytes(g.to_bytes())
    assert g2.refuse_.tolist() == [False] * 5 + [True]
    assert np.allclose(g2.score(Q)[1], scope)


CAR_SHOP = {
    "tires": ["Rotate your tires every 5,000 miles so they wear evenly.",
              "Check tire pressure monthly; the value is on the driver's door sticker.",
              "Replace tires when the tread depth is below 2/32 of an inch.",
              "Balance the wheels when you feel vibrations at highway speed.",
              "A slow leak in a tire can often be patched from the inside.",
              "Winter tires grip better below 7 degrees Celsius.",
              "Align the wheels if the car pulls to one side.",
              "Uneven tire wear on the edges means under-inflation.",
              "Tire sidewall numbers give width, aspect ratio and rim size."],
    "engine": ["Change the engine oil and filter every 5,000 miles.",
               "A check engine light can mean a loose gas cap.",
               "Flush the coolant every two years to avoid overheating.",
               "Replace spark plugs around 100,000 miles.",
               "A weak battery makes the engine crank slowly on cold mornings.",
               "Blue smoke from the exhaust means the engine burns oil.",
               "Replace the timing belt at the interval in the owner's manual.",
               "A squealing noise at start-up is often a worn serpentine belt.",
               "Use the oil viscosity the manufacturer recommends."],
}
# car questions this shop does not answer: buying, selling, insurance, prices
NOT_OURS = ["Which new car should I buy for a family of five?", "How much is my used car worth?",
            "What does car insurance cost for a new driver?", "Is it better to lease or buy a car?",
            "How do I sell my car privately?", "Which car dealership has the best prices?",
            "What is the best electric car to buy this year?", "How do I get a car loan with bad credit?",
            "Should I buy an extended warranty for my car?", "How do I transfer a car title to a buyer?"]


def test_refusal_expert_on_real_text_and_cli(db, db_path):
    for name, docs in CAR_SHOP.items():
        db.add_expert(name, docs)
    unseen = ["what car should I buy for commuting", "how much can I sell my old sedan for",
              "cheapest car insurance for students", "should I lease a new SUV"]
    # without examples of what is out of scope, some of these car questions look close enough to be answered
    # (the small-collection scope rule, issue 16, already refuses the farthest of them)
    assert sum(not r.abstained for r in db.route_many(unseen, top_k=1, k=0, log=False)) >= 1
    db.add_expert("not-our-business", NOT_OURS, refuse=True, description="car buying, selling, insurance")
    inside = {"my tire keeps losing air": "tires", "how often should I change the oil": "engine",
              "the car vibrates at 70 mph": "tires", "check engine light is on": "engine"}
    rs = db.route_many(list(inside), top_k=1, k=1, log=False)
    assert all(r.experts and r.experts[0].name == inside[r.query] for r in rs), [r.to_dict() for r in rs]
    out = db.route_many(unseen, top_k=1, k=1, log=False)
    assert sum(r.refused_by == "not-our-business" for r in out) >= 3, [r.to_dict() for r in out]
    db.close()
    r = run_cli(["route", "--json", "what car should I buy for commuting"], db_path)
    assert r.returncode == 0, r.stderr
    js = json.loads(r.stdout)
    assert js["abstained"] and js["refused_by"] == "not-our-business" and js["experts"] == []
    r = run_cli(["route", "what car should I buy for commuting"], db_path)
    assert "refused" in r.stdout and "not-our-business" in r.stdout
    r = run_cli(["add-expert", "chitchat", "--refuse", "--text", "tell me a joke", "--text", "how are you"], db_path)
    assert r.returncode == 0 and "refusal expert" in r.stdout, r.stderr
    r = run_cli(["list"], db_path)
    assert "chitchat (refuses)" in r.stdout
    r = run_cli(["show", "chitchat"], db_path)
    assert "a refusal expert" in r.stdout
    r = run_cli(["show", "chitchat", "--json"], db_path)
    assert json.loads(r.stdout)["refuse"] is True
    r = run_cli(["add-expert", "x", "--refuse", "--parent", "tires", "--text", "a"], db_path)
    assert r.returncode == 1 and "cannot have a parent" in r.stderr


@pytest.mark.parametrize("mode", ["beam", "hnswlib"])
def test_refusal_expert_is_scored_on_the_beam_and_hnswlib_paths(vdb, mode):
    """Candidate search (a beam over the tree, or hnswlib over the centroids) must not drop the refusal
    expert: it is the evidence against the others, so the decisions equal the exhaustive ones."""
    rng = np.random.default_rng(21)
    roots = unit(rng.normal(size=(3, D)))
    for p in ("p0", "p1", "p2"):
        vdb.add_expert(p)
    centers = []
    for k, r in enumerate(roots):
        cs = unit(r + 0.5 * rng.normal(size=(4, D)) / np.sqrt(D) * 4)
        fill(vdb, rng, [f"p{k}-{i}" for i in range(4)], n=30, parent=f"p{k}", centers=cs)
        centers += list(cs)
    oos_c = near_region(rng, np.array(centers), 5)
    far_c = unit(-roots.sum(axis=0))  # a region no beam would enter
    vdb.add_expert("off", [f"o{i}" for i in range(60)],
                   vectors=np.concatenate([cluster(rng, oos_c, 30), cluster(rng, far_c, 30)]), refuse=True)
    q = np.concatenate([cluster(rng, oos_c, 20), cluster(rng, far_c, 20),
                        np.concatenate([cluster(rng, c, 3) for c in centers])])
    vdb.configure(beam=0)
    flat = vdb.route_many(list(q), top_k=1, k=0, log=False)
    assert sum(r.refused_by == "off" for r in flat) >= 30
    if mode == "beam":
        vdb.configure(beam=1)
    else:
        vdb.configure(ann_min_centroids=1, ann_candidates=1)
    other = vdb.route_many(list(q), top_k=1, k=0, log=False, explain=True)
    assert [r.refused_by for r in other] == [r.refused_by for r in flat]
    if mode == "beam":
        assert max(r.explanation["experts_scored"] for r in other) < 16
    else:
        router = vdb.gate.current()
        assert router.ann is not None  # the candidates really came from hnswlib
        # every query's candidates include the refusal expert, even when its centroids are not the nearest
        cands = router.ann_candidates(np.concatenate([cluster(rng, c, 2) for c in centers]), 1)
        assert all(router.col[vdb.store.experts.id_of("off")] in c for c in cands)
