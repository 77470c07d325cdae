"""Feedback events and ingestion jobs: validation, idempotence, malformed lines, streaming, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

import moedb
from moedb.embed import VectorsOnly
from moedb.errors import FileProblem, InvalidInput, UnknownExpert
from moedb.lifecycle.feedback import parse_time

from conftest import run_cli

D = 8


def _vdb(path):
    """A database without a text model (vectors only): fast, deterministic."""
    db = moedb.connect(path, embedder=VectorsOnly(D))
    rng = np.random.default_rng(1)
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        c = np.eye(D)[i] * 3
        db.add_expert(name, [f"{name}-{j}" for j in range(6)], vectors=c + 0.3 * rng.normal(size=(6, D)))
    return db


@pytest.fixture
def vdb(db_path):
    d = _vdb(db_path)
    yield d
    d.close()


def _rows(db):
    return db.store.q("SELECT event_key, query_id, expert_id, reward FROM feedback ORDER BY id")


def _write(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines), encoding="utf-8")
    return path


def test_feedback_on_logged_query_uses_logged_vector(vdb):
    q = np.eye(D)[1] + 0.1
    r = vdb.route(q)
    out = vdb.feedback(r.query_id, "beta", 1)
    assert out["expert"] == "beta" and out["reward"] == 1.0 and not out["already_present"]
    vecs, eids, rewards = vdb.gate.feedback_examples()
    assert vecs.shape == (1, D) and vecs.dtype == np.float32
    np.testing.assert_allclose(vecs[0], q / np.linalg.norm(q), atol=1e-6)
    assert eids.tolist() == [vdb.catalog.require("beta")["id"]] and rewards.tolist() == [1.0]
    # an explicit id makes a second identical call a no-op
    a = vdb.feedback(r.query_id, "alpha", -1, id="evt-1")
    b = vdb.feedback(r.query_id, "alpha", -1, id="evt-1")
    assert not a["already_present"] and b["already_present"] and a["id"] == b["id"]
    assert len(_rows(vdb)) == 2


@pytest.mark.parametrize("reward", [2, -1.5, float("nan"), True, "good", None])
def test_bad_reward_changes_nothing(vdb, reward):
    r = vdb.route(np.eye(D)[0])
    with pytest.raises(InvalidInput, match="reward"):
        vdb.feedback(r.query_id, "alpha", reward)
    assert _rows(vdb) == []


def test_unknown_expert_or_query_changes_nothing(vdb):
    r = vdb.route(np.eye(D)[0])
    with pytest.raises(UnknownExpert):
        vdb.feedback(r.query_id, "nope", 1)
    with pytest.raises(InvalidInput, match="unknown query id 999"):
        vdb.feedback(999, "alpha", 1)
    with pytest.raises(InvalidInput, match="query_id"):
        vdb.feedback(3.5, "alpha", 1)
    assert _rows(vdb) == []


def test_text_feedback_is_embedded_once_and_stored(db, embedder):
    db.add_expert("cooking", ["Simmer the sauce for ten minutes.", "Knead the dough until smooth."])
    db.add_expert("travel", ["Book the train tickets early.", "Pack light for a weekend trip."])
    out = db.feedback("how long do I boil pasta", "cooking", 1)
    assert out["query_id"] is None
    vecs, eids, rewards = db.gate.feedback_examples()
    want = embedder.embed(["how long do I boil pasta"])[0]
    np.testing.assert_allclose(vecs[0], want / np.linalg.norm(want), atol=1e-5)
    stored = db.store.q1("SELECT query, query_vec FROM feedback")
    assert stored[0] == "how long do I boil pasta" and len(stored[1]) == 4 * embedder.dim


def test_ingest_is_idempotent(vdb, tmp_path):
    qids = [vdb.route(np.eye(D)[i % 3] + 0.05 * i).query_id for i in range(6)]
    events = [{"query_id": q, "expert": "alpha", "reward": 1} for q in qids[:3]]
    events += [{"query_id": q, "expert": "beta", "reward": -1, "time": 1700000000 + q} for q in qids[3:]]
    events += [{"id": "e-7", "query_id": qids[0], "expert": "gamma", "reward": 0.5},
               {"id": "e-8", "query_id": qids[1], "expert": "gamma", "reward": -0.5, "time": "2024-05-01T12:00:00"}]
    f = _write(tmp_path / "fb.jsonl", events)
    first = vdb.ingest_feedback(f)
    assert (first["taken"], first["skipped"], first["already_present"]) == (8, 0, 0)
    rows = _rows(vdb)
    assert len(rows) == 8
    again = vdb.ingest_feedback(f)
    assert (again["taken"], again["skipped"], again["already_present"]) == (0, 0, 8)
    assert _rows(vdb) == rows
    # the explicit id wins over the content: same id, other content -> already present
    g = _write(tmp_path / "fb2.jsonl", [{"id": "e-7", "query_id": qids[2], "expert": "beta", "reward": 1},
                                        events[0]])
    third = vdb.ingest_feedback(g)
    assert (third["taken"], third["already_present"]) == (0, 2)
    ts = vdb.store.q1("SELECT ts FROM feedback WHERE event_key='id:e-8'")[0]
    assert ts == pytest.approx(parse_time("2024-05-01T12:00:00"))


def test_malformed_lines_are_reported_and_skipped(vdb, tmp_path):
    qid = vdb.route(np.eye(D)[2]).query_id
    lines = [
        {"query_id": qid, "expert": "gamma", "reward": 1},                 # 1 ok
        '{"query_id": 1, "expert": "gamma", "reward": ',                    # 2 bad JSON
        "",                                                                 # 3 blank (ignored)
        {"query_id": qid, "expert": "gamma"},                               # 4 no reward
        {"query_id": qid, "expert": "nobody", "reward": 1},                 # 5 unknown expert
        {"query_id": qid, "expert": "alpha", "reward": 3},                  # 6 reward out of range
        {"query_id": qid, "query": "x", "expert": "alpha", "reward": 1},    # 7 both query and id
        [1, 2],                                                             # 8 not an object
        {"query_id": 424242, "expert": "alpha", "reward": 1},               # 9 not in the log
        {"query_id": qid, "expert": "beta", "reward": -1, "time": "soon"},  # 10 bad time
        {"query_id": qid, "expert": "beta", "reward": -1},                  # 11 ok
        {"query": "a text query", "expert": "beta", "reward": 1},           # 12 no text model here
    ]
    f = _write(tmp_path / "fb.jsonl", lines)
    out = vdb.ingest_feedback(f)
    assert out["lines"] == 12
    assert (out["taken"], out["skipped"], out["already_present"]) == (2, 9, 0)
    by_line = {e["line"]: e["error"] for e in out["errors"]}
    assert sorted(by_line) == [2, 4, 5, 6, 7, 8, 9, 10, 12]
    assert "JSON" in by_line[2] and "reward" in by_line[4] and "nobody" in by_line[5]
    assert "[-1, 1]" in by_line[6] and "exactly one" in by_line[7] and "424242" in by_line[9]
    assert "time" in by_line[10] and "embed" in by_line[12]
    assert [r[3] for r in _rows(vdb)] == [1.0, -1.0]


def test_same_content_without_id_or_time_is_one_event(vdb, tmp_path):
    qid = vdb.route(np.eye(D)[0]).query_id
    ev = {"query_id": qid, "expert": "alpha", "reward": 1}
    out = vdb.ingest_feedback(_write(tmp_path / "f.jsonl", [ev, ev, {**ev, "reward": 1.0}]))
    assert (out["taken"], out["already_present"]) == (1, 2)


def test_streaming_in_chunks_with_progress(vdb, tmp_path):
    qids = [vdb.route(np.eye(D)[i % 3]).query_id for i in range(5)]
    n = 3000
    f = _write(tmp_path / "big.jsonl", [{"id": i, "query_id": qids[i % 5], "expert": "alpha", "reward": 1}
                                        for i in range(n)])
    seen = []
    out = vdb.ingest_feedback(f, progress=lambda done, total: seen.append((done, total)), batch=100, chunk=1000)
    assert out["taken"] == n and out["transactions"] == 3
    size = f.stat().st_size
    assert seen[-1] == (size, size) and all(t == size for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) >= 30


def test_missing_file_is_a_clear_error(vdb, tmp_path):
    with pytest.raises(FileProblem, match="cannot read feedback file"):
        vdb.ingest_feedback(tmp_path / "nope.jsonl")


def test_removed_experts_feedback_is_not_a_gate_example(vdb):
    r = vdb.route(np.eye(D)[0])
    vdb.feedback(r.query_id, "alpha", 1)
    vdb.feedback(r.query_id, "beta", -1)
    vdb.remove_expert("beta")
    _, eids, rewards = vdb.gate.feedback_examples()
    assert eids.tolist() == [vdb.catalog.require("alpha")["id"]] and rewards.tolist() == [1.0]


def test_cli_feedback_and_ingest(db_path, tmp_path):
    d = _vdb(db_path)
    qid = d.route(np.eye(D)[0]).query_id
    d.close()
    p = run_cli(["feedback", str(qid), "alpha", "--good", "--json"], db_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["reward"] == 1.0
    p = run_cli(["feedback", str(qid), "alpha", "--good", "--bad"], db_path)
    assert p.returncode == 1 and "exactly one" in p.stderr
    f = _write(tmp_path / "fb.jsonl", [{"query_id": qid, "expert": "beta", "reward": -1}, "{oops",
                                        {"query_id": qid, "expert": "zeta", "reward": -1}])
    p = run_cli(["ingest-feedback", str(f)], db_path)
    assert p.returncode == 0, p.stderr
    assert "3 lines: 1 taken, 2 skipped, 0 already present" in p.stdout
    assert "line 2:" in p.stderr and "line 3: unknown expert 'zeta'" in p.stderr
    p = run_cli(["ingest-feedback", str(f), "--json"], db_path)
    out = json.loads(p.stdout)
    assert (out["taken"], out["skipped"], out["already_present"]) == (0, 2, 1)
    p = run_cli(["ingest-feedback", str(tmp_path / "missing.jsonl")], db_path)
    assert p.returncode == 1 and p.stderr.startswith("error: cannot read feedback file")


@pytest.mark.slow
def test_ingest_streams_a_large_file_in_bounded_memory(vdb, tmp_path):
    """500k events: traced peak memory stays far below the file size (the file is never held)."""
    import tracemalloc

    qids = [vdb.route(np.eye(D)[i % 3]).query_id for i in range(10)]
    f = tmp_path / "huge.jsonl"
    with open(f, "w") as fh:
        for i in range(500_000):
            fh.write(json.dumps({"id": f"evt-{i:07d}", "query_id": qids[i % 10], "expert": "beta",
                                 "reward": -1 if i % 3 else 1, "time": 1.7e9 + i}) + "\n")
    size = f.stat().st_size
    tracemalloc.start()
    out = vdb.ingest_feedback(f, chunk=20_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out["taken"] == 500_000 and out["transactions"] == 25
    assert peak < size / 2, (peak, size)
