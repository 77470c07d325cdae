"""Attack suite: hostile values through the library (issue 15). For names, metadata, documents, vectors,
queries, JSONL feedback lines and YAML expert files, every call ends in success or a moedb error, never
another exception, and a call that fails leaves the file's content unchanged (and the file intact).

Each class runs a short hypothesis search in the default run and a long one marked ``slow``; each prints
its counts (see ``attack_tally``)."""
from __future__ import annotations

import decimal
import json
import math
import pathlib
import tempfile

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import moedb
from moedb.text import is_unicode
from moedb.errors import MoedbError

from attack_tally import Tally, content_digest, integrity_ok

D = 8
SIZES = [pytest.param(25, id="short"), pytest.param(400, id="long", marks=pytest.mark.slow)]

# ---------------------------------------------------------------------- hostile values
texts = st.one_of(st.text(), st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                                            blacklist_categories=())),
                  st.sampled_from(["", " ", "\x00", "\ud800", "a\udfffb", "\n\t", "x" * 5000, "../../etc/passwd",
                                   "名前", "\u202eevil", "NaN", "null", "a/b", " lead", "trail "]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), texts, st.binary(max_size=20),
                    st.dates(), st.datetimes(), st.complex_numbers(), st.just(object()), st.just(b"\xff"),
                    st.decimals(allow_nan=True))
values = st.recursive(scalars, lambda c: st.one_of(
    st.lists(c, max_size=4), st.tuples(c, c), st.frozensets(st.integers(), max_size=3),
    st.dictionaries(st.one_of(texts, st.integers(), st.none(), st.booleans()), c, max_size=4)), max_leaves=12)
deep = st.integers(min_value=30, max_value=3000).map(lambda n: json.loads("[" * n + "]" * n) if n < 900 else {"k": 0})
any_value = st.one_of(values, deep)


def _db(path, embedder=None):
    db = moedb.connect(path, embedder=embedder or moedb.VectorsOnly(D))
    rng = np.random.default_rng(0)
    for i, name in enumerate(["alpha", "beta"]):
        docs = [f"{name} notes, part {j}: {'joins and indexes' if i else 'tokens and keys'}" for j in range(4)]
        db.add_expert(name, docs, vectors=None if embedder else np.eye(D)[i] * 3 + 0.3 * rng.normal(size=(4, D)))
    return db


def _attack(db, tally: Tally, call) -> None:
    """Run one hostile call: success, or a moedb error that changed nothing; anything else is counted."""
    before = content_digest(db.store.db.conn)
    tally.tried += 1
    try:
        call()
        tally.ok += 1
        return
    except MoedbError:
        tally.clean += 1
    except Exception as e:  # noqa: BLE001 - what the suite is about
        tally.tracebacks += 1
        tally.note(f"{type(e).__name__}: {e}")
        raise
    if content_digest(db.store.db.conn) != before:
        tally.lost += 1
        tally.note("a failing call changed the file")
        raise AssertionError("a failing call changed the file")


def _run(db, tally, body, n):
    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def search(data):
        body(data)

    try:
        search()
    finally:
        db.close()
        tally.corrupted += 0 if integrity_ok(db.path) else 1
        tally.report()
    assert tally.tracebacks == 0 and tally.lost == 0 and tally.corrupted == 0


# ---------------------------------------------------------------------- classes
@pytest.mark.parametrize("n", SIZES)
def test_attack_names(db_path, n):
    db, tally = _db(db_path), Tally("names")

    def body(data):
        name = data.draw(st.one_of(texts, scalars), label="name")
        op = data.draw(st.sampled_from(["add", "rename", "merge", "split", "parent", "expert"]), label="op")
        if op == "add":
            _attack(db, tally, lambda: db.add_expert(name, ["x"], vectors=np.ones((1, D))))
        elif op == "rename":
            _attack(db, tally, lambda: db.rename_expert("beta", name) and db.rename_expert(name, "beta"))
        elif op == "merge":
            _attack(db, tally, lambda: db.evolution.merge(["alpha", name], "alpha", None))
        elif op == "split":
            _attack(db, tally, lambda: db.split_expert("alpha", 2, names=[name, "other"]))
        elif op == "parent":
            _attack(db, tally, lambda: db.update_expert("beta", parent=name))
        else:
            _attack(db, tally, lambda: db.expert(name))

    _run(db, tally, body, n)


