"""Odd input at the library's edges gives moedb errors, never other exceptions (issue 15, items 4 and 11):
lone surrogates in names, texts and queries; non-integer limits and query ids; huge query ids; a feedback
line nested 100k deep; very long queries are bounded in the query log."""
from __future__ import annotations

import json

import numpy as np
import pytest

import moedb
from moedb.errors import InvalidInput
from moedb.engine.route import LOG_QUERY_CHARS


class ToyEmbedder:
    """A deterministic 4-d embedder (the real one is not what these tests are about)."""

    name, dim = "toy", 4

    def embed(self, texts):
        return np.array([[1.0 + len(t) % 3, 1.0, sum(map(ord, t[:50])) % 7 + 1.0, 0.5] for t in texts])


@pytest.fixture
def db():
    d = moedb.connect(":memory:", embedder=ToyEmbedder())
    d.add_expert("a", ["alpha text", "more alpha"])
    d.add_expert("b", ["beta text", "more beta"])
    yield d
    d.close()


def test_lone_surrogates_are_refused_where_they_enter(db):
    with pytest.raises(InvalidInput, match="Unicode"):
        db.add_expert("bad\ud800", ["x"])
    with pytest.raises(InvalidInput, match="Unicode"):
        db.add_documents("a", ["text \udc80"])
    with pytest.raises(InvalidInput, match="Unicode"):
        db.route("query \ud800")
    with pytest.raises(InvalidInput, match="Unicode"):
        db.feedback("query \ud800", "a", 1)
    assert [e.name for e in db.experts()] == ["a", "b"] and db.expert("a").size == 2


@pytest.mark.parametrize("call", [lambda d: d.documents("a", limit="x"), lambda d: d.documents("a", offset=-1),
                                  lambda d: d.query_log("x"), lambda d: d.query_log(10**30),
                                  lambda d: d.feedback(10**30, "a", 1)])
def test_bad_numbers_are_moedb_errors(db, call):
    with pytest.raises(InvalidInput):
        call(db)


def test_a_pathological_feedback_line_is_skipped_and_the_job_goes_on(db, tmp_path):
    r = db.route("alpha text")
    lines = [json.dumps({"query_id": r.query_id, "expert": "a", "reward": 1}),
             "[" * 100_000,
             json.dumps({"query_id": 10**30, "expert": "a", "reward": 1}),
             json.dumps({"query": "x\ud800", "expert": "a", "reward": 1}),
             json.dumps({"query": "more beta", "expert": "b", "reward": 1})]
    f = tmp_path / "events.jsonl"
    f.write_text("\n".join(lines) + "\n")
    out = db.ingest_feedback(f)
    assert out["taken"] == 2 and out["skipped"] == 3, out
    assert [e["line"] for e in out["errors"]] == [2, 3, 4]


def test_the_log_keeps_a_bounded_query(db):
    r = db.route("alpha " * 10_000, min_confidence=0.0)
    assert len(db.query_log(r.query_id)["query"]) == LOG_QUERY_CHARS


def test_cli_damaged_files_and_bad_options_are_one_error_line(tmp_path):
    """A truncated database, a device as database, a bad --on-conflict and a non-UTF-8 YAML file: one
    ``error:`` line and exit 1, never a traceback (issue 15, item 3)."""
    from conftest import run_cli

    good = tmp_path / "good.db"
    notes = tmp_path / "notes.md"
    notes.write_text("Comets have icy nuclei.\n\nTheir tails point away from the Sun.\n")
    assert run_cli(["add-expert", "comets", str(notes), "--no-refit"], str(good)).returncode == 0
    run_cli(["list"], str(good))  # (checkpoints the WAL into the file)
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(good.read_bytes()[:5000])
    yaml_dir = tmp_path / "yaml"
    yaml_dir.mkdir()
    (yaml_dir / "x.yaml").write_bytes(b"name: caf\xe9\n")
    cases = [(["list"], str(truncated)), (["list"], "/dev/null"),
             (["add-docs", "comets", str(notes), "--on-conflict", "bogus"], str(good)),
             (["apply", str(yaml_dir)], str(tmp_path / "y.db"))]
    for args, db in cases:
        r = run_cli(args, db)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.startswith("error: "), (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_another_applications_sqlite_file_is_refused_and_left_byte_identical(tmp_path):
    """Issue 15, item 10: no WAL switch, no moedb tables, no raw SQLError for a clash of table names."""
    import hashlib
    import sqlite3

    for table in ("users", "experts"):
        path = tmp_path / f"other_{table}.db"
        con = sqlite3.connect(path)
        con.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT)")
        con.execute(f"INSERT INTO {table}(name) VALUES ('kept')")
        con.commit()
        con.close()
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        with pytest.raises(moedb.MoedbError, match="another application"):
            moedb.connect(str(path), embedder=moedb.VectorsOnly(4))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before
        assert not (tmp_path / f"other_{table}.db-wal").exists()
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()  # an empty SQLite file is fine: it becomes a moedb file
    moedb.connect(str(empty), embedder=moedb.VectorsOnly(4)).close()
