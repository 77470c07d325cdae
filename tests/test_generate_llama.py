"""The llama backend for real: llama-cpp-python on ../shared/models/stories260K.gguf (a trained
260K-parameter model), with LoRA adapters this test writes itself with the ``gguf`` package.

Shows that an adapter changes the output at temperature 0, that experts sharing the base model
load it once, and that requests are grouped per adapter (adapters are not swapped back and forth).
"""
from __future__ import annotations

import pytest

try:
    import llama_cpp  # noqa: F401
except Exception as e:
    pytest.skip(f"llama-cpp-python is not importable here: {type(e).__name__}: {e} (pip install 'moedb[llama]')",
                allow_module_level=True)

from moedb.generate import GenRequest, make_generator, validate_config
from moedb.generate.llama import llama_stats, unload_all
from moedb.generate.runner import plan_groups, run_batch
from lora_helpers import write_lora  # tests/lora_helpers.py, shared with test_lora_server.py

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def adapters(stories, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    a, b = str(d / "kids.gguf"), str(d / "pirates.gguf")
    assert write_lora(stories, a, seed=1) == 15 and write_lora(stories, b, seed=2) == 15
    return a, b


def gen(stories, lora=None, **kw):
    cfg = {"backend": "llama", "model": stories, "n_ctx": 512, "max_tokens": 24, "temperature": 0.0, **kw}
    if lora:
        cfg["lora"] = lora
    return make_generator(validate_config(cfg))


REQ = GenRequest(query="Once upon a time, there was a little girl named Lily.")


def test_adapter_changes_output_at_temperature_0(stories, adapters):
    base, kids, pirates = gen(stories), gen(stories, adapters[0]), gen(stories, adapters[1])
    t_base = base.generate(REQ).text
    t_kids = kids.generate(REQ).text
    t_pirates = pirates.generate(REQ).text
    assert t_base and t_kids and t_pirates
    assert t_kids != t_base and t_pirates != t_base and t_kids != t_pirates
    # deterministic, and switching back restores the base output (no KV cache leaks across adapters)
    assert base.generate(REQ).text == t_base
    assert kids.generate(REQ).text == t_kids
    g = base.generate(REQ)
    assert g.completion_tokens >= 1 and g.prompt_tokens > 10


def test_one_base_model_and_requests_grouped_per_adapter(stories, adapters):
    unload_all()
    a, b = adapters
    gens = [gen(stories, a), gen(stories, b), gen(stories, a), gen(stories, b), gen(stories)]
    jobs = [(g, GenRequest(query=f"Tom had a red ball number {i}.")) for i, g in enumerate(gens)]
    assert plan_groups(jobs) == [[0, 2, 1, 3, 4]]  # one group (one base model), ordered per adapter
    out = run_batch(jobs, parallel=True)
    assert all(o.text for o in out)
    (stats,) = llama_stats().values()
    assert stats["model_loads"] == 1 and stats["adapter_loads"] == 2
    assert stats["activations"] == [a, b, None] and stats["adapter_switches"] == 3
    # the same jobs one by one in the given order swap adapters at every step
    unload_all()
    one_by_one = [run_batch([j], parallel=False)[0] for j in jobs]
    (stats,) = llama_stats().values()
    assert stats["activations"] == [a, b, a, b, None] and stats["adapter_switches"] == 5
    assert stats["adapter_loads"] == 2  # adapters are loaded once and kept
    assert [o.text for o in one_by_one] == [o.text for o in out]  # grouping does not change answers


@pytest.fixture
def story_db(db, stories, adapters):
    db.add_expert("kids", ["Lily liked to play with her ball in the park.", "The little dog was happy."],
                  generator={"backend": "llama", "model": stories, "lora": adapters[0], "n_ctx": 512,
                             "max_tokens": 16})
    db.add_expert("pirates", ["The pirate ship sailed on the big sea.", "The captain found a box of gold."],
                  generator={"backend": "llama", "model": stories, "lora": adapters[1], "n_ctx": 512,
                             "max_tokens": 16})
    db.add_expert("plain", ["Tom and his mom baked a cake.", "The sun was warm and bright."],
                  generator={"backend": "llama", "model": stories, "n_ctx": 512, "max_tokens": 16})
    db.configure(min_confidence=0.0)  # every expert up to top_k is asked: these tests are about generation
    return db


def test_ask_with_llama_experts(story_db):
    unload_all()
    a = story_db.ask("What did Lily play with in the park?", top_k=3, strategy="concatenate")
    assert all(c.ok and c.backend == "llama" and c.tokens >= 1 for c in a.contributions), a.contributions
    assert a.usage["completion_tokens"] == sum(c.tokens for c in a.contributions) > 0
    (stats,) = llama_stats().values()
    assert stats["model_loads"] == 1 and stats["generations"] == 3
    assert len(stats["activations"]) == len(set(stats["activations"]))  # each adapter activated once
    again = story_db.ask("What did Lily play with in the park?", top_k=3, strategy="concatenate")
    assert again.text == a.text  # temperature 0: deterministic


def test_debate_rounds_and_sequential_context(story_db):
    unload_all()
    a = story_db.ask("Where did the pirate ship sail?", top_k=2, strategy="debate", rounds=3)
    (stats,) = llama_stats().values()
    assert stats["generations"] == 6 and a.extra["rounds"] == 3
    r1 = {c.expert: c for c in a.contributions if c.round == 1}
    r2 = {c.expert: c for c in a.contributions if c.round == 2}
    for name in r1:  # from round 2 on every expert also reads the other's answer
        assert r2[name].prompt_tokens > r1[name].prompt_tokens
    par = story_db.ask("Where did the pirate ship sail?", top_k=2, strategy="concatenate")
    seq = story_db.ask("Where did the pirate ship sail?", top_k=2, strategy="concatenate",
                       collaboration="sequential")
    p, s = par.contributions, seq.contributions
    assert p[0].prompt_tokens == s[0].prompt_tokens  # the first expert sees nothing earlier
    assert s[1].prompt_tokens > p[1].prompt_tokens  # the second also reads the first answer


def test_llm_merge_with_a_llama_synthesizer_and_streaming(story_db, stories, adapters):
    syn = {"backend": "llama", "model": stories, "lora": adapters[0], "n_ctx": 512, "max_tokens": 20}
    pieces: list[str] = []
    a = story_db.ask("What did the captain find?", top_k=2, strategy="llm_merge", synthesizer=syn,
                     stream=pieces.append)
    s = a.extra["synthesizer"]
    assert s["ok"] and s["backend"] == "llama" and s["tokens"] >= 1
    assert a.text == s["answer"] and "".join(pieces).strip() == a.text
    assert a.usage["generations"] == 3
    b = story_db.ask("What did the captain find?", top_k=2, strategy="llm_merge",
                     synthesizer={**syn, "lora": adapters[1]})
    assert b.extra["synthesizer"]["answer"] != a.text  # the configured synthesizer really writes it


def test_local_timeout_is_recorded(story_db, stories):
    story_db.set_generator("plain", {"backend": "llama", "model": stories, "n_ctx": 512, "max_tokens": 400,
                                     "timeout": 0.0005})
    a = story_db.ask("Who baked a cake with mom?", top_k=3, strategy="concatenate")
    by = {c.expert: c for c in a.contributions}
    assert not by["plain"].ok and by["plain"].timed_out and "timed out" in by["plain"].error
    assert by["kids"].ok and by["pirates"].ok
