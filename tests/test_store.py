"""The store: migrations, round-trips, centroids, transactions, bad input (no text model needed)."""
from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import moedb
from moedb.store import connection as dbmod
from moedb.errors import (DimensionMismatch, DuplicateDocument, DuplicateExpert, EmbedderMismatch, InvalidInput,
                          InvalidVector, SchemaError, UnknownExpert)

DIM = 8


def vdb(path, dim=DIM):
    return moedb.connect(path, embedder=moedb.VectorsOnly(dim))


def snapshot(path: str) -> str:
    """A digest of every table's content (what 'the file is unchanged' means); virtual tables (the
    vector and text indexes) count through their shadow tables, which hold their data."""
    import apsw

    c = apsw.Connection(path)
    h = hashlib.sha256()
    for (name,) in c.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
                             "AND sql NOT LIKE 'CREATE VIRTUAL%' ORDER BY name").fetchall():
        for row in sorted(repr(r) for r in c.execute(f'SELECT * FROM "{name}"').fetchall()):
            h.update(row.encode())
    c.close()
    return h.hexdigest()


def unit(rng, n, dim=DIM):
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ---------------------------------------------------------------------------- migrations
def test_fresh_file_is_wal_and_records_migrations(db_path):
    with vdb(db_path) as d:
        assert d.store.q1("PRAGMA journal_mode")[0].lower() == "wal"
        rows = d.store.q("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
        shipped = dbmod.migrations()
        assert [(m.version, m.name, m.checksum) for m in shipped] == rows
        assert {m.kind for m in shipped} == {"sql", "py"}
        assert d.store.q1("SELECT vec_version()")[0].startswith("v")  # sqlite-vec is loaded


def test_newer_schema_is_refused(db_path):
    with vdb(db_path) as d:
        d.store.conn.execute("INSERT INTO schema_migrations VALUES (9999, 'future', 'x', 0)")
    with pytest.raises(SchemaError, match="newer moedb"):
        vdb(db_path)


def test_edited_migration_is_detected(db_path):
    with vdb(db_path) as d:
        d.store.conn.execute("UPDATE schema_migrations SET checksum='tampered' WHERE version=1")
    with pytest.raises(SchemaError, match="edited"):
        vdb(db_path)


def test_not_a_database(tmp_path):
    p = tmp_path / "junk.db"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(moedb.MoedbError, match="not a SQLite database|cannot open"):
        vdb(str(p))


def test_embedder_recorded_and_enforced(db_path):
    with vdb(db_path, dim=8) as d:
        assert d.store.get_meta("embedder")["dim"] == 8
    with pytest.raises(EmbedderMismatch, match="dimension 8"):
        vdb(db_path, dim=16)
    with pytest.raises(EmbedderMismatch):
        moedb.connect(db_path, embedder=moedb.VectorsOnly(8, name="other-model"))
    with moedb.connect(db_path) as d:  # embedder=None reopens with the recorded one
        assert d.dim == 8 and isinstance(d.embedder, moedb.VectorsOnly)


# ---------------------------------------------------------------------------- round trips
def test_vectors_and_metadata_round_trip(db_path):
    rng = np.random.default_rng(0)
    v = unit(rng, 3)
    md = [{"lang": "en", "n": 1}, {"nested": {"a": [1, 2]}, "ü": "ö"}, {}]
    docs = [{"text": f"doc {i}", "id": f"d{i}", "metadata": md[i], "source": "s.txt", "position": i} for i in range(3)]
    with vdb(db_path) as d:
        d.add_expert("e", docs, vectors=v, description="desc", keywords=["k1", "k2"])
    with vdb(db_path) as d:
        e = d.expert("e")
        assert (e.description, e.keywords, e.size) == ("desc", ["k1", "k2"], 3)
        got = d.documents("e")
        assert [g["metadata"] for g in got] == md
        assert [(g["id"], g["source"], g["position"]) for g in got] == [(f"d{i}", "s.txt", i) for i in range(3)]
        _, m = d.store.documents.vectors_of(d.store.experts.id_of("e"))
        from moedb.vectors import normalize

        np.testing.assert_allclose(m, v, atol=1e-6)
        np.testing.assert_array_equal(m, normalize(v))  # stored exactly as the normalised <f4
        raw = d.store.q1("SELECT embedding FROM documents WHERE doc_id='d0'")[0]
        assert raw == normalize(v)[0].astype("<f4").tobytes()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vecs=arrays(np.float32, (4, DIM), elements=st.floats(-1e3, 1e3, width=32)).filter(
    lambda a: (np.linalg.norm(a, axis=1) > 1e-3).all()))
