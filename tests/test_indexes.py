"""The vector (sqlite-vec) and text (FTS5) indexes stay in step with the documents through every write,
crash and migration; cold (SQL) and hot (NumPy) retrieval agree; user text is never FTS5 syntax."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moedb
from moedb.errors import MoedbError
from moedb.store.text_index import match_expression

DIM = 8
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


def vdb(path):
    return moedb.connect(str(path), embedder=moedb.VectorsOnly(DIM))


def unit(rng, n):
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def assert_consistent(db) -> None:
    """documents, doc_vectors and documents_fts hold the same rows; vectors equal; sums = members' means."""
    q = db.store.q
    docs = {r[0]: (r[1], r[2], r[3]) for r in q("SELECT id, expert_id, embedding, text FROM documents")}
    vecs = {r[0]: (r[1], r[2]) for r in q("SELECT rowid, expert_id, embedding FROM doc_vectors")} \
        if db.store.vectors.count() or docs else {}
    assert set(vecs) == set(docs)
    for rid, (eid, emb, _) in docs.items():
        assert vecs[rid][0] == eid
        assert vecs[rid][1] == emb
    fts = {r[0] for r in q("SELECT rowid FROM documents_fts")}
    assert fts == set(docs)
    for rid, (eid, emb, text) in list(docs.items())[:20]:  # each text finds its own row by its words
        ids, _, _ = db.store.text.search(text, 50, [eid])
        assert rid in set(ids.tolist())
    for eid, n, vs in q("SELECT id, n_docs, vec_sum FROM experts"):
        members = [np.frombuffer(e, "<f4") for i, (x, e, _) in docs.items() if x == eid]
        assert n == len(members)
        if members:
            assert np.allclose(np.frombuffer(vs, "<f8"), np.sum(members, axis=0), atol=1e-4)


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 6)),
    st.tuples(st.just("remove_docs"), st.integers(0, 3), st.integers(1, 3)),
    st.tuples(st.just("remove_expert"), st.integers(0, 3), st.just(0)),
    st.tuples(st.just("merge"), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("split"), st.integers(0, 3), st.just(2)),
    st.tuples(st.just("rename"), st.integers(0, 3), st.integers(0, 3)),
), min_size=1, max_size=7)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops, st.integers(0, 2**31 - 1))
def test_any_sequence_of_writes_keeps_the_indexes_in_step(tmp_path_factory, seq, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("seq") / "s.moedb"
    counter = [0]
    with vdb(path) as db:
        def names():
            return [e.name for e in db.experts()]

        def pick(i):
            n = names()
            return n[i % len(n)] if n else None

        for op, a, b in seq:
            try:
                if op == "add":
                    name = pick(a) if a < 2 and names() else f"e{counter[0]}"
                    counter[0] += 1
                    docs = [{"id": f"d{counter[0]}_{j}", "text": " ".join(rng.choice(WORDS, 3)) + f" w{counter[0]}x{j}"}
                            for j in range(b)]
                    if name in names():
                        db.add_documents(name, docs, vectors=unit(rng, b))
                    else:
                        db.add_expert(name, docs, vectors=unit(rng, b))
                elif op == "remove_docs" and pick(a):
                    ids = [d["id"] for d in db.documents(pick(a))][:b]
                    db.remove_documents(pick(a), ids)
                elif op == "remove_expert" and pick(a):
                    db.remove_expert(pick(a))
                elif op == "merge" and pick(a) and pick(b) and pick(a) != pick(b):
                    db.merge_experts([pick(a), pick(b)], into=pick(a))
                elif op == "split" and pick(a):
                    db.split_expert(pick(a), 2)
                elif op == "rename" and pick(a):
                    db.rename_expert(pick(a), f"r{counter[0]}")
                    counter[0] += 1
            except MoedbError:
                pass  # a refused operation (too few documents to split, ...) changes nothing
            assert_consistent(db)


def test_cold_sql_and_hot_numpy_retrieval_agree(tmp_path):
    rng = np.random.default_rng(3)
    with vdb(tmp_path / "a.moedb") as db:
        for e in range(4):
            db.add_expert(f"e{e}", [f"doc {e} {j}" for j in range(30)], vectors=unit(rng, 30))
        db.configure(vector_cache_mb=0)  # nothing is hot: every expert is searched in SQL
        qs = unit(rng, 10)
        cold = [[(h.expert, h.id, round(h.score, 5)) for h in db.search(q, k=7)] for q in qs]
        # the exact NumPy answer over the stored vectors
        rows = db.store.q("SELECT e.name, d.doc_id, d.embedding FROM documents d JOIN experts e ON e.id=d.expert_id")
        M = np.stack([np.frombuffer(r[2], "<f4") for r in rows])
        for q, got in zip(qs, cold):
            s = M @ q
            best = np.argsort(-s)[:7]
            assert [(rows[i][0], rows[i][1]) for i in best] == [(e, d) for e, d, _ in got]
            assert np.allclose(s[best], [x for _, _, x in got], atol=1e-4)
        db.configure(vector_cache_mb=64)
        for _ in range(2):  # the second miss makes every expert hot
            hot = [[(h.expert, h.id, round(h.score, 5)) for h in db.search(q, k=7)] for q in qs]
        assert db.catalog.hot.bytes > 0
        assert [[(e, d) for e, d, _ in r] for r in hot] == [[(e, d) for e, d, _ in r] for r in cold]


def test_hot_cache_stays_within_its_budget(tmp_path):
    rng = np.random.default_rng(4)
    with vdb(tmp_path / "b.moedb") as db:
        for e in range(6):
            db.add_expert(f"e{e}", [f"t{j}" for j in range(100)], vectors=unit(rng, 100))
        per_expert = 100 * (DIM * 4 + 8)
        db.configure(vector_cache_mb=2.5 * per_expert / 2**20)
        for _ in range(3):
            for e in range(6):
                db.search(unit(rng, 1)[0], k=3, experts=[f"e{e}"])
                assert db.catalog.hot.bytes <= 2.5 * per_expert
        assert db.catalog.hot.bytes == 2 * per_expert


SYNTAX = ['"', '""', "*", "a*", "NEAR(a b)", "-x", "a:b", "title:foo", "(", ")", "((", "AND", "OR", "NOT",
          "a AND", "^x", "{a b}", "'", "\\", "\x00", "a\"b", "NEAR", "col:*", "+", "ü", "ﬁ", "日本語"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.sampled_from(SYNTAX), st.text(max_size=60),
                 st.lists(st.sampled_from(SYNTAX + WORDS), max_size=8).map(" ".join)))
