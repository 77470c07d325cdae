"""Routing through a real moedb file with precomputed vectors (no text model): persistence, abstention,
balancing, capacity, hierarchy, hnswlib, explanations and bad input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import moedb
from moedb.routing.ann import HnswIndex, exact_topk

D = 24


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cluster(rng, center, n, spread=0.35):
    return unit(center + spread * rng.normal(size=(n, D)) / np.sqrt(D))


@pytest.fixture
def vdb(tmp_path):
    d = moedb.connect(str(tmp_path / "v.db"), embedder=moedb.VectorsOnly(D))
    yield d
    d.close()


def fill(db, rng, names, n=40, parent=None, centers=None):
    centers = unit(rng.normal(size=(len(names), D))) if centers is None else centers
    for name, c in zip(names, centers):
        v = cluster(rng, c, n)
        db.add_expert(name, [f"{name} doc {i}" for i in range(n)], vectors=v, parent=parent)
    return centers


def file_state(db):
    """Everything routing-relevant in the file (to prove bad input changed nothing)."""
    q = db.store.q
    return (q("SELECT id, name, parent_id, version, n_docs FROM experts ORDER BY id"),
            q("SELECT name, key, updated_at FROM routing_state ORDER BY name"),
            q("SELECT * FROM routing_balance ORDER BY expert_id"), q("SELECT count(*) FROM query_log"))


def test_gate_is_persisted_and_survives_reopening_without_refit(vdb, tmp_path):
    rng = np.random.default_rng(0)
    centers = fill(vdb, rng, ["a", "b", "c", "d"])
    q = cluster(rng, centers[2], 5)
    before = [vdb.route(v, top_k=1, min_confidence=0.0, log=False) for v in q]
    assert all(r.experts[0].name == "c" for r in before)
    (key, _, figures), stamp = vdb.store.artefacts.get("gate"), vdb.store.q1(
        "SELECT updated_at FROM routing_state WHERE name='gate'")[0]
    assert figures["experts"] == 4 and figures["heldout"] >= 30
    path = vdb.path
    vdb.close()
    # a new process routes with the stored gate: same confidences, no refit, no sklearn/scipy/torch import
    code = f"""
