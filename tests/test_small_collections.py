"""Issue 16: a newcomer's own few documents. Routing abstains from the first few documents, experts that do not
fit are dropped (``top_k`` is a maximum), ``ask`` never answers from a dropped expert, generators whose extra
is missing are refused when set, documents can be added by their vectors only, and the CLI says what it does.

Real parts: the bundled MiniLM embedder, SQLite files under tmp_path, the ``moedb`` console script.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import moedb
from conftest import run_cli
from processes import free_port
from moedb.routing.calibration import small_scope_threshold
from moedb.routing.gating import select

NOTES = {  # three subjects, three files each, a few paragraphs per file: ~20 passages
    "cooking": [
        ["Knead bread dough for about ten minutes until it is smooth and elastic.",
         "Let the dough rise in a warm place until it has doubled in size.",
         "Bake the loaf at 230 degrees Celsius until the crust is deep brown."],
        ["A roux is flour cooked in butter; it thickens sauces and gravies.",
         "Season the soup with salt at the end, after it has reduced.",
         "Sear the steak in a very hot pan, then rest it before slicing."],
        ["Whisk eggs and sugar until pale before folding in the flour for a sponge cake.",
         "Blanch green vegetables in boiling salted water, then plunge them in ice water."],
    ],
    "networking": [
        ["A subnet mask splits an IP address into a network part and a host part.",
         "DHCP servers hand out IP addresses and the default gateway to clients.",
         "DNS resolves host names such as example.com to IP addresses."],
        ["TCP retransmits lost segments; UDP sends datagrams without delivery guarantees.",
         "A router forwards packets between networks using its routing table.",
         "Use traceroute to see each hop a packet takes to its destination."],
        ["VLANs separate broadcast domains on one physical switch.",
         "Port forwarding on the firewall exposes an internal server to the internet."],
    ],
    "taxlaw": [
        ["You may deduct a home office if the space is used regularly and exclusively for business.",
         "Keep receipts for deductible business expenses for at least seven years.",
         "Self-employed people pay estimated income tax every quarter."],
        ["Capital gains on assets held longer than a year are taxed at a lower rate.",
         "Charitable donations are deductible only if you itemise your deductions.",
         "The filing deadline for the federal income tax return is in April."],
        ["Married couples may file jointly or separately; joint filing usually lowers the tax.",
         "A tax credit reduces the tax owed, while a deduction reduces taxable income."],
    ],
}
ON_TOPIC = [("How long should I knead bread dough?", "cooking"),
            ("How do I thicken a sauce?", "cooking"),
            ("What does a subnet mask do?", "networking"),
            ("How does DNS resolve a host name?", "networking"),
            ("Can I deduct my home office?", "taxlaw"),
            ("When is the income tax return due?", "taxlaw")]
OFF_TOPIC = ["Recommend a good movie", "What is the capital of Australia?",
             "quantum chromodynamics gluon confinement", "Who won the football world cup in 2014?",
             "How many moons does Jupiter have?", "Tell me a joke about cats",
             "What is the best way to learn to play the guitar?", "How tall is Mount Everest?"]


def _write_notes(root) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {}
    for subject, docs in NOTES.items():
        for i, paras in enumerate(docs):
            p = root / f"{subject}_{i}.md"
            p.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
            files.setdefault(subject, []).append(str(p))
    return files


@pytest.fixture
def newcomer(tmp_path, embedder):
    """Three subjects from three files each (one passage per paragraph), on the real MiniLM."""
    d = moedb.connect(str(tmp_path / "notes.db"), embedder=embedder)
    for subject, paths in _write_notes(tmp_path).items():
        d.add_expert(subject, files=paths, chunk_size=120)
    yield d
    d.close()


def test_newcomer_refuses_other_subjects_and_answers_its_own(newcomer):
    assert 20 <= sum(e.size for e in newcomer.experts()) <= 26
    fig = newcomer.router_figures()
    # ~24 documents: fewer than min_heldout (30), yet a calibrated scope threshold exists
    assert fig["scope_threshold"] is not None and fig["scope_rule"] == "small"
    off = newcomer.route_many(OFF_TOPIC, top_k=2, k=3, log=False)
    assert sum(r.abstained for r in off) >= len(OFF_TOPIC) - 1, [(r.query, r.scope) for r in off]
    assert all(r.hits == [] for r in off if r.abstained)
    on = newcomer.route_many([q for q, _ in ON_TOPIC], top_k=2, k=3, log=False)
    assert [r.experts[0].name if r.experts else None for r in on] == [t for _, t in ON_TOPIC]
    # the rule is the scope threshold, exactly: abstained iff scope < threshold
    thr = fig["scope_threshold"]
    assert [r.abstained for r in off + on] == [r.scope < thr for r in off + on]
    # today's rule (no small-collection threshold) would answer every one of them
    newcomer.configure(small_heldout=0)
    assert newcomer.router_figures()["scope_threshold"] is None
    assert not any(r.abstained for r in newcomer.route_many(OFF_TOPIC, top_k=2, k=0, log=False))


def test_experts_that_do_not_fit_are_dropped_with_their_passages(newcomer):
    r = newcomer.route("Can I deduct my home office?", top_k=2, k=5, log=False, explain=True)
    assert [e.name for e in r.experts] == ["taxlaw"]
    assert r.hits and {h.expert for h in r.hits} == {"taxlaw"}
    dropped = r.explanation["dropped"]
    assert len(dropped) == 1 and dropped[0]["name"] != "taxlaw"
    assert dropped[0]["confidence"] < 0.1 * r.experts[0].confidence and "best expert" in dropped[0]["why"]
    # a plain min_confidence=0.0 keeps every expert up to top_k (the caller asked for them)
    r0 = newcomer.route("Can I deduct my home office?", top_k=2, k=5, log=False, min_confidence=0.0)
    assert len(r0.experts) == 2
    # min_relative_confidence=0 turns the relative rule off (only the calibrated floor is left)
    newcomer.configure(min_relative_confidence=0.0)
    r1 = newcomer.route("Can I deduct my home office?", top_k=2, k=5, log=False)
    assert len(r1.experts) == 2
    with pytest.raises(moedb.ConfigError, match="min_relative_confidence"):
        newcomer.configure(min_relative_confidence=1.5)


def test_select_relative_rule_keeps_only_experts_near_the_best():
    conf = np.array([[0.70, 0.25, 0.05], [0.5, 0.46, 0.04], [0.98, 0.01, 0.01]])
    got = select(conf, 3, 0.0, relative=0.1)
    assert [g.tolist() for g in got] == [[0, 1], [0, 1], [0]]
    assert [g.tolist() for g in select(conf, 3, 0.0)] == [[0, 1, 2]] * 3  # relative 0: as before
    # the absolute floor still applies; with a bias the same floor is used
    assert [g.tolist() for g in select(conf, 3, 0.3, relative=0.1)] == [[0], [0, 1], [0]]
    biased = select(conf, 3, 0.0, bias=np.zeros(3), relative=0.1)
    assert [sorted(g.tolist()) for g in biased] == [[0, 1], [0, 1], [0]]


def test_small_scope_threshold_sits_between_in_and_away():
    inside = np.array([1.0, 2.0, 3.0])
    away = np.array([-5.0, -3.0, -4.0, -np.inf])
    assert small_scope_threshold(inside, away, 0.5) == pytest.approx((2.0 - 4.0) / 2)
    assert small_scope_threshold(inside, away, 0.0) == pytest.approx(2.0)
    assert small_scope_threshold(inside, np.array([-np.inf]), 0.5) == -np.inf


def test_add_documents_by_vectors_only(db):
    rng = np.random.default_rng(0)
    V = rng.normal(size=(3, db.dim)).astype(np.float32)
    db.add_expert("notes", ["Knead the dough for ten minutes."])
    assert db.add_documents("notes", vectors=V) == 3
    assert db.add_documents("notes", [{"id": "mine", "metadata": {"page": 4}}], vectors=-V[:1]) == 1
    docs = {d["id"]: d for d in db.documents("notes")}
    assert len(docs) == 5 and docs["mine"]["metadata"] == {"page": 4} and docs["mine"]["text"] == ""
    r = db.route(V[1], top_k=1, k=1, log=False, min_confidence=0.0)
    assert r.hits[0].text == "" and r.hits[0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(moedb.InvalidInput, match="vectors="):
        db.add_documents("notes")
    with pytest.raises(moedb.InvalidInput, match="3 vectors given for 2 documents"):
        db.add_documents("notes", [{"id": "a"}, {"id": "b"}], vectors=V)
    with pytest.raises(moedb.InvalidInput, match="need vectors="):
        db.add_documents("notes", [{"id": "a"}])
    e = db.add_expert("vectors_only", vectors=V[:2])
    assert e.size == 2


def test_generator_whose_extra_is_missing_is_refused_when_set(db, monkeypatch):
    db.add_expert("cats", ["Cats sleep most of the day."])
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # llama-cpp-python not importable
    with pytest.raises(moedb.ConfigError, match=r"generator.backend: the llama backend needs the extra 'llama'"):
        db.set_generator("cats", {"backend": "llama", "model": "/nowhere/model.gguf"})
    with pytest.raises(moedb.ConfigError, match="moedb\\[llama\\]"):
        db.set_default_generator({"backend": "llama", "model": "/nowhere/model.gguf"})
    assert db.generator_config("cats")["backend"] == "extractive"


def test_ask_never_answers_from_a_dropped_expert(tmp_path, embedder):
    """The issue's case: the routed expert's generator fails; the answer says so instead of quoting the
    expert routing would have dropped."""
    d = moedb.connect(str(tmp_path / "ask.db"), embedder=embedder)
    d.add_expert("cats", ["Once upon a time a cat chased a mouse around the barn.",
                          "The cat purred and curled up by the fire.", "Kittens play with balls of yarn."])
    d.add_expert("ships", ["Sailors measure speed in knots.", "The ship sailed across the stormy ocean.",
                           "A lighthouse warns ships of the rocks."])
    # a generator that fails when asked: an OpenAI-compatible server on a closed port (no extra missing)
    d.set_generator("cats", {"backend": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "retries": 0})
    a = d.ask("Once upon a time a cat", strategy="best_only")
    assert [e["name"] for e in a.experts] == ["cats"]
    assert "knots" not in a.text and all(c.expert != "ships" for c in a.contributions)
    assert a.text.startswith("No answer: the expert that fit this question failed (cats)")
    assert "connection refused" in a.text.lower() or "connect" in a.text.lower()
    assert a.extra["failed"] == ["cats"]
    # a fallback the caller asked for answers, and the text still says the expert failed
    a = d.ask("Once upon a time a cat", strategy="best_only", fallback={"backend": "extractive"})
    assert a.text.startswith("No answer: the expert that fit") and a.extra["fallback"] is True
    assert a.contributions[-1].role == "fallback"
    d.close()


def test_cli_newcomer_output(tmp_path):
    db = str(tmp_path / "cli.db")
    files = _write_notes(tmp_path)
    out = run_cli(["add-expert", "cooking", *files["cooking"], "--chunk-size", "120", "--no-refit"], db)
    assert out.returncode == 0 and out.stderr == "" and " passages\n" in out.stdout
    one = run_cli(["add-expert", "misc", "--text", "One single note.", "--no-refit"], db)
    assert "with 1 passage\n" in one.stdout
    for s in ("networking", "taxlaw"):
        assert run_cli(["add-expert", s, *files[s], "--chunk-size", "120"], db).returncode == 0
    assert run_cli(["remove-expert", "misc"], db).returncode == 0
    r = run_cli(["route", "Recommend a good movie"], db)
    assert r.returncode == 0 and "abstained" in r.stdout and "route " in r.stdout and "loading the model" in r.stdout
    r = run_cli(["route", "What does a subnet mask do and how does it work?", "--explain"], db)
    assert r.returncode == 0 and "networking" in r.stdout and "logit" in r.stdout
    assert "scope " in r.stdout and "threshold" in r.stdout and "dropped " in r.stdout
    assert "doe," not in r.stdout and not r.stdout.rstrip().endswith("doe")
    js = json.loads(run_cli(["route", "Can I deduct my home office?", "--json"], db).stdout)
    assert [e["name"] for e in js["experts"]] == ["taxlaw"]
    show = run_cli(["show", "cooking"], db).stdout
    assert show.count("cooking_0.md#0") == 1
    empty = run_cli(["route", "anything"], str(tmp_path / "empty.db"))
    assert empty.returncode == 1  # (no file: an error too)
    assert run_cli(["init"], str(tmp_path / "empty.db")).returncode == 0
    empty = run_cli(["route", "anything"], str(tmp_path / "empty.db"))
    assert empty.returncode == 1 and empty.stderr.startswith("error: ") and "no experts yet" in empty.stderr
    assert "Traceback" not in empty.stderr and len(empty.stderr.strip().splitlines()) == 1
    assert "<bool>" not in run_cli(["route", "--help"], db).stdout
    rt = run_cli(["retrain"], db)
    assert rt.returncode == 0 and "abstains below scope" in rt.stdout and "small-collection rule" in rt.stdout
    assert "None" not in rt.stdout and "heldout_feedback" not in rt.stdout
    spec = tmp_path / "spec"
    spec.mkdir()
    (spec / "garden.md").write_text("Water tomatoes in the morning.\n\nPrune roses in late winter.\n")
    (spec / "garden.yaml").write_text("name: garden\ndocuments: [garden.md]\n")
    dry = run_cli(["apply", str(spec), "--dry-run"], db)
    assert dry.returncode == 0 and "1 would be created" in dry.stdout and "nothing was written" in dry.stdout
    assert "garden" not in run_cli(["list"], db).stdout