def test_property_vector_round_trip_is_normalised_exactly(tmp_path, vecs):
    p = str(tmp_path / f"p{uuid.uuid4().hex}.db")
    with vdb(p) as d:
        d.add_expert("e", [f"t{i}" for i in range(4)], vectors=vecs)
        _, m = d.store.documents.vectors_of(d.store.experts.id_of("e"))
    expected = vecs.astype(np.float32) / np.linalg.norm(vecs.astype(np.float32), axis=1, keepdims=True)
    np.testing.assert_allclose(m, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-6)


ops = st.lists(st.tuples(st.sampled_from(["add", "remove"]), st.integers(1, 5), st.integers(0, 2**31 - 1)),
               min_size=1, max_size=12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=ops)
def test_property_centroid_is_mean_of_current_members(tmp_path, sequence):
    p = str(tmp_path / f"c{uuid.uuid4().hex}.db")
    members: dict[str, np.ndarray] = {}
    counter = 0
    with vdb(p) as d:
        d.add_expert("e")
        for op, n, seed in sequence:
            rng = np.random.default_rng(seed)
            if op == "add":
                ids = [f"x{counter + i}" for i in range(n)]
                counter += n
                v = unit(rng, n)
                d.add_documents("e", [{"text": i, "id": i} for i in ids], vectors=v)
                members.update(zip(ids, v))
            elif members:
                drop = list(rng.choice(sorted(members), size=min(n, len(members)), replace=False))
                assert d.remove_documents("e", drop) == len(drop)
                for i in drop:
                    members.pop(i)
            e = d.expert("e")
            assert e.size == len(members)
            if members:
                np.testing.assert_allclose(e.centroid, np.mean(list(members.values()), axis=0), atol=1e-5)
            else:
                assert e.centroid is None
    with vdb(p) as d:  # and it survives reopening
        e = d.expert("e")
        if members:
            np.testing.assert_allclose(e.centroid, np.mean(list(members.values()), axis=0), atol=1e-5)


# ---------------------------------------------------------------------------- bad input leaves the file unchanged
def test_bad_input_each_clear_and_file_unchanged(db_path, tmp_path):
    rng = np.random.default_rng(1)
    with vdb(db_path) as d:
        d.add_expert("a", ["one", "two"], vectors=unit(rng, 2), parent=None)
    before = snapshot(db_path)
    nan = unit(rng, 2)
    nan[1, 3] = np.nan
    inf = unit(rng, 1)
    inf[0, 0] = np.inf
    unreadable = tmp_path / "secret.txt"
    unreadable.write_bytes(b"\xff\xfe\xfa not utf-8 \xff")
    cases = [
        (lambda d: d.add_documents("nope", ["x"], vectors=unit(rng, 1)), UnknownExpert, "unknown expert: 'nope'"),
        (lambda d: d.add_expert("a", ["x"], vectors=unit(rng, 1)), DuplicateExpert, "already exists"),
        (lambda d: d.add_documents("a", ["ok", "  "], vectors=unit(rng, 2)), InvalidInput, "document #1: empty"),
        (lambda d: d.add_documents("a", ["x"], vectors=unit(rng, 1, dim=5)), DimensionMismatch, "dimension 5"),
        (lambda d: d.add_documents("a", ["x", "y"], vectors=nan), InvalidVector, "row 1 contains NaN"),
        (lambda d: d.add_documents("a", ["x"], vectors=inf), InvalidVector, "NaN or infinity"),
        (lambda d: d.add_documents("a", [{"text": "one", "id": next(iter([r["id"] for r in d.documents("a")]))}],
                                   vectors=unit(rng, 1)), DuplicateDocument, "already exists"),
        (lambda d: d.add_files("a", [str(unreadable)]), moedb.FileProblem, "cannot read"),
        (lambda d: d.add_files("a", [str(tmp_path / "missing.md")]), moedb.FileProblem, "no such file"),
        (lambda d: d.add_expert("b", parent="ghost"), UnknownExpert, "parent expert: 'ghost'"),
        (lambda d: d.add_expert("  ", ["x"]), InvalidInput, "non-empty"),
        (lambda d: d.route("   "), InvalidInput, "query is empty"),
        (lambda d: d.route(unit(rng, 1, dim=3)[0]), DimensionMismatch, "dimension 3"),
        (lambda d: d.route(np.full(DIM, np.nan)), InvalidVector, "NaN"),
        (lambda d: d.route(unit(rng, 1)[0], top_k=0), InvalidInput, "top_k"),
        (lambda d: d.remove_expert("nope"), UnknownExpert, "nope"),
    ]
    with vdb(db_path) as d:
        for fn, exc, msg in cases:
            with pytest.raises(exc, match=msg):
                fn(d)
    assert snapshot(db_path) == before


