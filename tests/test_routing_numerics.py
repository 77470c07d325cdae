"""Property tests of the routing numerics (pure NumPy, no database, no embedder)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from moedb.routing.balance import Balancer, bias_step, eligible, expected_share, load_figures
from moedb.routing.calibration import abstain_threshold, ece, fit_mix
from moedb.routing.gating import log_softmax, select, softmax, top_k
from moedb.routing.hierarchy import Tree, beam_candidates, node_centroids
from moedb.routing.hybrid import HybridGate
from moedb.routing.kmeans import kmeans, max_per_owner, multi_centroids
from moedb.routing.lexical import LexicalIndex, tokenize

finite = st.floats(-50, 50, allow_nan=False, width=64)
matrices = st.integers(1, 6).flatmap(lambda n: st.integers(1, 9).flatmap(
    lambda e: arrays(np.float64, (n, e), elements=finite)))


def unit(rng, n, d=16):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@given(matrices, st.floats(0.01, 10))
def test_softmax_rows_are_distributions_and_order_preserving(x, t):
    p = softmax(x, t)
    assert p.shape == x.shape
    assert np.all(p >= 0) and np.allclose(p.sum(axis=1), 1.0)
    # monotone: a larger logit never gets a smaller probability
    for i in range(x.shape[0]):
        o = np.argsort(x[i], kind="stable")
        assert np.all(np.diff(p[i, o]) >= -1e-12)
    assert np.allclose(np.log(np.maximum(softmax(x), 1e-300)), np.maximum(log_softmax(x), np.log(1e-300)), atol=1e-9)
    # shift invariance
    assert np.allclose(softmax(x + 7.0, t), p)


@given(matrices, st.integers(1, 12))
def test_top_k_returns_the_k_largest_best_first(x, k):
    idx = top_k(x, k)
    kk = min(k, x.shape[1])
    assert idx.shape == (x.shape[0], kk)
    for i in range(x.shape[0]):
        vals = x[i, idx[i]]
        assert np.all(np.diff(vals) <= 0)
        assert len(set(idx[i].tolist())) == kk
        rest = np.setdiff1d(np.arange(x.shape[1]), idx[i])
        if rest.size:
            assert vals.min() >= x[i, rest].max()


def test_top_k_large_matches_full_sort():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 300))
    x[0, 10] = x[0, 20] = 9.0  # a tie: lower index first
    idx = top_k(x, 7)
    assert np.array_equal(idx, np.argsort(-x, axis=1, kind="stable")[:, :7])
    assert idx[0, 0] == 10 and idx[0, 1] == 20


@given(matrices, st.integers(1, 5), st.floats(0, 1))
def test_select_abstains_exactly_when_best_is_below_threshold(x, k, thr):
    p = softmax(x)
    out = select(p, k, thr)
    for i, sel in enumerate(out):
        if p[i].max() < thr:
            assert len(sel) == 0
        else:
            assert 1 <= len(sel) <= k and p[i, sel[0]] == p[i].max()
            assert np.all(p[i, sel] >= thr)


@given(matrices, st.integers(1, 5), st.floats(0, 1), st.data())
def test_select_with_admit_abstains_exactly_on_rejected_rows(x, k, thr, data):
    """The scope rule: ``admit`` alone decides abstention; the confidence floor only trims later experts."""
    p = softmax(x)
    admit = np.array(data.draw(st.lists(st.booleans(), min_size=len(x), max_size=len(x))))
    for bias in (None, np.zeros(x.shape[1])):
        out = select(p, k, thr, admit=admit, bias=bias, logits=x if bias is not None else None)
        for i, sel in enumerate(out):
            if not admit[i]:
                assert len(sel) == 0
            else:
                assert 1 <= len(sel) <= k and p[i, sel[0]] == p[i].max()
                assert np.all(p[i, sel[1:]] >= thr)


@settings(max_examples=60)
@given(st.integers(1, 3).flatmap(lambda n: st.integers(5, 200).flatmap(
    lambda e: arrays(np.float64, (n, e), elements=st.integers(-3, 3).map(float)))), st.integers(1, 6), st.data())
def test_biased_select_on_many_tied_experts_matches_a_full_stable_sort(x, k, data):
    """The partial sort used for thousands of candidates picks what a full stable sort picks, ties included."""
    b = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.5, -0.5]), min_size=x.shape[1], max_size=x.shape[1])))
    p = softmax(x)
    for i, sel in enumerate(select(p, k, 0.0, bias=b, logits=x)):
        ref = np.argsort(-(x[i] + b), kind="stable")[:k]
        assert np.array_equal(sel, ref)


def test_biased_select_with_nan_ranks_picks_what_a_full_sort_picks():
    x = np.arange(20, dtype=np.float64)[None, ::-1].copy()
    x[0, [0, 3, 7]] = np.nan  # three NaN logits among 20 candidates: the partial sort must not be used
    out = select(np.full((1, 20), 0.05), 2, 0.0, bias=np.zeros(20), logits=x)[0]
    assert np.array_equal(out, np.argsort(-x[0], kind="stable")[:2]) and list(out) == [1, 2]


@given(matrices, st.integers(1, 4), arrays(np.float64, 9, elements=st.floats(-0.5, 0.5)))
def test_biased_select_keeps_confidence_floor_and_bias_moves_only_ranking(x, k, bias):
    p = softmax(x)
    b = bias[:x.shape[1]]
    out = select(p, k, 0.0, bias=b, logits=x)
    for i, sel in enumerate(out):
        assert len(sel) == min(k, x.shape[1])
        ranked = x[i, sel] + b[sel]
        assert np.all(np.diff(ranked) <= 1e-12)


@given(arrays(np.float64, 8, elements=st.floats(-1, 1)), arrays(np.float64, 8, elements=st.floats(0, 5)),
       arrays(np.float64, 8, elements=st.floats(0, 5)), st.floats(0.001, 0.5), st.floats(0.01, 2))
def test_bias_updates_are_bounded_and_point_toward_the_fair_share(bias, load, expected, rate, bound):
    b0 = np.clip(bias, -bound, bound)
    b1 = bias_step(b0, load, expected, rate, bound)
    assert np.all(np.abs(b1) <= bound + 1e-12)
    assert np.all(np.abs(b1 - b0) <= rate * np.abs(expected - load) + 1e-12)
    over = load > expected
    assert np.all(b1[over] <= b0[over] + 1e-12)
    assert np.all(b1[~over & (load < expected)] >= b0[~over & (load < expected)] - 1e-12)


@given(st.lists(st.integers(0, 2), min_size=50, max_size=300))
def test_balancer_bias_stays_bounded_over_any_traffic(winners):
    bal = Balancer(np.zeros(3), rate=0.05, max_bias=0.3, margin=1.0)
    for w in winners:
        z = np.zeros(3)
        z[w] = 0.2  # three near-equivalent replicas
        sel = select(softmax(z[None]), 1, 0.0, bias=bal.bias, logits=z[None])[0]
        bal.observe(z, sel, 1)
        assert np.all(np.abs(bal.bias) <= 0.3 + 1e-12)
    assert bal.load_.sum() == len(winners)
    assert bal.expected_.sum() == pytest.approx(len(winners))


def test_balancer_evens_out_replicas_but_leaves_distinct_experts_alone():
    # replicas: the same expert wins every time without bias; with bias the load spreads
    bal = Balancer(np.zeros(3), rate=0.02, max_bias=0.5, margin=1.0)
    z = np.array([0.3, 0.2, 0.1])
    picks = []
    for _ in range(600):
        sel = select(softmax(z[None]), 1, 0.0, bias=bal.bias, logits=z[None])[0]
        bal.observe(z, sel, 1)
        picks.append(int(sel[0]))
    share = np.bincount(picks[100:], minlength=3) / 500
    assert load_figures(np.bincount(picks[100:], minlength=3))["cv"] < 0.2
    assert np.all(share > 0.2)
    # distinct: the best is far ahead, nothing else is eligible, biases never move
    bal = Balancer(np.zeros(3), rate=0.02, max_bias=0.5, margin=1.0)
    z = np.array([5.0, 1.0, 0.0])
    for _ in range(200):
        sel = select(softmax(z[None]), 2, 0.0, bias=bal.bias, logits=z[None])[0]
        bal.observe(z, sel, 2)
        assert sel[0] == 0
    assert np.all(bal.bias == 0)


def test_eligibility_and_expected_share():
    el = eligible(np.array([[1.0, 0.5, -1.0]]), 0.6)[0]
    assert el.tolist() == [True, True, False]
    assert expected_share(el, 1).tolist() == [0.5, 0.5, 0.0]
    assert expected_share(el, 3).tolist() == [1.0, 1.0, 0.0]


def test_load_figures():
    f = load_figures(np.array([10.0, 10.0, 10.0]))
    assert f["cv"] == 0 and f["max_over_mean"] == 1
    f = load_figures(np.array([30.0, 0.0, 0.0]))
    assert f["max_over_mean"] == pytest.approx(3.0) and f["cv"] == pytest.approx(np.sqrt(2))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 60), st.integers(1, 6), st.integers(0, 10))
def test_kmeans_gives_unit_centroids_no_more_than_points(n, k, seed):
    X = unit(np.random.default_rng(seed), n)
    _, C = kmeans(X, k, seed=seed)
    assert C.shape == (min(k, n), X.shape[1])
    assert np.allclose(np.linalg.norm(C, axis=1), 1.0, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=30), st.integers(0, 100))
def test_max_per_owner_equals_loop(owner, seed):
    owner = np.array(owner, dtype=np.int32)
    S = np.random.default_rng(seed).normal(size=(3, len(owner))).astype(np.float32)
    got = max_per_owner(S, owner, 6)
    for e in range(6):
        cols = owner == e
        want = S[:, cols].max(axis=1) if cols.any() else np.full(3, -1.0)
        assert np.allclose(got[:, e], want)


def test_multi_centroids_grow_with_expert_size():
    rng = np.random.default_rng(1)
    groups = [unit(rng, 5), unit(rng, 100), unit(rng, 1000)]
    C, owner = multi_centroids(groups, docs_per_centroid=25, max_centroids=8)
    assert np.bincount(owner).tolist() == [1, 4, 8]


def test_tree_cuts_cycles_and_paths_walk_from_the_root():
    t = Tree([1, 2, 3, 4, 5], [None, 1, 2, 5, 4])  # 4 <-> 5 is a cycle
    assert t.path(3) == [1, 2, 3]
    assert t.parent_[4] is None or t.parent_[5] is None
    assert set(t.subtree(1)) == {1, 2, 3}
    assert t.has_structure()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 1000), st.integers(1, 4))
def test_beam_over_the_tree_is_consistent_with_node_scores(seed, width):
    rng = np.random.default_rng(seed)
    # 4 parents x 3 leaves; a parent's centroids derive from its children
    ids = list(range(1, 5)) + list(range(10, 22))
    parents = [None] * 4 + [1 + (i // 3) for i in range(12)]
    t = Tree(ids, parents)
    leaf = {i: unit(rng, 2) for i in range(10, 22)}
    nodes = node_centroids(t, leaf, k=4)
    for p in range(1, 5):
        kids = np.concatenate([leaf[c] for c in t.children_[p]])
        # every parent centroid lies in the cone of its children's centroids: close to at least one
        assert np.all((nodes[p] @ kids.T).max(axis=1) > 0.3)
    q = unit(rng, 1)[0]

    def score(ns):
        return np.array([float((nodes[n] @ q).max()) for n in ns])

    cands, scored = beam_candidates(t, score, set(leaf), width)
    parent_scores = score([1, 2, 3, 4])
    kept = set(np.argsort(-parent_scores, kind="stable")[:width] + 1)
    assert set(cands) == {c for p in kept for c in t.children_[p]}
    assert len(cands) == 3 * min(width, 4)
    assert set(scored) >= {1, 2, 3, 4}
    if width >= 4:
        assert set(cands) == set(leaf)


def test_lexical_index_prefers_the_expert_with_the_words():
    idx = LexicalIndex().fit([["how to reset my password", "password reset link expired"],
                              ["bake bread with sourdough", "bread crust too hard"]],
                             keywords=[["login"], []], descriptions=["account help", "baking"])
    s = idx.score(["I forgot my password", "crusty bread", "login problem", "zzz qqq", "<vector>"])
    assert s[0, 0] > s[0, 1] and s[1, 1] > s[1, 0] and s[2, 0] > s[2, 1]
    assert np.all(s[3:] == 0)  # no known n-gram: no evidence either way
    back = LexicalIndex.from_arrays(idx.to_arrays())
    assert np.array_equal(back.score(["password bread"]), idx.score(["password bread"]))
    assert tokenize("The passwords' resets, batteries and glass!") == ["the", "password", "reset", "battery", "and",
                                                                       "glass"]
    assert idx.top_terms("password reset", 0)[0][0] in ("password", "reset", "password reset")
    assert idx.top_terms("the password", 0)[0][0] == "password"  # function words never explain a decision


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.text(alphabet="abcde ", min_size=1, max_size=30), min_size=1, max_size=5),
                min_size=2, max_size=4),
       st.text(alphabet="abcde ", max_size=30))
def test_lexical_index_is_naive_bayes(experts, query):
    """The sparse scores equal the dense multinomial NB log-likelihood ratio against a uniform model."""
    from moedb.routing.lexical import grams

    idx = LexicalIndex(alpha=0.1).fit(experts)
    V, E = len(idx.vocab_), len(experts)
    got = idx.score([query])[0]
    pos = {k: i for i, k in enumerate(idx.vocab_.tolist())}
    # dense reference: summed unit tf-idf vectors per expert, smoothed, log(V * theta)
    def vec(text):
        x = np.zeros(V)
        for k, c in grams(text).items():
            if k in pos:
                x[pos[k]] = (1 + np.log(c)) * idx.idf_[pos[k]]
        n = np.linalg.norm(x)
        return x / n if n else x
    C = np.stack([sum((vec(t) for t in docs), np.zeros(V)) for docs in experts], axis=1)
    theta = (C + 0.1) / (C.sum(axis=0) + 0.1 * V)
    want = vec(query) @ np.log(V * theta) if V else np.zeros(E)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_calibration_figures():
    assert ece(np.array([1.0, 1.0]), np.array([True, True])) == 0.0
    assert ece(np.array([0.9] * 10), np.array([True] * 5 + [False] * 5)) == pytest.approx(0.4)
    c = np.linspace(0, 1, 101)
    assert abstain_threshold(c, 0.03) == pytest.approx(0.03)
    assert abstain_threshold(c, 0.0) == 0.0


def test_fit_mix_learns_to_trust_the_informative_signal():
    rng = np.random.default_rng(0)
    n, E = 400, 5
    y = rng.integers(0, E, n)
    good = rng.normal(size=(n, E))
    good[np.arange(n), y] += 3.0
    noise = rng.normal(size=(n, E))
    a = fit_mix([good, noise], y)
    assert a[0] > 0.5 and a[0] > 5 * a[1]


def clusters(rng, E, n, d=24, spread=0.35):
    centers = unit(rng, E, d)
    groups = []
    for c in centers:
        x = c + spread * rng.normal(size=(n, d)) / np.sqrt(d)
        groups.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return centers, groups


def test_hybrid_gate_is_accurate_calibrated_and_round_trips():
    rng = np.random.default_rng(3)
    centers, groups = clusters(rng, 6, 40)
    g = HybridGate(refuse_rate=0.05).fit(groups, texts=None)
    f = g.figures_
    assert f["heldout_accuracy"] > 0.95 and f["heldout_ece"] < 0.1
    assert 0.0 < f["heldout_refused"] <= 0.1 and 0 < g.threshold_ < 1
    _, test = clusters(np.random.default_rng(3), 6, 40)
    Q = np.concatenate(test)
    y = np.repeat(np.arange(6), 40)
    P = g.confidence(Q)
    assert (P.argmax(1) == y).mean() > 0.95
    back = HybridGate.from_bytes(g.to_bytes())
    assert np.allclose(back.confidence(Q), P)
    assert back.threshold_ == g.threshold_
    # scoring a subset of columns gives the same centroid and lexical signals for those columns
    cols = np.array([1, 4])
    sub = g.raw(Q[:3], None, cols=cols)
    full = g.raw(Q[:3], None)
    assert np.allclose(sub["centroid"], full["centroid"][:, cols])


def test_feedback_examples_move_the_gate_both_ways():
    rng = np.random.default_rng(11)
    centers, groups = clusters(rng, 3, 30)
    mid = unit(rng, 1, 24)[0] * 0.2 + (centers[0] + centers[1]) / 2
    mid = (mid / np.linalg.norm(mid)).astype(np.float32)
    base = HybridGate(folds=0).fit(groups).confidence(mid[None])[0]
    pos = (np.repeat(mid[None], 20, 0), np.full(20, 1), np.ones(20))
    up = HybridGate(folds=0).fit(groups, feedback=pos).confidence(mid[None])[0]
    assert up[1] > base[1] and up.argmax() == 1
    neg = (np.repeat(mid[None], 20, 0), np.full(20, int(base.argmax())), -np.ones(20))
    down = HybridGate(folds=0).fit(groups, feedback=neg).confidence(mid[None])[0]
    assert down[base.argmax()] < base[base.argmax()]


def test_softmax_regression_minimises_the_stated_objective():
    """The in-place float32 gradient reaches the optimum of a plain float64 reference of the same loss
    (C * weighted NLL + counter-examples' -log(1 - p), ridge on W)."""
    from scipy.optimize import minimize

    from moedb.routing.logreg import SoftmaxRegression

    rng = np.random.default_rng(3)
    n, d, E = 240, 8, 5
    X = unit(rng, n, d)
    y = rng.integers(0, E, n)
    w = rng.uniform(0.2, 2.0, n)
    Xn, yn, wn = X[:15], (y[:15] + 1) % E, rng.uniform(0.5, 1.5, 15)
    C = 5.0
    total = w.sum() + wn.sum()

    def reference(theta):
        W, b = theta[:d * E].reshape(d, E), theta[d * E:]
        lp = log_softmax(X.astype(np.float64) @ W + b)
        lpn = log_softmax(Xn.astype(np.float64) @ W + b)
        pe = np.exp(lpn[np.arange(len(Xn)), yn])
        return (-(w * lp[np.arange(n), y]).sum() - (wn * np.log1p(-pe)).sum()) / total \
            + 0.5 / (C * total) * (W * W).sum()

    m = SoftmaxRegression(C=C, max_iter=500, tol=1e-8).fit(X, y, E, sample_weight=w, X_neg=Xn, y_neg=yn, w_neg=wn)
    ref = minimize(reference, np.zeros(d * E + E), method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-10})
    ours = np.concatenate([m.coef_.ravel(), m.intercept_]).astype(np.float64)
    assert reference(ours) <= ref.fun + 1e-6
    # the intercepts are only determined up to a shift (no ridge on them): compare the logits
    assert np.allclose(X @ m.coef_ + m.intercept_ - (X @ m.coef_ + m.intercept_).mean(1, keepdims=True),
                       X @ ref.x[:d * E].reshape(d, E) + ref.x[d * E:]
                       - (X @ ref.x[:d * E].reshape(d, E) + ref.x[d * E:]).mean(1, keepdims=True), atol=2e-3)
