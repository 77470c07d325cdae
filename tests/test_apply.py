"""YAML expert files and `moedb apply DIR`: create, update, idempotence, refusal without changes."""
from __future__ import annotations

import json
import textwrap

import pytest

import moedb
from conftest import run_cli
from moedb.errors import ConfigError, FileProblem


def _write(folder, name, text):
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return p


@pytest.fixture
def spec_dir(tmp_path):
    d = tmp_path / "experts"
    _write(d, "docs/sql/joins.md", "A join combines rows of two tables.\n\nAn index speeds up lookups.\n")
    _write(d, "docs/db.md", "Databases store data durably.\n")
    _write(d, "databases.yaml", """
        name: databases
        description: Storage engines
        keywords: [storage]
        documents: [docs/db.md]
    """)
    _write(d, "sql.yml", """
        description: SQL and query planning
        keywords: [sql, join]
        parent: databases
        system_prompt: You answer SQL questions precisely.
        documents: [docs/sql/]
        chunk_size: 50
    """)
    return d


def test_apply_creates_then_is_idempotent(db, spec_dir):
    rep = db.apply_dir(str(spec_dir))
    assert sorted(rep["created"]) == ["databases", "sql"] and rep["updated"] == rep["unchanged"] == []
    sql = db.expert("sql")
    assert sql.parent == "databases" and sql.keywords == ["sql", "join"] and sql.size == 2
    assert sql.generator == {"system_prompt": "You answer SQL questions precisely."}  # overlay on the default
    assert {d["source"] for d in db.documents("sql")} == {"docs/sql/joins.md"}
    assert {d["id"] for d in db.documents("sql")} == {"docs/sql/joins.md#0", "docs/sql/joins.md#1"}
    snapshot = [(e.name, e.updated_at, e.size) for e in db.experts()]
    log_before = db.store.log.count()
    rep2 = db.apply_dir(str(spec_dir))
    assert rep2["created"] == rep2["updated"] == [] and sorted(rep2["unchanged"]) == ["databases", "sql"]
    assert [(e.name, e.updated_at, e.size) for e in db.experts()] == snapshot
    assert db.store.log.count() == log_before


def test_apply_updates_fields_and_syncs_documents(db, spec_dir):
    db.apply_dir(str(spec_dir))
    _write(spec_dir, "docs/sql/joins.md", "A join combines rows of two tables.\n\nA window function looks at rows.\n")
    _write(spec_dir, "docs/sql/extra.md", "CTEs name subqueries.\n")
    (spec_dir / "sql.yml").write_text((spec_dir / "sql.yml").read_text().replace("[sql, join]", "[sql]"))
    rep = db.apply_dir(str(spec_dir), dry_run=True)
    assert rep["updated"] == ["sql"] and rep["details"]["sql"]["fields"] == ["keywords"]
    assert db.expert("sql").keywords == ["sql", "join"]  # dry run wrote nothing
    rep = db.apply_dir(str(spec_dir))
    det = rep["details"]["sql"]
    assert rep["updated"] == ["sql"] and rep["unchanged"] == ["databases"]
    assert (det["added"], det["changed"], det["removed"]) == (1, 1, 0)
    texts = sorted(d["text"] for d in db.documents("sql"))
    assert texts == ["A join combines rows of two tables.", "A window function looks at rows.",
                     "CTEs name subqueries."]
    assert db.expert("sql").keywords == ["sql"]
    (spec_dir / "docs/sql/extra.md").unlink()
    det = db.apply_dir(str(spec_dir))["details"]["sql"]
    assert (det["added"], det["changed"], det["removed"]) == (0, 0, 1) and db.expert("sql").size == 2
    # the centroid sum stays exact after replace/remove: routing still finds sql for a join question
    assert db.route("how do I join two tables", top_k=1, k=1).experts[0].name == "sql"