def test_failure_mid_batch_rolls_back_everything(db_path):
    """An error raised by SQLite while writing doc 5,000 of 10,000 leaves the file as before the call."""
    import apsw

    rng = np.random.default_rng(2)
    with vdb(db_path) as d:
        d.add_expert("a", ["seed"], vectors=unit(rng, 1))
    before = snapshot(db_path)
    with vdb(db_path) as d:
        d.store.conn.execute(
            "CREATE TEMP TRIGGER boom BEFORE INSERT ON main.documents "
            "WHEN (SELECT count(*) FROM main.documents) >= 5000 BEGIN SELECT RAISE(ABORT, 'simulated crash'); END")
        with pytest.raises(apsw.ConstraintError, match="simulated crash"):
            d.add_documents("a", [f"doc {i}" for i in range(10_000)], vectors=unit(rng, 10_000))
        d.store.conn.execute("DROP TRIGGER boom")
        assert d.expert("a").size == 1
    assert snapshot(db_path) == before


def test_crash_of_the_process_mid_ingest_leaves_file_as_before(db_path, tmp_path):
    """A real process killed (os._exit) inside the transaction: nothing of the call is in the file."""
    import subprocess
    import sys
    import textwrap

    rng = np.random.default_rng(3)
    with vdb(db_path) as d:
        d.add_expert("a", ["seed"], vectors=unit(rng, 1))
    before = snapshot(db_path)
    script = textwrap.dedent(f"""
        import os, numpy as np, moedb
        d = moedb.connect({db_path!r}, embedder=moedb.VectorsOnly({DIM}))
        orig = d.store.documents.insert
        def crashing(eid, rows, vecs, on_conflict="error"):
            # write half of the rows, then die without commit or rollback
            cur = d.store.conn.cursor()
            d.store.conn.execute("BEGIN IMMEDIATE")
            for i, (did, text, md, src, pos) in enumerate(rows[: len(rows) // 2]):
                cur.execute("INSERT INTO documents(expert_id, doc_id, text, metadata, source, position, embedding,"
                            " created_at) VALUES (?,?,?,?,?,?,?,0)", (eid, did, text, "{{}}", src, pos,
                            vecs[i].tobytes()))
            os._exit(9)
        d.store.documents.insert = crashing
        v = np.random.default_rng(0).normal(size=(10000, {DIM}))
        d.add_documents("a", [f"doc {{i}}" for i in range(10000)], vectors=v)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    assert snapshot(db_path) == before
    with vdb(db_path) as d:
        assert d.expert("a").size == 1
        assert d.store.documents.count() == 1


def test_remove_expert_detaches_children_and_drops_documents(db_path):
    rng = np.random.default_rng(4)
    with vdb(db_path) as d:
        d.add_expert("parent", ["p"], vectors=unit(rng, 1))
        d.add_expert("child", ["c"], vectors=unit(rng, 1), parent="parent")
        assert d.expert("child").parent == "parent"
        d.remove_expert("parent")
        assert d.expert("child").parent is None
        assert [e.name for e in d.experts()] == ["child"]
        assert d.store.documents.count() == 1


def test_parent_cycle_refused(db_path):
    with vdb(db_path) as d:
        d.add_expert("a")
        d.add_expert("b", parent="a")
        d.add_expert("c", parent="b")
        before = snapshot(db_path)
        with pytest.raises(InvalidInput, match="cycle"):
            d.update_expert("a", parent="c")
        with pytest.raises(InvalidInput, match="cycle"):
            d.update_expert("a", parent="a")
    assert snapshot(db_path) == before


def test_on_conflict_skip_and_replace(db_path):
    rng = np.random.default_rng(5)
    v = unit(rng, 2)
    with vdb(db_path) as d:
        d.add_expert("a", [{"text": "x", "id": "1"}], vectors=v[:1])
        assert d.add_documents("a", [{"text": "x2", "id": "1"}], vectors=v[1:], on_conflict="skip") == 0
        assert d.documents("a")[0]["text"] == "x"
        assert d.add_documents("a", [{"text": "x2", "id": "1"}], vectors=v[1:], on_conflict="replace") == 1
        assert d.documents("a")[0]["text"] == "x2"
        assert d.expert("a").size == 1
        np.testing.assert_allclose(d.expert("a").centroid, v[1], atol=1e-6)
