"""The openai backend against a real OpenAI-compatible server started here on 127.0.0.1:
llama-cpp-python's own server (``python -m llama_cpp.server``) serving ../shared/models/stories260K.gguf,
with an API key read from an environment variable. Also a server that is down (connection refused)
and one that accepts connections but never answers (timeout), with retries.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from moedb.generate import GenerationError, GenRequest, make_generator, validate_config

pytestmark = pytest.mark.shared
KEY_ENV = "MOEDB_TEST_OPENAI_KEY"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def server(shared_dir, tmp_path_factory):
    """``base_url`` of a llama_cpp.server on stories260K (API key "s3cret"), stopped after the module."""
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is not installed")
    model = shared_dir / "models" / "stories260K.gguf"
    port = _free_port()
    log = open(tmp_path_factory.mktemp("srv") / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "512", "--api_key", "s3cret", "--verbose", "False"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 90
    while True:
        try:
            req = urllib.request.Request(base + "/models", headers={"Authorization": "Bearer s3cret"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"llama_cpp.server did not start: {log.read()[-2000:]}")
        time.sleep(0.3)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "s3cret")


def _gen(base, **kw):
    return make_generator(validate_config({"backend": "openai", "base_url": base, "api_key_env": KEY_ENV,
                                           "max_tokens": 16, "temperature": 0.0, "timeout": 30, **kw}))


REQ = GenRequest(query="Once upon a time there was a little girl named Lily.")


def test_completion_and_chat_against_a_real_server(server, key):
    for mode in ("completion", "chat"):
        g = _gen(server, mode=mode)
        a, b = g.generate(REQ), g.generate(REQ)
        assert a.text and a.text == b.text, mode  # temperature 0: deterministic
        assert a.completion_tokens >= 1 and a.prompt_tokens > 10 and a.attempts == 1
        pieces: list[str] = []
        s = g.generate(REQ, on_token=pieces.append)
        assert "".join(pieces).strip() == s.text == a.text


def test_api_key_comes_from_the_environment(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(GenerationError, match=f"environment variable {KEY_ENV}"):
        _gen(server).generate(REQ)
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(GenerationError, match=r"HTTP 401.*\(1 attempt\)"):
        _gen(server, retries=3).generate(REQ)  # 4xx is not retried


def test_down_and_hanging_servers_retry_then_fail(key):
    port = _free_port()
    g = _gen(f"http://127.0.0.1:{port}/v1", retries=2, retry_backoff=0.05)
    t0 = time.perf_counter()
    with pytest.raises(GenerationError, match=r"connection refused.*\(3 attempts\)") as e:
        g.generate(REQ)
    assert not e.value.timed_out and e.value.attempts == 3
    assert time.perf_counter() - t0 >= 0.05 + 0.1  # backoff 0.05 then 0.1
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(8)
    try:
        g = _gen(f"http://127.0.0.1:{hang.getsockname()[1]}/v1", timeout=0.3, retries=1, retry_backoff=0.01)
        t0 = time.perf_counter()
        with pytest.raises(GenerationError, match=r"timed out.*\(2 attempts\)") as e:
            g.generate(REQ)
        took = time.perf_counter() - t0
        assert e.value.timed_out and 0.6 <= took < 3
    finally:
        hang.close()


def test_experts_on_a_server_through_ask(db, server, key):
    cfg = {"backend": "openai", "base_url": server, "api_key_env": KEY_ENV, "max_tokens": 12, "mode": "completion"}
    db.add_expert("kids", ["Lily liked to play with her ball in the park."], generator=cfg)
    db.add_expert("pirates", ["The pirate ship sailed on the big sea."],
                  generator={**cfg, "base_url": f"http://127.0.0.1:{_free_port()}/v1", "retries": 1,
                             "retry_backoff": 0.01})
    a = db.ask("What did Lily play with?", top_k=2, strategy="concatenate")
    by = {c.expert: c for c in a.contributions}
    assert by["kids"].ok and by["kids"].tokens >= 1 and by["kids"].backend == "openai"
    assert not by["pirates"].ok and "connection refused" in by["pirates"].error and by["pirates"].attempts == 2
    assert a.text.startswith("[kids]")
    stored = json.dumps(db.expert("kids").generator)
    assert "s3cret" not in stored and KEY_ENV in stored  # only the variable's name is stored
    assert os.environ[KEY_ENV] == "s3cret"


def test_llama_server_lora_field_is_sent_per_request(server, key):
    """llama.cpp's llama-server selects an adapter per request with ``lora: [{id, scale}]``; the body carries
    it (llama-cpp-python's server, used here, accepts and ignores the field: adapter selection itself is a
    llama-server feature that cannot be exercised with this server)."""
    g = _gen(server, lora=[{"id": 1, "scale": 0.5}], mode="completion")
    path, body = g._body(REQ, stream=False)
    assert path == "/completions" and body["lora"] == [{"id": 1, "scale": 0.5}] and body["temperature"] == 0.0
    assert validate_config({"backend": "openai", "base_url": server, "lora": 2})["lora"] == [{"id": 2, "scale": 1.0}]
    assert g.generate(REQ).text
