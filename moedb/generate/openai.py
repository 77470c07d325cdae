"""The ``openai`` backend: any OpenAI-compatible server (vLLM, llama.cpp's llama-server,
mlx_lm.server, Ollama, llama-cpp-python's server) at its own ``base_url``, over plain HTTP
(stdlib ``urllib``, no extra dependency).

Config fields: ``base_url`` (e.g. ``http://10.0.0.5:8080/v1``), ``model`` (sent as is, default
``"default"``), ``api_key_env`` (the *name* of an environment variable holding the key; the key is
never stored in the file), ``lora`` (llama-server's per-request adapter selection: an adapter id or
a list of ``{id, scale}``), ``mode`` (``chat`` -> ``/chat/completions``, ``completion`` ->
``/completions``; ``auto`` means chat), and the common fields. ``timeout`` bounds each attempt
(connect and every read); ``retries`` retries connection failures, timeouts, 429 and 5xx with
exponential backoff (``retry_backoff`` seconds, doubled each time); other 4xx are not retried.
"""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from .base import GenerationError, Generation, GenRequest, Generator, OnToken, build_messages, messages_to_prompt


class OpenAIGenerator(Generator):
    """A model behind an OpenAI-compatible HTTP API."""

    backend = "openai"

    def group_key(self) -> tuple:
        # Remote servers schedule their own requests: every request is its own group (concurrent).
        return ("openai", id(self))

    def describe(self) -> str:
        return f"openai {self.config['base_url']}"

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        env = self.config.get("api_key_env")
        if env:
            key = os.environ.get(env)
            if not key:
                raise GenerationError(f"environment variable {env} (generator.api_key_env) is not set",
                                      retryable=False)
            h["Authorization"] = f"Bearer {key}"
        return h

    def _body(self, req: GenRequest, stream: bool) -> tuple[str, dict[str, Any]]:
        cfg = self.config
        messages = build_messages(req, cfg)
        body: dict[str, Any] = {
            "model": cfg.get("model", "default"), "max_tokens": int(cfg.get("max_tokens", 256)),
            "temperature": float(cfg.get("temperature", 0.0)), "top_p": float(cfg.get("top_p", 1.0)),
            "seed": int(cfg.get("seed", 0)) + req.seed_offset, "stream": stream,
        }
        if cfg.get("stop"):
            body["stop"] = list(cfg["stop"])
        if cfg.get("lora"):
            body["lora"] = cfg["lora"]
        if cfg.get("mode", "auto") == "completion":
            body["prompt"] = messages_to_prompt(messages)
            return "/completions", body
        body["messages"] = messages
        return "/chat/completions", body

    def _generate(self, req: GenRequest, on_token: OnToken, deadline: float) -> Generation:
        path, body = self._body(req, stream=on_token is not None)
        url = self.config["base_url"] + path
        timeout = float(self.config.get("timeout", 60.0))
        request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), headers=self._headers(),
                                         method="POST")
        try:
            resp = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace").strip()
            raise GenerationError(f"{url} answered HTTP {e.code}: {detail or e.reason}",
                                  retryable=e.code == 429 or e.code >= 500) from None
        except (urllib.error.URLError, OSError) as e:
            raise self._net_error(url, e, timeout) from None
        try:
            with resp:
                if on_token is not None:
                    return self._read_stream(resp, on_token, deadline, url, timeout, req)
                raw = resp.read()
        except (OSError, urllib.error.URLError) as e:
            raise self._net_error(url, e, timeout) from None
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise GenerationError(f"{url} returned an unexpected response: {raw[:200]!r}") from None
        u = data.get("usage") or {}
        return Generation(text=(text or "").strip(), prompt_tokens=int(u.get("prompt_tokens") or 0),
                          completion_tokens=int(u.get("completion_tokens") or 0),
                          finish_reason=choice.get("finish_reason") or "stop", citations=list(req.passages),
                          info={"model": data.get("model")})

    def _read_stream(self, resp, on_token, deadline: float, url: str, timeout: float, req: GenRequest) -> Generation:
        parts: list[str] = []
        fin, usage = "stop", {}
        for line in resp:
            if time.perf_counter() > deadline:
                raise GenerationError(f"{url}: timed out after {timeout} s while streaming", timed_out=True)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            try:
                chunk = json.loads(payload)
            except ValueError:
                raise GenerationError(f"{url} sent a malformed stream event: {payload[:120]!r}") from None
            usage = chunk.get("usage") or usage
            for ch in chunk.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content") if "delta" in ch else ch.get("text")
                fin = ch.get("finish_reason") or fin
                if piece:
                    parts.append(piece)
                    on_token(piece)
        return Generation(text="".join(parts).strip(), prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or len(parts)), finish_reason=fin,
                          citations=list(req.passages))

    @staticmethod
    def _net_error(url: str, e: BaseException, timeout: float) -> GenerationError:
        reason = getattr(e, "reason", e)
        if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason):
            return GenerationError(f"{url}: no answer within {timeout} s (timed out)", timed_out=True)
        if isinstance(reason, ConnectionRefusedError):
            return GenerationError(f"{url}: connection refused (is the server running?)")
        return GenerationError(f"{url}: {type(reason).__name__}: {reason}")