def test_apply_refuses_bad_files_without_changes(db, spec_dir, tmp_path):
    db.apply_dir(str(spec_dir))
    before = [(e.name, e.updated_at) for e in db.experts()]
    bad = [
        ("oops.yaml", "name: x\ngenerator: {backend: llama, model: nope.gguf}\n", r"oops\.yaml: generator\.model"),
        ("oops.yaml", "name: x\nkeywrds: [a]\n", r"unknown key 'keywrds'"),
        ("oops.yaml", "name: x\nparent: ghost\n", r"parent: unknown expert 'ghost'"),
        ("oops.yaml", "name: sql\n", r"name: expert 'sql' is also defined"),
        ("oops.yaml", "name: x\ndocuments: [missing.md]\n", r"missing\.md: no such file"),
        ("oops.yaml", "- just\n- a list\n", r"must contain one mapping"),
        ("oops.yaml", "name: [unclosed\n", r"invalid YAML"),
        ("oops.yaml", "name: x\nrefuse: yes please\n", r"refuse: must be true or false"),
        ("oops.yaml", "name: x\nrefuse: true\nparent: databases\n", r"refusal expert cannot have a parent"),
        ("oops.yaml", "name: databases\nrefuse: true\n", r"also defined"),
    ]
    for fname, text, msg in bad:
        _write(spec_dir, fname, text)
        _write(spec_dir, "docs/sql/new.md", "This passage must not be added.\n")
        with pytest.raises((ConfigError, FileProblem), match=msg):
            db.apply_dir(str(spec_dir))
        assert [(e.name, e.updated_at) for e in db.experts()] == before
        assert all("must not" not in d["text"] for d in db.documents("sql"))
        (spec_dir / fname).unlink()
        (spec_dir / "docs/sql/new.md").unlink()
    with pytest.raises(FileProblem, match="no .yaml or .yml"):
        db.apply_dir(str(tmp_path))


def test_apply_generator_paths_are_relative_to_the_file(db, tmp_path):
    gguf = pytest.importorskip("gguf")
    d = tmp_path / "specs"
    (d / "models").mkdir(parents=True)
    w = gguf.GGUFWriter(str(d / "models" / "base.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _write(d, "docs.md", "Some text about llamas.\n")
    _write(d, "llamas.yaml", """
        generator: {backend: llama, model: models/base.gguf, max_tokens: 8}
        documents: [docs.md]
    """)
    db.apply_dir(str(d))
    assert db.expert("llamas").generator["model"] == str(d / "models" / "base.gguf")
    assert db.apply_dir(str(d))["unchanged"] == ["llamas"]


def test_cli_apply(db_path, spec_dir):
    r = run_cli(["apply", str(spec_dir)], db_path)
    assert r.returncode == 0, r.stderr
    assert "created: databases" in r.stdout and "2 created, 0 updated, 0 unchanged" in r.stdout
    r = run_cli(["apply", str(spec_dir), "--json"], db_path)
    rep = json.loads(r.stdout)
    assert sorted(rep["unchanged"]) == ["databases", "sql"] and rep["created"] == rep["updated"] == []
    _write(spec_dir, "bad.yaml", "name: b\ngenerator: {backend: gpt}\n")
    r = run_cli(["apply", str(spec_dir)], db_path)
    assert r.returncode == 1 and "bad.yaml: generator.backend: unknown backend 'gpt'" in r.stderr
    with moedb.connect(db_path) as d:
        assert sorted(e.name for e in d.experts()) == ["databases", "sql"]


def test_apply_refusal_experts(db, spec_dir):
    _write(spec_dir, "docs/off.md", "Tell me a joke.\n\nWho won the game last night?\n")
    _write(spec_dir, "off.yaml", "name: off-topic\nrefuse: true\ndocuments: [docs/off.md]\n")
    rep = db.apply_dir(str(spec_dir))
    assert "off-topic" in rep["created"] and db.expert("off-topic").refuse
    assert not db.expert("databases").refuse
    assert db.apply_dir(str(spec_dir))["updated"] == []  # idempotent, the role included
    # a child may not hang under a refusal expert, whether it is in the file or in the plan
    _write(spec_dir, "kid.yaml", "name: kid\nparent: off-topic\n")
    with pytest.raises((ConfigError, FileProblem), match="refusal expert and cannot be a parent"):
        db.apply_dir(str(spec_dir))
    (spec_dir / "kid.yaml").unlink()
    # turning the role off is an update of that field only
    _write(spec_dir, "off.yaml", "name: off-topic\nrefuse: false\ndocuments: [docs/off.md]\n")
    rep = db.apply_dir(str(spec_dir))
    assert rep["updated"] == ["off-topic"] and rep["details"]["off-topic"]["fields"] == ["refuse"]
    assert not db.expert("off-topic").refuse