@pytest.mark.parametrize("n", SIZES)
def test_attack_metadata(db_path, n):
    db, tally = _db(db_path), Tally("metadata")

    def body(data):
        md = data.draw(st.one_of(st.dictionaries(st.one_of(texts, st.integers(), st.none()), any_value, max_size=4),
                                 any_value), label="metadata")
        op = data.draw(st.sampled_from(["add", "update", "doc"]), label="op")
        if op == "add":
            _attack(db, tally, lambda: db.add_expert(f"m{tally.tried}", metadata=md))
        elif op == "update":
            _attack(db, tally, lambda: db.update_expert("alpha", metadata=md))
        else:
            _attack(db, tally, lambda: db.add_documents("alpha", [{"text": "t", "metadata": md}],
                                                         vectors=np.ones((1, D)), on_conflict="replace"))

    _run(db, tally, body, n)


@pytest.mark.parametrize("n", SIZES)
def test_attack_documents(db_path, n):
    db, tally = _db(db_path), Tally("documents")
    doc = st.one_of(texts, scalars, st.dictionaries(st.sampled_from(["text", "id", "metadata", "source", "position",
                                                                     "x"]), any_value, max_size=5),
                    st.fixed_dictionaries({"text": texts, "id": st.one_of(texts, st.integers(), st.none())}))

    def body(data):
        docs = data.draw(st.one_of(st.lists(doc, max_size=4), doc), label="documents")
        k = len(docs) if isinstance(docs, list) else 1
        conflict = data.draw(st.sampled_from(["error", "skip", "replace", "bogus", None]), label="on_conflict")
        _attack(db, tally, lambda: db.add_documents("beta", docs, vectors=np.ones((k, D)), on_conflict=conflict))
        if data.draw(st.booleans(), label="remove"):
            ids = data.draw(st.lists(st.one_of(texts, st.integers()), max_size=3), label="ids")
            _attack(db, tally, lambda: db.remove_documents("beta", ids))

    _run(db, tally, body, n)


@pytest.mark.parametrize("n", SIZES)
def test_attack_vectors(db_path, n):
    db, tally = _db(db_path), Tally("vectors")
    floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                       st.sampled_from([1e39, -1e39, 3e38, 1e-45, 1e-25, 0.0, -0.0, 1e308]))
    arrays = st.one_of(
        hnp.arrays(st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.complex128, np.bool_]),
                   hnp.array_shapes(min_dims=0, max_dims=3, max_side=10), elements=None),
        hnp.arrays(np.float64, st.sampled_from([(1, D), (2, D), (D,), (1, D + 1)]), elements=floats),
        hnp.arrays(np.float64, st.sampled_from([(1, D), (D,)]), elements=st.floats(-10, 10)),
        st.lists(st.one_of(floats, st.text(max_size=2), st.none()), max_size=D + 1), st.just("vector"))

    def body(data):
        v = data.draw(arrays, label="vectors")
        op = data.draw(st.sampled_from(["docs", "route", "expert", "search"]), label="op")
        if op == "docs":
            _attack(db, tally, lambda: db.add_documents(
                "alpha", [f"v{tally.tried}-{i}" for i in range(len(v) if getattr(v, "ndim", 1) > 1 else 1)], vectors=v))
        elif op == "expert":
            _attack(db, tally, lambda: db.add_expert(f"v{tally.tried}", ["a"], vectors=v))
        elif op == "route":
            _attack(db, tally, lambda: db.route(v))
        else:
            _attack(db, tally, lambda: db.search(v))
        for r in db.catalog.rows:  # no expert's centroid is poisoned by what was accepted
            if r["size"]:
                assert np.isfinite(r["vec_sum"]).all() and np.linalg.norm(r["vec_sum"]) > 0

    _run(db, tally, body, n)