import sys, numpy as np, moedb
db = moedb.connect({path!r})
q = np.load({str(tmp_path / 'q.npy')!r})
out = [db.route(v, top_k=1, min_confidence=0.0, log=False) for v in q]
print([r.experts[0].name for r in out])
print([round(r.experts[0].confidence, 6) for r in out])
print(sorted(m for m in ('sklearn', 'scipy', 'torch', 'sentence_transformers') if m in sys.modules))
print(db.store.q1("SELECT updated_at FROM routing_state WHERE name='gate'")[0])
"""
    np.save(tmp_path / "q.npy", q)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names, confs, heavy, stamp2 = out.stdout.strip().splitlines()
    assert eval(names) == ["c"] * 5
    assert np.allclose(eval(confs), [r.experts[0].confidence for r in before], atol=1e-6)
    assert eval(heavy) == []
    assert float(stamp2) == stamp


def test_route_reflects_every_added_expert_and_refits_lazily(vdb):
    rng = np.random.default_rng(1)
    fill(vdb, rng, ["a", "b"], n=10)
    k1 = vdb.store.artefacts.key("gate") if vdb.route(unit(rng.normal(size=D)), log=False) else None
    c = unit(rng.normal(size=D))
    fill(vdb, rng, ["new"], n=10, centers=c[None])
    r = vdb.route(cluster(rng, c, 1)[0], top_k=1, min_confidence=0.0, log=False)
    assert r.experts[0].name == "new"
    assert vdb.store.artefacts.key("gate") != k1
    vdb.remove_expert("new")
    r = vdb.route(cluster(rng, c, 1)[0], top_k=3, min_confidence=0.0, log=False)
    assert {e.name for e in r.experts} == {"a", "b"}
    figs = vdb.refit_router()
    assert figs["experts"] == 2


def test_calibrated_abstention_refuses_unrelated_queries_and_few_in_scope(vdb):
    rng = np.random.default_rng(2)
    centers = fill(vdb, rng, [f"e{i}" for i in range(6)], n=40)
    thr = vdb.router_figures()["threshold"]
    assert 0 < thr < 1
    inscope = np.concatenate([cluster(rng, c, 30) for c in centers])
    rs = vdb.route_many(list(inscope), top_k=1, k=0, log=False)
    refused = np.mean([r.abstained for r in rs])
    assert refused <= 0.10
    # unrelated: directions orthogonal-ish to every expert
    far = unit(rng.normal(size=(100, D)))
    far = far[(far @ centers.T).max(axis=1) < 0.2]
    rs = vdb.route_many(list(far), top_k=1, k=0, log=False)
    assert np.mean([r.abstained for r in rs]) >= 0.5
    for r in rs:
        if r.abstained:
            assert r.experts == [] and r.hits == []
    # 0.0 never abstains; the database default can be set
    assert not any(r.abstained for r in vdb.route_many(list(far), top_k=1, k=0, min_confidence=0.0, log=False))
    vdb.configure(min_confidence=0.0)
    assert not any(r.abstained for r in vdb.route_many(list(far), top_k=1, k=0, log=False))


def test_scope_rule_min_scope_and_its_persistence(vdb, tmp_path):
    rng = np.random.default_rng(5)
    centers = fill(vdb, rng, [f"e{i}" for i in range(5)], n=40)
    figs = vdb.router_figures()
    thr = figs["scope_threshold"]
    assert thr is not None and figs["heldout_refused"] == pytest.approx(0.02, abs=0.01)
    inscope = np.concatenate([cluster(rng, c, 20) for c in centers])
    far = unit(rng.normal(size=(200, D)))
    far = far[(far @ centers.T).max(axis=1) < 0.2]
    rin = vdb.route_many(list(inscope), top_k=1, k=0, log=False)
    rfar = vdb.route_many(list(far), top_k=1, k=0, log=False)
    s_in = np.array([r.scope for r in rin])
    s_far = np.array([r.scope for r in rfar])
    # the scope separates in-scope from unrelated queries, and abstention is exactly scope < threshold
    assert np.median(s_in) > thr > np.median(s_far)
    assert [r.abstained for r in rin + rfar] == list(np.r_[s_in, s_far] < thr)
    # min_scope replaces the calibrated threshold; a confidence rule (min_confidence) overrides both
    vdb.configure(min_scope=float(np.max(s_in)) + 1.0)
    assert all(r.abstained for r in vdb.route_many(list(inscope[:10]), top_k=1, k=0, log=False))
    assert not any(r.abstained for r in vdb.route_many(list(inscope[:10]), top_k=1, k=0, min_confidence=0.0,
                                                       log=False))
    vdb.configure(min_scope=float(np.min(s_far)) - 1.0)
    assert not any(r.abstained for r in vdb.route_many(list(far), top_k=1, k=0, log=False))
    with pytest.raises(moedb.ConfigError, match="min_scope"):
        vdb.configure(min_scope=float("nan"))
    vdb.configure(min_scope=None)
    # the calibrated scope survives reopening: same scores, same decisions
    path = vdb.path
    vdb.close()
    again = moedb.connect(path, embedder=moedb.VectorsOnly(D))
    try:
        assert again.router_figures()["scope_threshold"] == pytest.approx(thr)
        r2 = again.route_many(list(far), top_k=1, k=0, log=False)
        assert np.allclose([r.scope for r in r2], s_far, atol=1e-5)
        assert [r.abstained for r in r2] == [r.abstained for r in rfar]
    finally:
        again.close()


def test_balancing_spreads_load_over_replicas_and_persists(vdb):
    rng = np.random.default_rng(3)
    c = unit(rng.normal(size=D))
    docs = cluster(rng, c, 90, spread=0.3)
    for i in range(3):  # three replicas of the same topic
        vdb.add_expert(f"rep{i}", [f"r{i} {j}" for j in range(30)], vectors=docs[i::3])
    other = unit(rng.normal(size=D))
    vdb.add_expert("other", [f"o {j}" for j in range(30)], vectors=cluster(rng, other, 30))
    qs = list(cluster(rng, c, 1, spread=0.05)) * 300  # the same query again and again
    vdb.configure(balance=False, min_confidence=0.0)
    off = [r.experts[0].name for r in vdb.route_many(qs, top_k=1, k=0)]
    assert len(set(off)) == 1  # without balancing one replica takes everything
    vdb.configure(balance=True, balance_rate=0.02)
    on = [r.experts[0].name for r in vdb.route_many(qs, top_k=1, k=0)]
    counts = np.array([on.count(f"rep{i}") for i in range(3)])
    assert counts.min() > 50, counts
    stats = vdb.balance_stats()
    assert stats["experts"]["other"]["load"] == 0
    biases = {n: e["bias"] for n, e in stats["experts"].items()}
    assert max(abs(b) for b in biases.values()) <= vdb.settings()["balance_max_bias"]
    # confidences never include the bias
    r = vdb.route(qs[0], top_k=3, explain=True)
    assert sum(e.confidence for e in r.experts) <= 1.0 + 1e-9
    assert {e.components["bias"] for e in r.experts} <= set(biases.values()) | {0.0}
    # the bias state persists in the file
    with moedb.connect(vdb.path) as again:
        assert again.balance_stats()["experts"]["rep0"]["bias"] == pytest.approx(
            vdb.balance_stats()["experts"]["rep0"]["bias"])
    # distinct experts: a query of "other" always goes to "other"
    r = vdb.route_many(list(cluster(rng, other, 50)), top_k=1, k=0)
    assert all(x.experts[0].name == "other" for x in r)


def test_capacity_per_window_moves_overflow_to_the_next_expert(vdb):
    rng = np.random.default_rng(4)
    centers = fill(vdb, rng, ["a", "b", "c"], n=20)
    vdb.configure(capacity=5, capacity_window=3600.0, min_confidence=0.0, balance=True)
    q = cluster(rng, centers[0] * 0.8 + centers[1] * 0.2, 1)[0]
    names = [vdb.route(q, top_k=1, k=0).experts[0].name for _ in range(12)]
    assert names[:5] == ["a"] * 5 and "a" not in names[5:10]


def test_hierarchy_paths_beam_and_parent_without_documents(vdb):
    rng = np.random.default_rng(5)
    vdb.add_expert("science")
    vdb.add_expert("food")
    sc = fill(vdb, rng, ["physics", "biology", "chemistry"], parent="science")
    fc = fill(vdb, rng, ["baking", "grilling", "soups"], parent="food")
    flat = vdb.route_many(list(np.concatenate([cluster(rng, c, 5) for c in np.r_[sc, fc]])), top_k=1,
                          min_confidence=0.0, log=False)
    truth = [n for n in ["physics", "biology", "chemistry", "baking", "grilling", "soups"] for _ in range(5)]
    assert [r.experts[0].name for r in flat] == truth
    assert flat[0].path == ["science", "physics"] and flat[-1].path == ["food", "soups"]
    # a pure parent's centroid derives from its children's documents
    kids = [vdb.expert(n) for n in ("physics", "biology", "chemistry")]
    want = sum(k.centroid * k.size for k in kids) / sum(k.size for k in kids)
    assert np.allclose(vdb.expert("science").centroid, want, atol=1e-5)
    assert vdb.expert("science").size == 0
    vdb.configure(beam=1)
    q = cluster(rng, fc[1], 1)[0]
    r = vdb.route(q, top_k=3, min_confidence=0.0, log=False, explain=True)
    assert r.experts[0].name == "grilling" and r.path == ["food", "grilling"]
    assert r.explanation["experts_scored"] == 3 and r.explanation["experts_total"] == 6
    assert {e.name for e in r.experts} <= {"baking", "grilling", "soups"}
    # a parent without documents goes: the same gate serves (no refit), the paths no longer show it
    vdb.configure(beam=None)
    refits = vdb.router_figures()
    other = moedb.connect(vdb.path, embedder=moedb.VectorsOnly(D))  # a connection that routed before, too
    assert other.route(q, top_k=1, min_confidence=0.0, log=False).path == ["food", "grilling"]
    vdb.remove_expert("food")
    try:
        for db in (vdb, other):
            r = db.route(q, top_k=1, min_confidence=0.0, log=False)
            assert r.experts[0].name == "grilling" and r.path == ["grilling"]
        assert vdb.router_figures() == refits
        vdb.add_expert("kitchen")  # and one that comes, once a child moves under it
        vdb.update_expert("grilling", parent="kitchen")
        assert other.route(q, top_k=1, min_confidence=0.0, log=False).path == ["kitchen", "grilling"]
    finally:
        other.close()


def test_bad_input_is_refused_and_changes_nothing(vdb):
    rng = np.random.default_rng(6)
    fill(vdb, rng, ["a", "b"], n=10)
    vdb.add_expert("child", ["c"], vectors=unit(rng.normal(size=(1, D))), parent="a")
    v = unit(rng.normal(size=D))
    vdb.route(v)
    before = file_state(vdb)
    cases = [
        (lambda: vdb.add_expert("x", parent="nope"), moedb.UnknownExpert, "nope"),
        (lambda: vdb.update_expert("a", parent="child"), moedb.InvalidInput, "cycle"),
        (lambda: vdb.update_expert("a", parent="a"), moedb.InvalidInput, "cycle"),
        (lambda: vdb.route(""), moedb.InvalidInput, "query is empty"),
        (lambda: vdb.route("   \n"), moedb.InvalidInput, "query is empty"),
        (lambda: vdb.route_many([v, " "]), moedb.InvalidInput, "query #1 is empty"),
        (lambda: vdb.route(v, context="earlier turn"), moedb.InvalidInput, "context must be a list of strings"),
        (lambda: vdb.route(v, context=["ok", 3]), moedb.InvalidInput, "item #1 is int"),
        (lambda: vdb.route(v, top_k=0), moedb.InvalidInput, "top_k"),
        (lambda: vdb.route(v, top_k=-2), moedb.InvalidInput, "top_k"),
        (lambda: vdb.route(v, min_confidence=1.5), moedb.InvalidInput, "min_confidence"),
        (lambda: vdb.configure(no_such_setting=1), moedb.ConfigError, "no_such_setting"),
        (lambda: vdb.configure(min_confidence=2), moedb.ConfigError, "min_confidence must be"),
        (lambda: vdb.configure(balance_max_bias=-1), moedb.ConfigError, "balance_max_bias"),
        (lambda: vdb.configure(capacity=0), moedb.ConfigError, "capacity"),
        (lambda: vdb.configure(beam="wide"), moedb.ConfigError, "beam"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
        assert file_state(vdb) == before


def test_explain_fills_components_that_sum_to_the_score(vdb):
    rng = np.random.default_rng(7)
    centers = fill(vdb, rng, ["a", "b", "c"], n=40)
    r = vdb.route(cluster(rng, centers[1], 1)[0], top_k=2, min_confidence=0.0, explain=True, log=False)
    for e in r.experts:
        assert set(e.components) == {"centroid", "gate", "lexical", "bias"}
        assert e.score == pytest.approx(e.components["centroid"] + e.components["gate"] + e.components["lexical"])
    ex = r.explanation
    assert ex["experts_total"] == 3 and set(ex["mix"]) == {"centroid", "gate", "lexical"}
    assert "threshold" in ex and ex["top_confidence"] == pytest.approx(r.experts[0].confidence)
    plain = vdb.route(cluster(rng, centers[1], 1)[0], log=False)
    assert plain.explanation is None and all(e.components is None for e in plain.experts)


def test_hnswlib_matches_exact_search_and_survives_changes():
    rng = np.random.default_rng(8)
    X = unit(rng.normal(size=(3000, 32)))
    labels = np.arange(3000) * 7
    Q = unit(rng.normal(size=(100, 32)))
    idx = HnswIndex(32).fit(labels, X)

    def recall(index, keep_labels, keep_X):
        got, _ = index.query(Q, 10)
        want, _ = exact_topk(Q, keep_X, keep_labels, 10)
        return np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])

    assert recall(idx, labels, X) >= 0.99
    # deletions (mark_deleted) and additions beyond capacity (explicit resize)
    keep = np.ones(3000, bool)
    keep[::5] = False
    extra = unit(rng.normal(size=(1500, 32)))
    L2 = np.r_[labels[keep], np.arange(1500) * 7 + 1]
    X2 = np.r_[X[keep], extra]
    stats = idx.sync(L2, X2)
    assert stats == {"added": 1500, "deleted": 600, "rebuilt": 0}
    assert recall(idx, L2, X2) >= 0.99
    got, _ = idx.query(Q, 10)
    assert not (set(got.ravel().tolist()) & set(labels[~keep].tolist()))
    back = HnswIndex.from_bytes(idx.to_bytes(), 32, L2, ef=idx.ef, deleted=idx.deleted_)
    assert recall(back, L2, X2) >= 0.99
    # k is clamped to the live items
    tiny = HnswIndex(32).fit(np.array([1, 2]), X[:2])
    lab, sim = tiny.query(Q[:1], 10)
    assert lab.shape == (1, 2)
    # many deletions trigger a rebuild
    assert idx.sync(L2[:100], X2[:100])["rebuilt"] == 1 and len(idx) == 100


def test_large_experts_and_many_centroids_use_hnswlib_with_exact_level_recall(vdb):
    rng = np.random.default_rng(9)
    centers = unit(rng.normal(size=(40, D)))
    for i, c in enumerate(centers):
        vdb.add_expert(f"e{i}", [f"{i}-{j}" for j in range(30)], vectors=cluster(rng, c, 30, spread=0.6))
    vdb.configure(ann_min_docs=25, ann_min_centroids=40, min_confidence=0.0, balance=False)
    Q = np.concatenate([cluster(rng, c, 2, spread=0.6) for c in centers])
    vdb.configure(ann_min_centroids=10**9)
    exact = vdb.route_many(list(Q), top_k=1, k=0, log=False)
    vdb.configure(ann_min_centroids=40)
    approx = vdb.route_many(list(Q), top_k=1, k=10, log=False)
    assert "ann:centroids" in vdb.store.artefacts.names()
    agree = np.mean([a.experts[0].name == b.experts[0].name for a, b in zip(exact, approx)])
    assert agree >= 0.99
    # documents inside large experts: hnswlib results equal the exhaustive search
    rec = []
    for q, r in zip(Q, approx):
        want = vdb.search(q, k=10, experts=[r.experts[0].name])
        rec.append(len({h.id for h in r.hits} & {h.id for h in want}) / len(want))
    assert np.mean(rec) >= 0.99
    assert any(n.startswith("ann:docs:") for n in vdb.store.artefacts.names())
    # an index persisted in the file is reused after documents change (synced, not stale)
    vdb.add_documents("e0", [f"new {j}" for j in range(5)], vectors=cluster(rng, centers[0], 5, spread=0.01))
    r = vdb.route(centers[0], top_k=1, k=5, log=False)
    assert {h.text for h in r.hits} == {f"new {j}" for j in range(5)}


def test_a_small_change_keeps_the_calibration_and_a_larger_one_recalibrates(vdb):
    """After a few experts change, the lazy refit fits only the final gate and keeps the held-out
    calibration of the last full fit (much cheaper at thousands of experts); past ``recalibrate_after``
    of the experts, or after an explicit refit, a new refusal expert or other fit settings, it
    calibrates anew."""
    rng = np.random.default_rng(21)
    fill(vdb, rng, [f"e{i}" for i in range(20)])  # 5% of 20 experts: one change keeps the calibration
    full = vdb.refit_router()
    assert not full.get("calibration_reused") and full["changed_since_calibration"] == 0 and full["heldout"] > 0
    c_new = fill(vdb, rng, ["new"])[0]
    r = vdb.route(cluster(rng, c_new, 1)[0], top_k=1, min_confidence=0.0, log=False)
    assert r.experts[0].name == "new"  # the new expert is in the gate at once
    f = vdb.router_figures()
    assert f["experts"] == 21 and f.get("calibration_reused") and f["changed_since_calibration"] == 1
    for k in ("mix", "threshold", "scope_threshold", "heldout_accuracy"):
        assert f[k] == full[k]
    # another connection (a new process) reads the stored gate and keeps counting from it
    other = moedb.connect(vdb.path, embedder=moedb.VectorsOnly(D))
    try:
        other.add_documents("new", ["new doc extra"], vectors=cluster(rng, c_new, 1))
        g = other.router_figures()
        assert g["changed_since_calibration"] == 2 or not g.get("calibration_reused")
        assert not g.get("calibration_reused")  # 2 changes > 5% of 21 experts: calibrated anew
        assert g["changed_since_calibration"] == 0 and g["heldout"] > full["heldout"]
    finally:
        other.close()
    vdb.add_documents("e0", ["e0 doc extra"], vectors=cluster(rng, c_new, 1))
    assert vdb.router_figures().get("calibration_reused")
    assert not vdb.refit_router().get("calibration_reused")  # an explicit refit calibrates anew
    vdb.add_expert("noise", ["n1", "n2"], vectors=unit(rng.normal(size=(2, D))), refuse=True)
    assert not vdb.router_figures().get("calibration_reused")  # refusal experts shape the scope threshold
    vdb.add_documents("e1", ["e1 doc extra"], vectors=cluster(rng, c_new, 1))
    vdb.configure(gate_C=10.0)
    assert not vdb.router_figures().get("calibration_reused")  # other fit settings
    vdb.configure(recalibrate_after=0)
    vdb.add_documents("e2", ["e2 doc extra"], vectors=cluster(rng, c_new, 1))
    assert not vdb.router_figures().get("calibration_reused")  # 0: always calibrate anew
    with pytest.raises(moedb.ConfigError, match="recalibrate_after"):
        vdb.configure(recalibrate_after=1.5)


def test_a_new_generator_or_metadata_does_not_refit_the_router(tmp_path):
    """Issue 16: set-generator forced a router refit (the next route paid 1.5-2.5 s)."""
    rng = np.random.default_rng(5)
    db = moedb.connect(str(tmp_path / "g.moedb"), embedder=moedb.VectorsOnly(8))
    for e in range(3):
        v = rng.normal(size=(6, 8))
        db.add_expert(f"e{e}", [f"e{e}-{j}" for j in range(6)], vectors=v)
    db.warm_router()
    key = db.store.artefacts.key("gate")
    db.set_generator("e1", {"backend": "extractive"})
    db.update_expert("e2", metadata={"owner": "ops"})
    db.route(rng.normal(size=8), log=False)
    assert db.store.artefacts.key("gate") == key  # the stored gate still fits: nothing was refitted
    assert db.expert("e2").metadata == {"owner": "ops"} and db.generator_config("e1")["backend"] == "extractive"
    db.update_expert("e2", description="now about something else")
    db.route(rng.normal(size=8), log=False)
    assert db.store.artefacts.key("gate") != key  # a description feeds the lexical signal: refitted
    db.close()
