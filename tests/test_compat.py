"""A file written by the moedb before the package redesign (tests/fixtures/v1_layout.moedb, made by
tests/fixtures/make_v1_file.py at commit 34de03c) opens with this moedb and routes identically."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import moedb

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture
def old_file(tmp_path):
    p = tmp_path / "v1.moedb"
    shutil.copy(FIX / "v1_layout.moedb", p)
    return str(p)


def test_an_old_file_opens_and_routes_identically(old_file):
    want = json.loads((FIX / "v1_routes.json").read_text())
    db = moedb.connect(old_file, embedder=moedb.VectorsOnly(16))
    try:
        assert db.settings()["min_heldout"] == 5  # stored settings survive (and retired ones are ignored)
        assert {e.name for e in db.experts()} == {"alpha", "beta", "gamma", "parent", "off"}
        assert db.expert("gamma").parent == "parent" and db.expert("off").refuse
        got = db.route_many([np.array(q) for q in want["queries"]], top_k=2, k=3, log=False)
        assert len(got) == len(want["routes"])
        for r, w in zip(got, want["routes"]):
            assert [e.name for e in r.experts] == [e[0] for e in w["experts"]]
            np.testing.assert_allclose([e.confidence for e in r.experts], [e[2] for e in w["experts"]], atol=1e-4)
            np.testing.assert_allclose([e.score for e in r.experts], [e[1] for e in w["experts"]], atol=1e-3)
            assert r.abstained == w["abstained"] and r.refused_by == w["refused_by"]
            assert r.scope == pytest.approx(w["scope"], abs=1e-3)
            assert [(h.expert, h.id) for h in r.hits] == [(h[0], h[1]) for h in w["hits"]]
            np.testing.assert_allclose([h.score for h in r.hits], [h[2] for h in w["hits"]], atol=1e-6)
        fig = db.router_figures()
        for k in ("experts", "documents", "heldout", "refusal_heldout"):
            assert fig[k] == want["figures"][k]
        assert fig["scope_threshold"] == pytest.approx(want["figures"]["scope_threshold"], abs=1e-6)
        # the log and feedback written by the old version are readable
        assert db.stats()["queries"] == 20
        assert len(db.store.feedback.rows(None, 0)[0]) == 2
    finally:
        db.close()


def test_changing_a_fit_setting_refits_the_gate(old_file):
    """Every setting in FIT_SETTINGS is part of the gate's key: gate_max_docs used to be left out, so
    changing it kept a gate fitted under the old value."""
    db = moedb.connect(old_file, embedder=moedb.VectorsOnly(16))
    try:
        before = db.gate.current().key
        db.configure(gate_max_docs=100)
        after = db.gate.current()
        assert after.key != before
        assert after.gate.max_total_docs == 100
        assert sum(after.gate.figures_.get("fit_documents", [100])) <= 140
    finally:
        db.close()
