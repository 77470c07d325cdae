"""An invalid feedback event that repeats is skipped with its line number every time, never counted as
"already present" (issue 15, item 4: 2,909 junk lines of a 100k-line file were counted as already present)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import moedb
from moedb.embed import VectorsOnly

D = 8


@pytest.fixture
def vdb(db_path):
    db = moedb.connect(db_path, embedder=VectorsOnly(D))
    rng = np.random.default_rng(0)
    for i, name in enumerate(["alpha", "beta"]):
        db.add_expert(name, [f"{name}-{j}" for j in range(4)], vectors=np.eye(D)[i] * 3 + 0.3 * rng.normal(size=(4, D)))
    yield db
    db.close()


def _ingest(db, tmp_path, events, **kw):
    f = tmp_path / "events.jsonl"
    f.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    return db.ingest_feedback(f, **kw)


@pytest.mark.parametrize("batch", [256, 1])  # the repeats in one batch, and in batches of their own
def test_a_repeated_invalid_event_is_skipped_each_time(vdb, tmp_path, batch):
    qid = vdb.route(np.eye(D)[0]).query_id
    unknown_id = {"query_id": 999_999, "expert": "alpha", "reward": 1}       # not in the query log
    no_model = {"query": "a text query", "expert": "beta", "reward": 1}      # cannot be embedded here
    good = {"query_id": qid, "expert": "alpha", "reward": 1}
    out = _ingest(vdb, tmp_path, [unknown_id, unknown_id, no_model, good, no_model, unknown_id, good],
                  batch=batch)
    assert (out["taken"], out["skipped"], out["already_present"]) == (1, 5, 1), out
    assert [e["line"] for e in out["errors"]] == [1, 2, 3, 5, 6]
    assert all("query" in e["error"] for e in out["errors"])
    assert vdb.store.q1("SELECT count(*) FROM feedback")[0] == 1


def test_an_invalid_event_with_the_id_of_a_later_valid_one_does_not_hide_it(vdb, tmp_path):
    qid = vdb.route(np.eye(D)[1]).query_id
    out = _ingest(vdb, tmp_path, [{"id": "e1", "query_id": 999_999, "expert": "beta", "reward": 1},
                                  {"id": "e1", "query_id": qid, "expert": "beta", "reward": 1}])
    assert (out["taken"], out["skipped"], out["already_present"]) == (1, 1, 0), out
    assert out["errors"][0]["line"] == 1
