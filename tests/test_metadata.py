"""Metadata the file cannot store as JSON is refused with a moedb error naming it, where it enters
(issue 15, item 2): add_expert, update_expert, documents, YAML expert files."""
from __future__ import annotations

import datetime
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moedb
from moedb.errors import InvalidInput, MoedbError
from conftest import run_cli


@pytest.fixture
def vdb():
    db = moedb.connect(":memory:", embedder=moedb.VectorsOnly(4))
    db.add_expert("a", ["x"], vectors=np.eye(4)[:1], metadata={"team": "data"})
    yield db
    db.close()


@pytest.mark.parametrize("bad, says", [
    ({"d": datetime.date(2024, 1, 1)}, "date"),
    ({1: "int key"}, "not a string"),
    ({None: "none key"}, "not a string"),
    ({"x": math.nan}, "NaN"),
    ({"x": [1, math.inf]}, "NaN or infinity"),
    ({"s": "\ud800"}, "surrogate"),
    ({"b": b"bytes"}, "bytes"),
    ({"o": object()}, "object"),
])
def test_unstorable_metadata_is_refused_everywhere_and_changes_nothing(vdb, bad, says):
    with pytest.raises(InvalidInput, match=says):
        vdb.add_expert("b", ["y"], vectors=np.eye(4)[1:2], metadata=bad)
    with pytest.raises(InvalidInput, match=says):
        vdb.update_expert("a", metadata=bad)
    with pytest.raises(InvalidInput, match=says):
        vdb.add_documents("a", [{"text": "z", "metadata": bad}], vectors=np.eye(4)[2:3])
    assert [e.name for e in vdb.experts()] == ["a"]
    assert vdb.expert("a").metadata == {"team": "data"} and vdb.expert("a").size == 1


def test_metadata_must_be_a_mapping_for_update_too(vdb):
    with pytest.raises(InvalidInput, match="must be a dict"):
        vdb.update_expert("a", metadata=["not", "a", "dict"])


def test_deep_nesting_is_a_moedb_error_not_a_recursion_error(vdb):
    deep: dict = {}
    cur = deep
    for _ in range(5000):
        cur["k"] = {}
        cur = cur["k"]
    with pytest.raises(InvalidInput, match="nested deeper"):
        vdb.update_expert("a", metadata=deep)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats() | st.text() | st.dates() | st.binary(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text() | st.integers(), kids, max_size=4),
    max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(md=st.dictionaries(st.text() | st.integers() | st.none(), json_values, max_size=5))
def test_any_metadata_is_stored_and_read_back_or_refused(vdb, md):
    try:
        vdb.update_expert("a", metadata=md)
    except MoedbError:
        assert vdb.expert("a").metadata == {"team": "data"}  # a refused call changed nothing
        return
    assert vdb.expert("a").metadata == md
    vdb.update_expert("a", metadata={"team": "data"})


def test_yaml_metadata_with_a_date_is_one_error_line(tmp_path):
    folder = tmp_path / "experts"
    folder.mkdir()
    (folder / "sql.yaml").write_text("name: sql\ndescription: SQL\nmetadata: {released: 2024-01-01}\n")
    r = run_cli(["apply", str(folder)], str(tmp_path / "x.db"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and "released" in r.stderr and len(r.stderr.splitlines()) == 1
