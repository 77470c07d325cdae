"""LoRA adapters as hot-swappable experts on a real llama.cpp ``llama-server`` (issue 18).

The servers are started here on free 127.0.0.1 ports with the binary that scripts/build_llama_server.sh
builds from the llama-cpp-python sdist (the tests skip with the reason when it is not built), on
../shared/models/stories260K.gguf with two LoRA adapters written here with ``gguf``:

* ``multi``: both adapters loaded, none applied (``--lora kids --lora pirates --lora-init-without-apply``),
  the set-up of the ``llama_server`` backend; ``reversed``: the same with the adapters in the other order;
* ``kids`` / ``pirates``: one adapter applied alone (the reference outputs); ``half``: both applied at
  scale 0.5 (``--lora-scaled``), the reference of a mix.

Every generation runs at temperature 0 (greedy), so outputs are compared exactly. The configuration
checks at the end need no server.
"""
from __future__ import annotations

import socket

import pytest

pytest.importorskip("openai", reason='the llama_server backend needs the openai extra (pip install "moedb[openai]")')
pytest.importorskip("gguf", reason="the adapters are written with the gguf package (pip install gguf)")

from conftest import run_cli  # noqa: E402
from lora_helpers import LlamaServer, free_port, llama_server_binary, write_lora  # noqa: E402
from moedb import ConfigError  # noqa: E402
from moedb.generate import GenRequest, make_generator, mix_adapters, validate_config  # noqa: E402
from moedb.generate.runner import plan_groups, run_batch  # noqa: E402

BINARY, WHY = llama_server_binary()
needs_server = pytest.mark.skipif(BINARY is None, reason=WHY)

COMMON = {"mode": "completion", "max_tokens": 24, "temperature": 0.0, "timeout": 30.0}
KIDS_Q = "What did Lily play with in the park?"
PIRATES_Q = "Where did the pirate ship sail with the captain?"
DOCS = {
    "kids": ["Lily liked to play with her red ball in the park.", "The little dog ran after Lily's ball."],
    "pirates": ["The pirate ship sailed on the big blue sea.", "The captain found a box of gold on the ship."],
}


