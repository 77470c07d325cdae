"""Library behaviour with the real bundled MiniLM: experts, files, routing, retrieval, search, query log."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import moedb
from moedb.ingest.chunk import split_text

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples" / "data"

TOPICS = {
    "security": ["JWT tokens are signed; an invalid signature usually means the verifier uses the wrong key.",
                 "OAuth 2.0 access tokens are sent as bearer tokens in the Authorization header.",
                 "Store passwords with Argon2id or bcrypt, never plain SHA-256."],
    "cooking": ["A roux of butter and flour thickens milk into bechamel sauce.",
                "Bake sourdough bread in a preheated cast-iron pot with the lid on.",
                "If mayonnaise splits, whisk it slowly into a fresh egg yolk."],
    "astronomy": ["Jupiter's Great Red Spot is a storm larger than Earth.",
                  "Saturn's rings are made of ice and rock particles.",
                  "A reflecting telescope gathers light with a mirror."],
}


@pytest.fixture
def topical(db):
    for name, docs in TOPICS.items():
        db.add_expert(name, docs, description=f"{name} notes")
    return db


def test_route_picks_the_expert_whose_documents_match(topical):
    cases = {"How do I fix a JWT auth bug?": "security", "my sauce is too thin, how to thicken it": "cooking",
             "which planet has rings of ice": "astronomy"}
    for q, want in cases.items():
        r = topical.route(q, top_k=2, k=3, min_confidence=0.0)
        assert r.experts[0].name == want, (q, r.experts)
        assert len(r.experts) == 2
        assert r.experts[0].confidence > r.experts[1].confidence
        assert r.hits and r.hits[0].expert == want
        assert all(h.expert in {e.name for e in r.experts} for h in r.hits)
        assert 0.0 <= r.experts[1].confidence <= r.experts[0].confidence <= 1.0
        dense = topical.route(q, top_k=2, k=3, min_confidence=0.0, retrieval="dense", log=False)
        scores = [h.score for h in dense.hits]
        assert scores == sorted(scores, reverse=True)  # dense: ordered by cosine
        hybrid = topical.route(q, top_k=2, k=3, min_confidence=0.0, retrieval="hybrid", log=False, explain=True)
        fused = [h.components["fused"] for h in hybrid.hits]
        assert fused == sorted(fused, reverse=True)  # hybrid: ordered by the fused rank
        assert [h.id for h in hybrid.hits] == [h.id for h in r.hits]  # (hybrid is the default)


def test_hit_scores_are_true_cosines(topical, embedder):
    q = "Great Red Spot storm"
    r = topical.route(q, top_k=1, k=3)
    qv = embedder.embed([q])[0]
    for h in r.hits:
        dv = embedder.embed([h.text])[0]
        assert h.score == pytest.approx(float(qv @ dv), abs=1e-4)


def test_route_many_equals_route(topical):
    qs = ["JWT signature invalid", "bread crust", "telescope mirror", "password hashing"]
    many = topical.route_many(qs, top_k=2, k=2, log=False)
    for q, m in zip(qs, many):
        one = topical.route(q, top_k=2, k=2, log=False)
        assert [e.name for e in one.experts] == [e.name for e in m.experts]
        assert [h.id for h in one.hits] == [h.id for h in m.hits]
        for a, b in zip(one.experts, m.experts):
            assert a.confidence == pytest.approx(b.confidence, abs=1e-5)


def test_route_accepts_a_vector(topical, embedder):
    v = embedder.embed(["Saturn rings"])[0]
    r = topical.route(v, top_k=1)
    assert r.experts[0].name == "astronomy"


def test_search_is_exhaustive_baseline(topical, embedder):
    q = "egg yolk emulsion"
    hits = topical.search(q, k=9)
    assert len(hits) == 9  # every document
    qv = embedder.embed([q])[0]
    allv = {(e, t): float(qv @ embedder.embed([t])[0]) for e, ts in TOPICS.items() for t in ts}
    best = max(allv, key=allv.get)
    assert (hits[0].expert, hits[0].text) == best
    only = topical.search(q, k=5, experts=["astronomy"])
    assert {h.expert for h in only} == {"astronomy"} and len(only) == 3


def test_query_log_records_routes_and_can_be_turned_off(topical):
    r = topical.route("JWT signature invalid", top_k=2)
    entry = topical.query_log(r.query_id)
    assert entry["query"] == "JWT signature invalid"
    assert [c["expert"] for c in entry["choices"]] == [e.name for e in r.experts]
    assert entry["latency_ms"] > 0
    n = topical.store.log.count()
    assert topical.route("anything at all", log=False).query_id is None
    assert topical.store.log.count() == n
    with moedb.connect(topical.path, embedder=topical.embedder, log_queries=False) as quiet:
        quiet.route("no log please")
    assert topical.store.log.count() == n


def test_min_confidence_abstains_and_zero_never_abstains(topical):
    r = topical.route("JWT signature invalid", top_k=3, min_confidence=0.0)
    assert len(r.experts) == 3 and not r.abstained
    r = topical.route("JWT signature invalid", top_k=3, min_confidence=1.0)
    assert r.experts == [] and r.abstained and r.hits == []
    assert topical.query_log(r.query_id)["abstained"] is True


def test_add_files_directory_md_and_jsonl(db, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Title\n\nFirst paragraph about tokens and signatures.\n\nSecond paragraph about refresh tokens.\n")
    (tmp_path / "docs" / "b.jsonl").write_text(
        json.dumps({"text": "jsonl passage one", "id": "j1", "metadata": {"k": 1}}) + "\n\n" +
        json.dumps({"text": "jsonl passage two"}) + "\n")
    (tmp_path / "docs" / "ignored.bin").write_bytes(b"\x00\x01")
    db.add_expert("e")
    n = db.add_files("e", [str(tmp_path / "docs")], chunk_size=60)
    docs = db.documents("e")
    assert n == len(docs) == 4
    md = [d for d in docs if d["source"].endswith("a.md")]
    assert [d["position"] for d in md] == [0, 1]
    assert "First paragraph" in md[0]["text"] or "First paragraph" in md[1]["text"]
    j = {d["id"]: d for d in docs if d["source"].endswith("b.jsonl")}
    assert j["j1"]["metadata"] == {"k": 1} and j["j1"]["text"] == "jsonl passage one"
    # re-adding the same files is refused (ids collide) unless asked to skip
    with pytest.raises(moedb.DuplicateDocument):
        db.add_files("e", [str(tmp_path / "docs")], chunk_size=60)
    assert db.add_files("e", [str(tmp_path / "docs")], chunk_size=60, on_conflict="skip") == 0


def test_malformed_jsonl_names_the_line(db, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": \n')
    db.add_expert("e")
    with pytest.raises(moedb.FileProblem, match=r"bad.jsonl:2: invalid JSON"):
        db.add_files("e", [str(f)])
    assert db.expert("e").size == 0


@pytest.mark.parametrize("size", [80, 200, 1000])
def test_split_text_respects_size_and_keeps_all_words(size):
    text = (EXAMPLES / "security" / "auth.md").read_text()
    pieces = split_text(text, size)
    assert all(len(p) <= size for p in pieces)
    assert " ".join(pieces).split() == text.split()


def test_memory_database_and_context_manager(embedder):
    with moedb.connect(":memory:", embedder=embedder) as d:
        d.add_expert("x", ["hello world"])
        assert d.route("hello").experts[0].name == "x"


def test_examples_data_routes_sensibly(db):
    for name in ("security", "databases", "cooking", "astronomy", "gardening"):
        db.add_expert(name)
        db.add_files(name, [str(EXAMPLES / name)], chunk_size=400)
    expect = {"Why does sqlite say database is locked?": "databases",
              "how often should I water tomatoes": "gardening",
              "my refresh token was stolen": "security"}
    for q, want in expect.items():
        assert db.route(q, top_k=1, min_confidence=0.0).experts[0].name == want


def test_embedder_objects_are_validated(tmp_path):
    class Bad:
        name, dim = "bad", 4

        def embed(self, texts):
            return np.full((len(texts), 4), np.nan)

    class Wrong:
        name, dim = "wrong", 4

        def embed(self, texts):
            return np.ones((len(texts), 3))

    with moedb.connect(str(tmp_path / "a.db"), embedder=Bad()) as d:
        d.add_expert("e")
        with pytest.raises(moedb.InvalidVector, match="NaN"):
            d.add_documents("e", ["x"])
    with moedb.connect(str(tmp_path / "b.db"), embedder=Wrong()) as d:
        d.add_expert("e")
        with pytest.raises(moedb.DimensionMismatch):
            d.add_documents("e", ["x"])