def test_user_text_is_never_fts5_syntax(fts_db, text):
    db = fts_db
    ids, scores, _ = db.store.text.search(text, 5)
    assert len(ids) == len(scores) <= 5
    ids2, _, _ = db.store.text.search(text, 5, [db.catalog.require("words").get("id")])
    assert set(ids2.tolist()) <= set(r[0] for r in db.store.q("SELECT id FROM documents"))


@pytest.fixture(scope="module")
def fts_db(tmp_path_factory):
    rng = np.random.default_rng(5)
    db = vdb(tmp_path_factory.mktemp("fts") / "f.moedb")
    texts = [" ".join(rng.choice(WORDS, 4)) for _ in range(20)] + ['the NEAR operator and "quotes" (parens) a:b']
    db.add_expert("words", texts, vectors=unit(rng, len(texts)))
    yield db
    db.close()


def test_bm25_ranks_by_rare_words_and_filters_by_expert(tmp_path):
    rng = np.random.default_rng(6)
    with vdb(tmp_path / "c.moedb") as db:
        db.add_expert("a", ["the error code E1234 means the disk is full", "the disk is fine", "nothing here"],
                      vectors=unit(rng, 3))
        db.add_expert("b", ["E1234 also appears here", "the the the"], vectors=unit(rng, 2),
                      metadata={"k": 1})
        ids, s, _ = db.store.text.search('error "E1234"', 5)
        texts = dict(db.store.q("SELECT id, text FROM documents"))
        assert texts[int(ids[0])].startswith("the error code E1234")
        assert list(s) == sorted(s, reverse=True)
        only_b, _, _ = db.store.text.search("E1234", 5, [db.catalog.require("b")["id"]])
        assert [texts[int(i)] for i in only_b] == ["E1234 also appears here"]
        assert match_expression("NEAR(x -b) c:d*") == '"near" OR "x" OR "b" OR "c" OR "d"'
        assert match_expression("what is the E1234") == '"e1234"'  # function words left out...
        assert match_expression("what is the") == '"what" OR "is" OR "the"'  # ...unless nothing else is left