@pytest.mark.parametrize("n", SIZES)
def test_attack_queries(db_path, embedder, n):
    db, tally = _db(db_path, embedder), Tally("queries")
    num = st.one_of(st.integers(-3, 10**20), st.floats(allow_nan=True), st.none(), st.text(max_size=3), st.booleans())

    def body(data):
        q = data.draw(st.one_of(texts, scalars, st.lists(texts, max_size=3)), label="query")
        kw = data.draw(st.one_of(st.just({}), st.fixed_dictionaries({}, optional={
            "top_k": num, "k": num, "min_confidence": num, "log": st.one_of(st.booleans(), st.none())})), label="kw")
        op = data.draw(st.sampled_from(["route", "search", "route_many", "feedback", "context"]), label="op")
        if op == "route":
            _attack(db, tally, lambda: db.route(q, **kw))
        elif op == "context":
            _attack(db, tally, lambda: db.route("rotate the keys", context=q if isinstance(q, list) else [q]))
        elif op == "route_many":
            _attack(db, tally, lambda: db.route_many(q if isinstance(q, list) else [q], **kw))
        elif op == "search":
            _attack(db, tally, lambda: db.search(q, **{k: v for k, v in kw.items() if k == "k"}))
        else:
            _attack(db, tally, lambda: db.feedback(q, "alpha", data.draw(num, label="reward")))

    _run(db, tally, body, n)


def _not_blank(line: bytes) -> bool:
    """Whether ingest_feedback reads a line as an event (a line that is not UTF-8 is a skipped one)."""
    try:
        return bool(line.decode("utf-8").strip())
    except UnicodeDecodeError:
        return True


@pytest.mark.parametrize("n", SIZES)
def test_attack_feedback_lines(db_path, tmp_path, n):
    db, tally = _db(db_path), Tally("feedback JSONL lines")
    qid = db.route(np.eye(D)[0]).query_id
    event = st.fixed_dictionaries({}, optional={
        "query_id": st.one_of(st.just(qid), st.integers(-2, 2**70), st.floats(), texts),
        "query": st.one_of(texts, st.integers()), "expert": st.one_of(st.sampled_from(["alpha", "beta", "nobody"]), texts),
        "reward": st.one_of(st.floats(-2, 2), st.floats(allow_nan=True), st.integers(-2, 2), texts, st.none()),
        "time": st.one_of(texts, st.integers(-2**40, 2**62), st.floats(), st.none()),
        "id": st.one_of(texts, st.integers(), st.none(), st.lists(st.integers(), max_size=2))})
    line = st.one_of(event.map(lambda e: json.dumps(e, allow_nan=True)), texts,
                     st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
                     st.integers(1, 200_000).map(lambda n: "[" * n), st.just('{"a": 1'))

    def body(data):
        lines = data.draw(st.lists(line, max_size=12), label="lines")
        f = tmp_path / "events.jsonl"
        raw = "\n".join(lines).encode("utf-8", "surrogatepass")
        f.write_bytes(raw)

        def call():
            out = db.ingest_feedback(f, batch=data.draw(st.sampled_from([1, 3, 256]), label="batch"))
            nonblank = sum(1 for x in raw.split(b"\n") if _not_blank(x))
            assert out["taken"] + out["skipped"] + out["already_present"] == nonblank, out
        _attack(db, tally, call)

    _run(db, tally, body, n)


@pytest.mark.parametrize("n", SIZES)
def test_attack_yaml_files(db_path, tmp_path, embedder, n):
    db, tally = _db(db_path, embedder), Tally("YAML expert files")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("Indexes speed up joins.\n")
    key = st.sampled_from(["name", "description", "keywords", "parent", "metadata", "system_prompt", "generator",
                           "documents", "chunk_size", "refuse", "bogus"])
    doc_value = st.one_of(any_value, st.sampled_from(["docs/", "docs/a.md", "/etc/passwd", "../x", "docs/../../x",
                                                      ["docs/a.md", "docs/a.md"], "", "nope.md"]))
    spec = st.dictionaries(key, doc_value, max_size=6)

    def dump(d):
        try:
            return yaml.safe_dump(d, allow_unicode=True)
        except Exception:  # noqa: BLE001 - values yaml cannot write: use their repr
            return "\n".join(f"{k}: {v!r}" for k, v in d.items())

    text = st.one_of(spec.map(dump), texts, st.just("a: &a [1,2]\nb: [*a,*a,*a]\nname: x\n"),
                     st.binary(max_size=30).map(lambda b: b.decode("latin-1")))

    def body(data):
        exp = pathlib.Path(tempfile.mkdtemp(prefix="exp", dir=tmp_path))
        for i in range(data.draw(st.integers(1, 2), label="files")):
            (exp / f"e{i}.yaml").write_bytes(data.draw(text, label="yaml").encode("utf-8", "surrogatepass"))
        _attack(db, tally, lambda: db.apply_dir(str(exp), dry_run=data.draw(st.booleans(), label="dry")))

    _run(db, tally, body, n)


