"""Vector values at the edges of float32 (issue 15, item 1): refused with a moedb error where float32 cannot
hold them, normalised correctly where it can, and never stored as NaN or zero rows."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moedb
from moedb.errors import InvalidVector
from moedb.vectors import as_matrix, normalize


@pytest.fixture
def vdb():
    db = moedb.connect(":memory:", embedder=moedb.VectorsOnly(4))
    db.add_expert("a", ["x"], vectors=np.eye(4)[:1])
    db.add_expert("b", ["y"], vectors=np.eye(4)[1:2])
    yield db
    db.close()


@pytest.mark.parametrize("value", [1e39, -1e39, 1e300])
def test_values_beyond_float32_are_refused_and_change_nothing(vdb, value):
    before = vdb.expert("a").size
    with pytest.raises(InvalidVector, match="float32 range"):
        vdb.add_documents("a", ["huge"], vectors=np.full((1, 4), value))
    assert vdb.expert("a").size == before and np.isfinite(vdb.expert("a").centroid).all()
    with pytest.raises(InvalidVector, match="float32 range"):
        vdb.route(np.full(4, value))


def test_complex_vectors_are_refused(vdb):
    with pytest.raises(InvalidVector, match="complex"):
        vdb.add_documents("a", ["c"], vectors=np.ones((1, 4)) * (1 + 2j))


@pytest.mark.parametrize("value", [3e38, 1e-25])
def test_large_and_tiny_float32_values_normalise(vdb, value):
    vdb.add_documents("a", [f"v{value}"], vectors=np.full((1, 4), value))
    hits = vdb.search(np.full(4, 1.0), k=3)
    stored = [h for h in hits if h.id != "x" and h.expert == "a"]
    assert stored and stored[0].score == pytest.approx(1.0, abs=1e-6)  # a unit vector, not zero or NaN
    assert np.isfinite(vdb.expert("a").centroid).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=8))
def test_normalize_gives_unit_rows_for_any_nonzero_float32_row(xs):
    a = as_matrix(np.array(xs, dtype=np.float32), None)
    if not np.any(a):
        with pytest.raises(InvalidVector):
            normalize(a)
        return
    u = normalize(a)
    assert u.dtype == np.float32 and np.isfinite(u).all()
    assert np.linalg.norm(u.astype(np.float64)) == pytest.approx(1.0, abs=1e-5)
