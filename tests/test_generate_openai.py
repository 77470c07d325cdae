"""The openai backend against real OpenAI-compatible servers started here on 127.0.0.1:

* a small server written here (stdlib ``http.server``: chat and completion endpoints, server-sent
  events, an API key, status errors on request, slow streams) that always runs;
* llama-cpp-python's own server (``python -m llama_cpp.server``) serving ../shared/models/stories260K.gguf
  when llama-cpp-python[server] is installed;
* a server that is down (connection refused) and one that accepts connections but never answers
  (timeout), with retries.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from processes import free_port, stop

pytest.importorskip("openai", reason='the openai backend needs the openai package (pip install "moedb[openai]")')

from moedb.errors import ConfigError  # noqa: E402
from moedb.generate import GenerationError, GenRequest, make_generator, validate_config  # noqa: E402

KEY_ENV = "MOEDB_TEST_OPENAI_KEY"


class _Handler(BaseHTTPRequestHandler):
    """OpenAI-compatible endpoints under ``/v1`` (key "s3cret" required) and ``/open/v1`` (no key).

    The answer is the first words of the prompt's last line, one word per stream event. The model
    name asks for behaviours: ``status-<code>`` answers that HTTP status, ``slow`` waits 0.2 s
    between stream events."""

    def log_message(self, *a) -> None:
        pass

    def _json(self, code: int, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if not self.path.startswith("/open/") and self.headers.get("Authorization") != "Bearer s3cret":
            return self._json(401, {"error": {"message": "Invalid API key", "type": "invalid_request_error"}})
        model = body.get("model", "")
        if model.startswith("status-"):
            return self._json(int(model[7:]), {"error": {"message": f"failing on purpose ({model})"}})
        chat = self.path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        last = [ln for ln in prompt.splitlines() if ln.strip() and ln.strip() != "Answer:"][-1]
        words = last.split()[:min(int(body.get("max_tokens", 16)), 6)]
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words),
                 "total_tokens": len(prompt.split()) + len(words)}
        if not body.get("stream"):
            text = " ".join(words)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
            return self._json(200, {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0,
                                    "model": model, "choices": [{**choice, "finish_reason": "stop"}], "usage": usage})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes
        try:
            for i, w in enumerate(words):
                piece = w if i == 0 else " " + w
                ch = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                ev = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
                      "model": model, "choices": [{**ch, "finish_reason": "stop" if i == len(words) - 1 else None}]}
                self.wfile.write(f"data: {json.dumps(ev)}\n\n".encode())
                self.wfile.flush()
                if model == "slow":
                    time.sleep(0.2)
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:  # the client stopped reading
            pass


@pytest.fixture(scope="module")
def stub():
    """``(base_url, requests)`` of the server above; ``requests`` records what it received."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.requests = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", srv.requests
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def server(shared_dir, tmp_path_factory):
    """``base_url`` of a llama_cpp.server on stories260K (API key "s3cret"), stopped after the module."""
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is not installed")
    model = shared_dir / "models" / "stories260K.gguf"
    port = free_port()
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
    stop(proc)
    log.close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "s3cret")


def _gen(base, **kw):
    return make_generator(validate_config({"backend": "openai", "base_url": base, "api_key_env": KEY_ENV,
                                           "max_tokens": 16, "temperature": 0.0, "timeout": 30, **kw}))


REQ = GenRequest(query="Once upon a time there was a little girl named Lily.")


def _completion_and_chat(base):
    for mode in ("completion", "chat"):
        g = _gen(base, mode=mode)
        a, b = g.generate(REQ), g.generate(REQ)
        assert a.text and a.text == b.text, mode  # temperature 0: deterministic
        assert a.completion_tokens >= 1 and a.prompt_tokens > 10 and a.attempts == 1
        pieces: list[str] = []
        s = g.generate(REQ, on_token=pieces.append)
        assert len(pieces) >= 1 and "".join(pieces).strip() == s.text == a.text


def test_completion_chat_and_streaming(stub, key):
    base, seen = stub
    _completion_and_chat(base + "/v1")
    assert _gen(base + "/v1", mode="chat").generate(REQ).text == "Question: Once upon a time there"
    assert {r["path"] for r in seen} >= {"/v1/completions", "/v1/chat/completions"}


def test_request_body_and_llama_server_fields(stub, key):
    """llama.cpp's llama-server selects an adapter per request with ``lora: [{id, scale}]``: sent in the body."""
    base, seen = stub
    g = _gen(base + "/v1", lora=[{"id": 1, "scale": 0.5}], mode="completion", stop=["\n\n"], seed=3, model="m7")
    kind, kw = g.request(REQ, stream=False)
    assert kind == "completion" and kw["extra_body"] == {"lora": [{"id": 1, "scale": 0.5}]}
    assert g.generate(GenRequest(query="Who?", seed_offset=2)).text
    body = seen[-1]["body"]
    assert seen[-1]["path"] == "/v1/completions" and seen[-1]["auth"] == "Bearer s3cret"
    assert body["lora"] == [{"id": 1, "scale": 0.5}] and body["model"] == "m7" and body["seed"] == 5
    assert body["stop"] == ["\n\n"] and body["temperature"] == 0.0 and body["max_tokens"] == 16
    assert body["prompt"].endswith("Question: Who?\nAnswer:") and body.get("stream") in (None, False)
    assert validate_config({"backend": "openai", "base_url": base, "lora": 2})["lora"] == [{"id": 2, "scale": 1.0}]