def test_the_value_strategies_reach_the_classes_of_the_attack():
    """The strategies above cover what the attack used: dates, NaN, bytes, deep nesting, surrogates."""
    seen = set()

    def walk(v, depth=0):
        seen.add(type(v).__name__)
        if (isinstance(v, float) and math.isnan(v)) or (isinstance(v, decimal.Decimal) and v.is_nan()):
            seen.add("nan")
        if isinstance(v, str) and not is_unicode(v):
            seen.add("surrogate")
        if depth > 40:
            seen.add("deep")
            return
        if isinstance(v, dict):
            for k, x in v.items():
                walk(k, depth + 1)
                walk(x, depth + 1)
        elif isinstance(v, (list, tuple, frozenset)):
            for x in v:
                walk(x, depth + 1)

    @settings(max_examples=300, derandomize=True, database=None)
    @given(any_value)
    def probe(v):
        walk(v)

    probe()
    assert {"date", "datetime", "bytes", "list", "tuple", "dict", "nan", "surrogate", "Decimal", "deep"} <= seen, seen


def test_a_lone_surrogate_in_a_context_turn_or_a_cli_query_is_a_moedb_error(db_path, embedder, tmp_path):
    """Found by these suites: the embedder took lone surrogates to the tokenizer (TypeError), through a
    conversation turn and through the CLI's warm-up of ``moedb route``; the embedder's own check refuses them."""
    from moedb.errors import InvalidInput

    from conftest import run_cli

    db = _db(db_path, embedder)
    with pytest.raises(InvalidInput, match="Unicode"):
        db.route("rotate the keys", context=["and \udcff?"])
    with pytest.raises(InvalidInput, match="Unicode"):
        db.embedder.embed(["\udcff\udcfe"])
    db.close()
    p = run_cli(["route", "\udcff\udcfe"], db_path)  # (invalid UTF-8 bytes as the shell hands them over)
    assert p.returncode == 1 and p.stderr.startswith("error:") and "Traceback" not in p.stderr


def test_what_the_long_search_found_is_a_moedb_error(db_path):
    """Found by the long runs of these suites: a name that cannot be hashed (Decimal sNaN) gave TypeError
    from db.expert and merge; a lone surrogate in a document's id or source, or in ids to remove, gave
    UnicodeEncodeError; a position that SQLite cannot bind gave TypeError; a str as ids removed its letters;
    a non-iterable as documents gave TypeError."""
    import decimal

    from moedb.errors import InvalidInput, UnknownExpert

    db = _db(db_path)
    before = content_digest(db.store.db.conn)
    s = decimal.Decimal("sNaN")
    one = np.ones((1, D))
    for call, err in [(lambda: db.expert(s), UnknownExpert),
                      (lambda: db.merge_experts(["alpha", s], "alpha"), UnknownExpert),
                      (lambda: db.feedback(1, s), UnknownExpert),
                      (lambda: db.add_documents("beta", [{"text": "t", "id": "\ud800"}], vectors=one), InvalidInput),
                      (lambda: db.add_documents("beta", [{"text": "t", "source": "a\udfffb"}], vectors=one), InvalidInput),
                      (lambda: db.add_documents("beta", [{"text": "t", "position": [1]}], vectors=one), InvalidInput),
                      (lambda: db.add_documents("beta", [{"text": "t", "position": 2**70}], vectors=one), InvalidInput),
                      (lambda: db.add_documents("beta", 7, vectors=one), InvalidInput),
                      (lambda: db.remove_documents("beta", ["\ud800"]), InvalidInput),
                      (lambda: db.remove_documents("beta", "beta 1"), InvalidInput)]:
        with pytest.raises(err):
            call()
    assert content_digest(db.store.db.conn) == before
    db.add_documents("beta", [{"text": "t", "id": 5, "source": "s.md", "position": 3}], vectors=one)
    assert any(d["id"] == "5" and d["position"] == 3 for d in db.documents("beta"))
    db.close()