def test_migration_moves_vectors_and_builds_the_text_index(tmp_path):
    """A file written before the indexes existed (schema 6, tests/fixtures/v1_layout.moedb) gets both, in
    step with its documents, and exhaustive search answers as a NumPy scan of its stored vectors does."""
    src = os.path.join(os.path.dirname(__file__), "fixtures", "v1_layout.moedb")
    path = tmp_path / "old.moedb"
    shutil.copy(src, path)
    import apsw
    c = apsw.Connection(str(path))
    assert c.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == 6
    n = c.execute("SELECT count(*) FROM documents").fetchone()[0]
    c.close()
    with moedb.connect(str(path), embedder=moedb.VectorsOnly(16)) as db:
        assert db.store.schema_version() >= 8
        assert db.store.vectors.count() == n > 0
        assert_consistent(db)
        rows = db.store.q("SELECT e.name, d.doc_id, d.embedding FROM documents d JOIN experts e ON e.id=d.expert_id "
                          "WHERE e.refuse = 0")  # (search answers from answering experts only)
        M = np.stack([np.frombuffer(r[2], "<f4") for r in rows])
        q = M[0] + M[-1]
        q /= np.linalg.norm(q)
        got = db.search(q, k=5)
        s = M @ q
        true = {(r[0], r[1]): float(x) for r, x in zip(rows, s)}
        assert np.allclose([h.score for h in got], np.sort(s)[::-1][:5], atol=1e-5)  # the best five scores
        assert all(abs(true[(h.expert, h.id)] - h.score) < 1e-5 for h in got)  # (ties may come in any order)


KILLER = textwrap.dedent("""
    import sys, numpy as np, moedb
    db = moedb.connect(sys.argv[1], embedder=moedb.VectorsOnly(8))
    rng = np.random.default_rng(int(sys.argv[2]))
    i = 0
    print("ready", flush=True)
    while True:
        v = rng.normal(size=(50, 8)).astype(np.float32)
        name = f"e{i % 5}"
        docs = [{"id": f"{i}_{j}", "text": f"passage {i} {j} alpha"} for j in range(50)]
        if name in [e.name for e in db.experts()]:
            db.add_documents(name, docs, vectors=v)
        else:
            db.add_expert(name, docs, vectors=v)
        if i % 7 == 6:
            db.remove_documents(name, [f"{i}_{j}" for j in range(10)])
        i += 1
""")


@pytest.mark.slow
def test_kill_during_ingest_leaves_the_indexes_in_step(tmp_path):
    script = tmp_path / "k.py"
    script.write_text(KILLER)
    path = tmp_path / "k.moedb"
    rng = np.random.default_rng(7)
    for round_ in range(8):
        p = subprocess.Popen([sys.executable, str(script), str(path), str(round_)], stdout=subprocess.PIPE)
        assert p.stdout.readline().strip() == b"ready"
        time.sleep(0.3 + rng.random() * 1.2)
        p.send_signal(signal.SIGKILL)
        p.wait()
        with vdb(path) as db:
            assert db.store.q1("PRAGMA integrity_check")[0] == "ok"
            assert_consistent(db)


def test_hybrid_finds_an_exact_identifier_that_dense_misses(tmp_path, embedder):
    """Error codes are strings MiniLM barely tells apart; BM25 matches them exactly, and hybrid keeps that."""
    causes = ["the replication slot is full", "the disk quota is exceeded", "a lock wait timed out",
              "the certificate expired", "the index is corrupt", "the network is unreachable",
              "the schema version is newer", "the password is wrong", "the table does not exist",
              "the transaction was rolled back", "the connection pool is exhausted", "the query was cancelled"]
    docs = [f"Error E40{11 + i} means {c}." for i, c in enumerate(causes)]
    with moedb.connect(str(tmp_path / "h.moedb"), embedder=embedder) as db:
        db.add_expert("ops", docs[:6])
        db.add_expert("db", docs[6:])
        found = {m: 0 for m in ("dense", "lexical", "hybrid")}
        for i, want in enumerate(docs):
            q = f"what is error E40{11 + i}"
            for m in found:
                found[m] += db.search(q, k=1, retrieval=m)[0].text == want
        assert found["lexical"] == len(docs)
        assert found["dense"] <= 4 and found["hybrid"] >= found["dense"] + 5, found
        hit = db.search("what is error E4021", k=3, retrieval="hybrid", explain=True)[0]
        assert hit.text == docs[10] and hit.components["lexical_rank"] == 1
        assert hit.components.get("dense_rank", 99) > 1  # dense alone ranks it lower
        assert hit.score == pytest.approx(float(embedder.embed(["what is error E4021"])[0] @
                                                embedder.embed([docs[10]])[0]), abs=1e-4)  # score: the cosine
        with pytest.raises(moedb.errors.InvalidInput, match="retrieval"):
            db.search("x", retrieval="bm25")
