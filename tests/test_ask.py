"""`db.ask` and `moedb ask`: routing to experts, per-expert passages, abstention, the CLI."""
from __future__ import annotations

import json
import socket

import pytest

import moedb
from conftest import run_cli, needs_openai
from moedb.ask import ABSTAIN_TEXT, Answer


@pytest.fixture
def kitchen(db):
    db.add_expert("cooking", ["Bread dough must be kneaded for ten minutes.", "A roux is flour cooked in butter.",
                              "Bake bread at 230 degrees."])
    db.add_expert("astronomy", ["Mars is the fourth planet from the Sun.", "Stars fuse hydrogen into helium."])
    db.add_expert("security", ["JWT tokens expire after a set time.", "Store secrets in a vault."])
    return db


def test_ask_gives_each_expert_its_own_passages(kitchen):
    a = kitchen.ask("How long should I knead bread dough?", top_k=2, k=2)
    assert isinstance(a, Answer) and not a.abstained
    assert [c.expert for c in a.contributions] == [e["name"] for e in a.experts]
    assert a.experts[0]["name"] == "cooking"
    for c in a.contributions:
        assert c.ok and c.backend == "extractive"
        assert {x["expert"] for x in c.citations} == {c.expert} and 1 <= len(c.citations) <= 2
    assert '"Bread dough must be kneaded for ten minutes." [cooking: ' in a.text  # quoted and cited
    assert a.citations and a.citations[0].expert == "cooking"
    assert set(a.latency) == {"route_ms", "retrieval_ms", "generation_ms", "synthesis_ms", "total_ms"}
    assert a.latency["total_ms"] >= a.latency["route_ms"] > 0
    assert a.query_id is not None and kitchen.query_log(a.query_id)["query"] == a.query
    d = a.to_dict()
    json.dumps(d)
    assert d["contributions"][0]["expert"] == "cooking"


@needs_openai
def test_abstention_says_no_expert_unless_fallback(kitchen):
    a = kitchen.ask("How long should I knead bread dough?", min_confidence=1.0)
    assert a.abstained and a.text == ABSTAIN_TEXT and a.contributions == [] and a.citations == []
    assert "No expert is confident enough" in a.text
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    down = {"backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "retries": 0}
    a = kitchen.ask("How long should I knead bread dough?", min_confidence=1.0, fallback=down)
    assert a.abstained and a.text == ABSTAIN_TEXT and not a.contributions[0].ok
    assert a.contributions[0].role == "fallback" and "connection refused" in a.contributions[0].error


def test_stored_ask_defaults_apply(kitchen):
    kitchen.set_ask_defaults(strategy="debate", rounds=2, top_k=1)
    a = kitchen.ask("How long should I knead bread dough?")
    assert a.strategy == "debate" and a.extra["rounds"] == 2 and len(a.contributions) == 2
    a = kitchen.ask("How long should I knead bread dough?", strategy="concatenate")
    assert a.strategy == "concatenate" and len(a.contributions) == 1  # stored rounds belong to debate


def test_sequential_collaboration_runs_in_order(kitchen):
    a = kitchen.ask("How long should I knead bread dough?", top_k=3, strategy="concatenate",
                    collaboration="sequential")
    assert a.collaboration == "sequential" and [c.expert for c in a.contributions] == [e["name"] for e in a.experts]


def test_cli_ask_text_json_stream_and_errors(db_path, embedder):
    d = moedb.connect(db_path, embedder=embedder)
    d.add_expert("cooking", ["Bread dough must be kneaded for ten minutes."])
    d.add_expert("astronomy", ["Mars is the fourth planet from the Sun."])
    d.close()
    r = run_cli(["ask", "How long do I knead dough?", "--json", "--strategy", "best_only"], db_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["strategy"] == "best_only"
    assert out["text"] == f'"Bread dough must be kneaded for ten minutes." [cooking: {out["citations"][0]["id"]}]'
    assert out["contributions"][0]["expert"] == "cooking" and "latency" in out and "usage" in out
    r = run_cli(["ask", "How long do I knead dough?", "--stream", "-s", "best_only"], db_path)
    assert r.returncode == 0 and r.stdout.startswith(out["text"] + "\n")
    assert "best_only" in r.stdout
    r = run_cli(["ask", "dough?", "--strategy", "nope"], db_path)
    assert r.returncode == 1 and r.stderr.startswith("error: strategy: unknown strategy 'nope'")
    r = run_cli(["set-generator", "cooking", "--backend", "llama", "--model", "missing.gguf"], db_path)
    assert r.returncode == 1 and "generator.model: no such file" in r.stderr
    r = run_cli(["set-generator", "cooking", "--backend", "extractive", "--set", "max_passages=1", "--json"], db_path)
    assert r.returncode == 0 and json.loads(r.stdout)["generator"] == {"backend": "extractive", "max_passages": 1}
    r = run_cli(["set-generator", "--default", "--backend", "openai", "--base-url", "http://127.0.0.1:1/v1",
                 "--set", "retries=0"], db_path)
    assert r.returncode == 0, r.stderr
    # (--min-confidence 0 asks both experts: by default routing drops cooking, which does not fit, issue 16)
    r = run_cli(["ask", "Which planet is fourth?", "--json", "-s", "concatenate", "--min-confidence", "0"], db_path)
    out = json.loads(r.stdout)
    by = {c["expert"]: c for c in out["contributions"]}
    assert by["cooking"]["ok"] and by["cooking"]["backend"] == "extractive"
    assert not by["astronomy"]["ok"] and by["astronomy"]["backend"] == "openai"  # inherits the default
    r = run_cli(["set-strategy", "voting", "--json"], db_path)
    assert r.returncode == 0 and json.loads(r.stdout)["strategy"] == "voting"
    r = run_cli(["set-strategy", "vote"], db_path)
    assert r.returncode == 1 and "unknown strategy 'vote'" in r.stderr