@pytest.fixture(scope="module")
def adapters(stories, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    kids, pirates = str(d / "kids.gguf"), str(d / "pirates.gguf")
    assert write_lora(stories, kids, seed=1) == 15 and write_lora(stories, pirates, seed=2) == 15
    return {"kids": kids, "pirates": pirates}


@pytest.fixture(scope="module")
def servers(stories, adapters):
    a, b = adapters["kids"], adapters["pirates"]
    specs = {
        "multi": ["--lora", a, "--lora", b, "--lora-init-without-apply"],
        "reversed": ["--lora", b, "--lora", a, "--lora-init-without-apply"],
        "kids": ["--lora", a],
        "pirates": ["--lora", b],
        "half": ["--lora-scaled", f"{a}:0.5,{b}:0.5"],
    }
    started = {}
    try:
        for name, args in specs.items():
            # no prompt cache: a prompt computed fresh gives the same floats whatever a slot served before
            started[name] = LlamaServer(BINARY, stories, [*args, "--no-cache-prompt"]).start()
            started[name].initial_adapters = started[name].adapters()
        yield started
    finally:
        for s in started.values():
            s.stop()


def on_server(server, lora=None, **kw) -> dict:
    """A ``llama_server`` generator config: ``server`` + the adapter's file name."""
    cfg = {"backend": "llama_server", "server": server.url if hasattr(server, "url") else server, **COMMON, **kw}
    if lora:
        cfg["lora"] = lora
    return cfg


def alone(server, **kw) -> dict:
    """An ``openai`` generator config for a server that applies its adapter to every request."""
    return {"backend": "openai", "base_url": server.url + "/v1", **COMMON, **kw}


@pytest.fixture
def story_db(db, servers):
    for name, docs in DOCS.items():
        db.add_expert(name, docs, generator=on_server(servers["multi"], f"{name}.gguf"))
    return db


def _answers(db, questions) -> dict:
    """The routed expert -> its answer, for each question asked with best_only / top_k=1."""
    out = {}
    for q in questions:
        a = db.ask(q, top_k=1, strategy="best_only")
        (c,) = a.contributions
        assert c.ok, c.error
        out[c.expert] = c.answer
    return out


@pytest.mark.shared
@needs_server
def test_the_routed_adapter_changes_the_output_exactly_as_that_adapter_applied_alone(story_db, servers):
    routed = _answers(story_db, [KIDS_Q, PIRATES_Q])
    assert set(routed) == {"kids", "pirates"} and all(routed.values())
    # the same questions, each expert now on a server started with only its adapter, applied to everything
    for name in DOCS:
        story_db.set_generator(name, alone(servers[name]))
    assert _answers(story_db, [KIDS_Q, PIRATES_Q]) == routed
    # adapters are found by file name, not by position: on a server holding them in the other order
    assert [a["path"].rsplit("/", 1)[-1] for a in servers["reversed"].adapters()] == ["pirates.gguf", "kids.gguf"]
    for name in DOCS:
        story_db.set_generator(name, on_server(servers["reversed"], f"{name}.gguf"))
    assert _answers(story_db, [KIDS_Q, PIRATES_Q]) == routed
    # the adapter is what changes the output: the base model (every adapter at scale 0) answers otherwise
    for name in DOCS:
        story_db.set_generator(name, on_server(servers["multi"]))
    base = _answers(story_db, [KIDS_Q, PIRATES_Q])
    assert base["kids"] != routed["kids"] and base["pirates"] != routed["pirates"]
    # per-request selection only: the server's global scales were never changed (POST /lora-adapters unused)
    assert servers["multi"].adapters() == servers["multi"].initial_adapters


@pytest.mark.shared
@needs_server
def test_two_experts_asked_concurrently_each_get_their_own_adapter(story_db, servers):
    questions = ["Tom had a red ball.", "The ship sailed far away.", "Lily saw a big dog.", "The captain smiled."]
    on_multi = {n: make_generator(validate_config(on_server(servers["multi"], f"{n}.gguf"))) for n in DOCS}
    reference = {n: make_generator(validate_config(alone(servers[n]))) for n in DOCS}
    jobs = [(on_multi[n], GenRequest(query=q, expert=n)) for q in questions for n in DOCS]
    groups = plan_groups(jobs)
    assert len(groups) == 2  # one group per adapter: the two adapters' requests run concurrently
    assert sorted(jobs[groups[0][0]][0] is g for g in (on_multi["kids"], on_multi["pirates"])) == [False, True]
    out = run_batch(jobs, parallel=True)
    want = [reference[req.expert].generate(req).text for _, req in jobs]
    assert [o.text for o in out] == want
    assert want[0] != want[1]  # the two adapters answer differently
    # through ask: both experts chosen, asked at once, each with its own adapter
    a = story_db.ask(KIDS_Q, top_k=2, strategy="concatenate", min_confidence=0.0)
    got = {c.expert: c.answer for c in a.contributions if c.ok}
    assert set(got) == set(DOCS), a.contributions
    for name in DOCS:
        story_db.set_generator(name, alone(servers[name]))
    b = story_db.ask(KIDS_Q, top_k=2, strategy="concatenate", min_confidence=0.0)
    assert {c.expert: c.answer for c in b.contributions if c.ok} == got
    assert servers["multi"].adapters() == servers["multi"].initial_adapters


@pytest.mark.shared
@needs_server
def test_adapters_mixed_with_weights(story_db, servers):
    kids, pirates = (make_generator(validate_config(on_server(servers["multi"], f"{n}.gguf"))) for n in DOCS)
    req = GenRequest(query="Once upon a time, there was a little girl named Lily.")
    mixed = mix_adapters([(kids, 0.5), (pirates, 0.5)]).generate(req).text
    # the same as a server that applies both adapters at scale 0.5 to everything
    assert mixed == make_generator(validate_config(alone(servers["half"]))).generate(req).text
    assert mixed not in (kids.generate(req).text, pirates.generate(req).text)
    # lora_scale is part of the mix: kids at 1.0 x 0.5 + pirates at 0.5 x 1.0 is the same mix
    pirates_half = make_generator(validate_config(on_server(servers["multi"], "pirates.gguf", lora_scale=0.5)))
    assert mix_adapters([(kids, 0.5), (pirates_half, 1.0)]).generate(req).text == mixed
    # the weighted strategy asks for it: one answer from both adapters, weights from routing
    a = story_db.ask(KIDS_Q, top_k=2, strategy="weighted", options={"mix_adapters": 1, "min_weight": 0.0},
                     min_confidence=0.0)
    (c,) = a.contributions
    assert c.ok and c.backend == "llama_server" and sorted(c.expert.split("+")) == ["kids", "pirates"]
    assert sorted(a.extra["mixed"]) == ["kids", "pirates"] and abs(sum(a.extra["weights"].values()) - 1) < 1e-9
    assert a.text == c.answer
    # experts that cannot be mixed (one is not on a llama-server) are answered one by one, and told why
    story_db.set_generator("pirates", alone(servers["pirates"]))
    b = story_db.ask(KIDS_Q, top_k=2, strategy="weighted", options={"mix_adapters": 1, "min_weight": 0.0},
                     min_confidence=0.0)
    assert {c.expert for c in b.contributions} == {"kids", "pirates"}
    assert "not a llama_server generator" in b.extra["mix_error"]
    with pytest.raises(ConfigError, match="several servers"):
        mix_adapters([(kids, 0.5), (make_generator(validate_config(on_server(servers["reversed"], "kids.gguf"))), 0.5)])


@pytest.mark.shared
@needs_server
def test_a_missing_adapter_is_refused_when_set_naming_the_expert_and_the_servers_adapters(story_db, servers,
                                                                                          tmp_path, db_path):
    multi = servers["multi"]
    with pytest.raises(ConfigError) as e:
        story_db.set_generator("kids", on_server(multi, "clowns.gguf"))
    msg = str(e.value)
    assert msg.startswith("expert 'kids': generator.lora: adapter 'clowns.gguf' is not loaded on " + multi.url)
    assert "kids.gguf" in msg and "pirates.gguf" in msg
    assert story_db.expert("kids").generator["lora"] == "kids.gguf"  # unchanged
    # moedb apply: server + lora per expert in the YAML file
    folder = tmp_path / "experts"
    folder.mkdir()
    (folder / "pirates.yaml").write_text(f"description: pirates\ngenerator:\n  backend: llama_server\n"
                                         f"  server: {multi.url}/v1\n  lora: pirates.gguf\n  lora_scale: 0.7\n")
    (folder / "kids.yaml").write_text(f"generator:\n  backend: llama_server\n  server: {multi.url}\n"
                                      "  lora: clowns.gguf\n")
    with pytest.raises(ConfigError, match=r"kids\.yaml.*expert 'kids'.*clowns\.gguf.*the server has: .*kids\.gguf"):
        story_db.apply_dir(str(folder))
    (folder / "kids.yaml").write_text(f"generator:\n  backend: llama_server\n  server: {multi.url}\n"
                                      "  lora: kids.gguf\n")
    story_db.apply_dir(str(folder))
    assert story_db.expert("pirates").generator == {"backend": "llama_server", "server": multi.url,
                                                    "lora": "pirates.gguf", "lora_scale": 0.7}
    # the CLI: one error line, exit 1
    story_db.close()
    r = run_cli(["set-generator", "kids", "--backend", "llama_server", "--set", f"server={multi.url}",
                 "--lora", "clowns.gguf"], db_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: expert 'kids': generator.lora: adapter 'clowns.gguf'")
    assert "pirates.gguf" in r.stderr
    r = run_cli(["set-generator", "kids", "--backend", "llama_server", "--set", f"server={multi.url}",
                 "--lora", "kids.gguf", "--set", "lora_scale=0.5", "--json"], db_path)
    assert r.returncode == 0, r.stderr
    assert '"lora_scale": 0.5' in r.stdout


@pytest.mark.shared
@needs_server
def test_server_down_missing_adapter_and_timeout_are_isolated_failures(db, servers, stories, adapters):
    hung = socket.socket()  # accepts connections (the kernel's backlog) and never answers: a hung server
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    down = f"http://127.0.0.1:{free_port()}"
    late_port = free_port()
    doc = ["Lily liked to play with her red ball in the park."]
    db.add_expert("kids", doc, generator=on_server(servers["multi"], "kids.gguf"))
    # set while nothing answers there: the adapter check is left to the first request
    db.add_expert("down", doc, generator=on_server(down, "kids.gguf", retries=1, retry_backoff=0.01))
    db.add_expert("missing", doc, generator=on_server(f"http://127.0.0.1:{late_port}", "pirates.gguf"))
    db.add_expert("hung", doc, generator=on_server(f"http://127.0.0.1:{hung.getsockname()[1]}", "kids.gguf",
                                                   timeout=1.0))
    # ... and the server that comes up there later holds another adapter only
    late = LlamaServer(BINARY, stories, ["--lora", adapters["kids"], "--lora-init-without-apply"],
                       port=late_port).start()
    try:
        a = db.ask(KIDS_Q, top_k=4, strategy="concatenate", min_confidence=0.0)
    finally:
        late.stop()
        hung.close()
    by = {c.expert: c for c in a.contributions}
    assert set(by) == {"kids", "down", "missing", "hung"}
    assert by["kids"].ok and by["kids"].answer and a.text.startswith("[kids]") and by["kids"].answer in a.text
    assert not by["down"].ok and "connection refused" in by["down"].error and by["down"].attempts == 2
    assert not by["missing"].ok and "adapter 'pirates.gguf' is not loaded" in by["missing"].error
    assert "kids.gguf" in by["missing"].error and by["missing"].attempts == 1  # not retried
    assert not by["hung"].ok and by["hung"].timed_out and "timed out" in by["hung"].error
    assert 0.9 < by["hung"].time < 10
    assert all(c.backend == "llama_server" for c in a.contributions)


# ---------------------------------------------------------------- configuration (no server needed)
def test_llama_server_configs_are_checked_when_set():
    unreachable = f"http://127.0.0.1:{free_port()}"
    cfg = validate_config({"backend": "llama_server", "server": unreachable + "/v1/", "lora": " kids.gguf "})
    assert cfg == {"backend": "llama_server", "server": unreachable, "lora": "kids.gguf"}  # checked later
    g = make_generator(cfg)
    assert (g.base_url(), g.config.lora_scale, g.mix) == (unreachable + "/v1", 1.0, (("kids.gguf", 1.0),))
    ok = {"backend": "llama_server", "server": unreachable}
    for bad, field in [({"backend": "llama_server"}, "server"), ({**ok, "server": "localhost:8080"}, "server"),
                       ({**ok, "lora": ""}, "lora"), ({**ok, "lora": 3}, "lora"),
                       ({**ok, "lora_scale": "x"}, "lora_scale"),
                       ({**ok, "base_url": unreachable}, "base_url")]:
        with pytest.raises(ConfigError, match=rf"^generator\.{field}: "):
            validate_config(bad)


def test_requests_group_per_server_and_adapter():
    url = f"http://127.0.0.1:{free_port()}"
    kids, kids2, pirates, other = (make_generator(validate_config({"backend": "llama_server", "server": s, "lora": n}))
                                   for s, n in ((url, "kids.gguf"), (url, "kids.gguf"), (url, "pirates.gguf"),
                                                (url + "0", "kids.gguf")))
    jobs = [(g, GenRequest(query="q")) for g in (kids, pirates, kids2, other)]
    assert plan_groups(jobs) == [[0, 2], [1], [3]]  # one adapter on one server: one group; the rest concurrent


def test_mixing_needs_adapters_on_one_llama_server():
    url = f"http://127.0.0.1:{free_port()}"
    kids, pirates = (make_generator(validate_config({"backend": "llama_server", "server": url, "lora": n,
                                                     "lora_scale": s}))
                     for n, s in (("kids.gguf", 1.0), ("pirates.gguf", 0.5)))
    mixed = mix_adapters([(kids, 0.25), (pirates, 0.75), (kids, 0.5)])
    assert sorted(mixed.mix) == [("kids.gguf", 0.25), ("kids.gguf", 0.5), ("pirates.gguf", 0.375)]
    extractive = make_generator(validate_config({"backend": "extractive"}))
    with pytest.raises(ConfigError, match="not a llama_server generator"):
        mix_adapters([(kids, 0.5), (extractive, 0.5)])
    with pytest.raises(ConfigError, match="weights must be >= 0"):
        mix_adapters([(kids, -1.0)])
    with pytest.raises(ConfigError, match="options.mix_adapters: must be 0 or 1"):
        from moedb.ask.synth import check_strategy
        check_strategy("weighted", options={"mix_adapters": 2})
