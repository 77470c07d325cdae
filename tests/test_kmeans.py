"""Property tests of moedb's one k-means (scikit-learn on unit vectors) and of the split's choice of k."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moedb.errors import InvalidInput
from moedb.routing.kmeans import choose_clusters, kmeans, multi_centroids, unit_rows


def unit(rng, n, d=16):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def blobs(k, per, d=24, spread=0.05, seed=0):
    """``k`` tight groups of ``per`` unit vectors around random directions, and their true labels."""
    rng = np.random.default_rng(seed)
    centers = unit(rng, k, d)
    X = np.repeat(centers, per, axis=0) + spread * rng.normal(size=(k * per, d)).astype(np.float32)
    return unit_rows(X), np.repeat(np.arange(k), per)


def same_partition(a, b) -> bool:
    """Whether two labellings split the rows the same way (up to renaming the clusters)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 9), st.integers(0, 1000))
def test_labels_in_range_and_centroids_unit(n, k, seed):
    X = unit(np.random.default_rng(seed), n)
    labels, C = kmeans(X, k, seed=seed)
    kk = min(k, n)
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert C.shape == (kk, X.shape[1]) and C.dtype == np.float32
    assert labels.min() >= 0 and labels.max() < kk
    assert len(np.unique(labels)) == kk  # no empty cluster
    assert np.allclose(np.linalg.norm(C, axis=1), 1.0, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 80), st.integers(1, 8), st.integers(0, 1000))
def test_deterministic_for_a_seed(n, k, seed):
    X = unit(np.random.default_rng(seed + 1), n)
    a, ca = kmeans(X, k, seed=seed)
    b, cb = kmeans(X, k, seed=seed)
    assert np.array_equal(a, b) and np.array_equal(ca, cb)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 8), st.integers(0, 100))
def test_duplicate_rows_give_no_more_clusters_than_distinct_rows(distinct, k, seed):
    rng = np.random.default_rng(seed)
    X = np.repeat(unit(rng, distinct), 5, axis=0)
    labels, C = kmeans(X, k, seed=seed)
    assert len(C) == min(k, distinct) == len(np.unique(labels))
    assert np.allclose(np.linalg.norm(C, axis=1), 1.0, atol=1e-5)


def test_empty_and_single_cluster():
    labels, C = kmeans(np.zeros((0, 5), np.float32), 3)
    assert labels.shape == (0,) and C.shape == (0, 5)
    X = unit(np.random.default_rng(0), 7)
    labels, C = kmeans(X, 1)
    assert (labels == 0).all()
    assert np.allclose(C[0], unit_rows(X.mean(axis=0, keepdims=True))[0], atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 8), st.integers(3, 20), st.integers(0, 1000))
def test_well_separated_clusters_recovered_exactly(k, per, seed):
    X, truth = blobs(k, per, seed=seed)
    rng = np.random.default_rng(seed)
    while np.max(np.triu(unit_rows(X[::per]) @ unit_rows(X[::per]).T, 1)) > 0.7:  # resample close centres
        X, truth = blobs(k, per, seed=int(rng.integers(1 << 30)))
    # a few starts, as the split uses: one k-means++ start can still merge two groups now and then
    labels, C = kmeans(X, k, seed=seed, n_init=4, max_iter=300)
    assert same_partition(labels, truth)
    # each centroid is the normalised mean of its group
    for j in range(k):
        want = unit_rows(X[labels == j].mean(axis=0, keepdims=True))[0]
        assert np.allclose(C[j], want, atol=1e-4)


def test_multi_centroids_count_and_owner():
    rng = np.random.default_rng(1)
    groups = [unit(rng, 5), np.zeros((0, 16), np.float32), unit(rng, 100), unit(rng, 1000)]
    C, owner = multi_centroids(groups, docs_per_centroid=25, max_centroids=8)
    assert C.dtype == np.float32 and owner.dtype == np.int32
    assert np.bincount(owner, minlength=4).tolist() == [1, 0, 4, 8]
    assert np.allclose(np.linalg.norm(C, axis=1), 1.0, atol=1e-5)
    C2, owner2 = multi_centroids(groups, docs_per_centroid=25, max_centroids=8)
    assert np.array_equal(C, C2) and np.array_equal(owner, owner2)


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 6), st.integers(0, 1000))
def test_choose_clusters_picks_the_true_k_on_separated_blobs(k, seed):
    X, truth = blobs(k, 30, d=32, spread=0.03, seed=seed)
    rng = np.random.default_rng(seed)
    while np.max(np.triu(unit_rows(X[::30]) @ unit_rows(X[::30]).T, 1)) > 0.7:
        X, truth = blobs(k, 30, d=32, spread=0.03, seed=int(rng.integers(1 << 30)))
    labels, chosen, sil = choose_clusters(X, None, max_n=8, seed=seed)
    assert chosen == k and max(sil, key=sil.get) == k
    assert labels.dtype == np.int64 and same_partition(labels, truth)
    # a given n is used as is
    labels, chosen, sil = choose_clusters(X, k, seed=seed)
    assert chosen == k and same_partition(labels, truth) and set(sil) == {k}


def test_choose_clusters_refuses_impossible_splits():
    X = np.repeat(unit(np.random.default_rng(0), 2), 3, axis=0)
    with pytest.raises(InvalidInput):
        choose_clusters(X, 3)
    with pytest.raises(InvalidInput):
        choose_clusters(np.repeat(X[:1], 4, axis=0), None)