def test_api_key_from_the_environment_and_no_key(stub, monkeypatch):
    base, seen = stub
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(GenerationError, match=f"environment variable {KEY_ENV}") as e:
        _gen(base + "/v1").generate(REQ)
    assert e.value.attempts == 1
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(GenerationError, match=r"HTTP 401: .*Invalid API key.*\(1 attempt\)"):
        _gen(base + "/v1", retries=3).generate(REQ)  # 4xx is not retried
    g = make_generator(validate_config({"backend": "openai", "base_url": base + "/open/v1"}))
    assert g.generate(REQ).text and seen[-1]["auth"] != "Bearer s3cret"  # no key configured: none sent


@pytest.mark.parametrize("status, attempts", [(500, 3), (503, 3), (429, 3), (400, 1), (404, 1)])
def test_status_errors_retry_only_when_it_can_help(stub, key, status, attempts):
    base, seen = stub
    n = len(seen)
    g = _gen(base + "/v1", model=f"status-{status}", retries=2, retry_backoff=0.01)
    with pytest.raises(GenerationError, match=rf"HTTP {status}: .*failing on purpose") as e:
        g.generate(REQ)
    assert e.value.attempts == attempts and len(seen) - n == attempts and not e.value.timed_out
    with pytest.raises(GenerationError, match=rf"HTTP {status}"):
        g.generate(REQ, on_token=lambda t: None)  # the same when streaming


def test_a_slow_stream_is_cut_at_the_deadline(stub, key):
    base, _ = stub
    pieces: list[str] = []
    g = _gen(base + "/v1", model="slow", timeout=0.5)
    t0 = time.perf_counter()
    with pytest.raises(GenerationError, match=r"timed out.*\(1 attempt\)") as e:
        g.generate(REQ, on_token=pieces.append)
    assert e.value.timed_out and 0.5 <= time.perf_counter() - t0 < 1.0
    assert 2 <= len(pieces) <= 4  # the tokens that arrived in time were streamed
    assert _gen(base + "/v1", model="slow", timeout=5).generate(REQ, on_token=lambda t: None).text


def test_missing_sdk_names_the_extra(stub, key, monkeypatch):
    g = _gen(stub[0] + "/v1", retries=2)  # (set while the SDK was there: setting it now is refused, below)
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai -> ImportError
    with pytest.raises(GenerationError, match=r'pip install "moedb\[openai\]"') as e:
        g.generate(REQ)
    assert e.value.attempts == 1
    with pytest.raises(ConfigError, match=r"needs the extra 'openai'"):
        _gen(stub[0] + "/v1")


def test_down_and_hanging_servers_retry_then_fail(key):
    port = free_port()
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


def test_experts_on_a_server_through_ask(db, stub, key):
    cfg = {"backend": "openai", "base_url": stub[0] + "/v1", "api_key_env": KEY_ENV, "max_tokens": 12,
           "mode": "completion"}
    db.add_expert("kids", ["Lily liked to play with her ball in the park."], generator=cfg)
    db.add_expert("pirates", ["The pirate ship sailed on the big sea."],
                  generator={**cfg, "base_url": f"http://127.0.0.1:{free_port()}/v1", "retries": 1,
                             "retry_backoff": 0.01})
    pieces: list[str] = []
    a = db.ask("What did Lily play with?", top_k=2, strategy="concatenate", stream=pieces.append,
               min_confidence=0.0)  # (both experts are asked: this test is about their servers)
    by = {c.expert: c for c in a.contributions}
    assert by["kids"].ok and by["kids"].tokens >= 1 and by["kids"].backend == "openai"
    assert not by["pirates"].ok and "connection refused" in by["pirates"].error and by["pirates"].attempts == 2
    assert a.text.startswith("[kids]") and "".join(pieces) == a.text
    stored = json.dumps(db.expert("kids").generator)
    assert "s3cret" not in stored and KEY_ENV in stored  # only the variable's name is stored
    assert os.environ[KEY_ENV] == "s3cret"


@pytest.mark.shared
def test_completion_and_chat_against_llama_cpp_server(server, key, monkeypatch):
    _completion_and_chat(server)
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(GenerationError, match=r"HTTP 401.*\(1 attempt\)"):
        _gen(server, retries=3).generate(REQ)  # 4xx is not retried


@pytest.mark.shared
def test_llama_server_lora_field_is_accepted(server, key):
    """llama-cpp-python's server accepts and ignores ``lora`` (adapter selection itself is a llama-server
    feature that cannot be exercised with this server)."""
    assert _gen(server, lora=[{"id": 1, "scale": 0.5}], mode="completion").generate(REQ).text


class _Redirect(BaseHTTPRequestHandler):
    """Answers every POST with 307 to ``self.server.target`` (another port)."""

    def log_message(self, *a) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(307)
        self.send_header("Location", self.server.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_the_api_key_never_follows_a_redirect_to_another_origin(stub, key):
    """Issue 15, item 6: a server that redirects to another port must not receive the key there."""
    base, requests = stub
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    srv.daemon_threads = True
    srv.target = base.replace("/v1", "")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        n = len(requests)
        g = _gen(f"http://127.0.0.1:{srv.server_address[1]}/v1", retries=0)
        with pytest.raises(GenerationError, match="401"):  # the redirected request arrives without the key
            g.generate(REQ)
        arrived = requests[n:]
        assert arrived and all(r["auth"] is None or "s3cret" not in r["auth"] for r in arrived), arrived
    finally:
        srv.shutdown()
        srv.server_close()
