"""The ``openai`` backend: any OpenAI-compatible server (vLLM, llama.cpp's llama-server,
mlx_lm.server, Ollama, llama-cpp-python's server) at its own ``base_url``, through the official
``openai`` SDK (extra ``openai``: ``pip install "moedb[openai]"``; imported when first used).

Config fields: ``base_url`` (e.g. ``http://10.0.0.5:8080/v1``), ``model`` (sent as is, default
``"default"``), ``api_key_env`` (the *name* of an environment variable holding the key; the key is never
stored in the file; without it a placeholder key is sent, which servers without keys ignore), ``lora``
(llama-server's per-request adapter selection: an adapter id or a list of ``{id, scale}``, sent in the
request body; the ``llama_server`` backend selects adapters by file name instead), ``mode`` (``chat`` ->
``chat.completions``, ``completion`` -> ``completions``; ``auto`` means chat), and the common fields.

``timeout`` is a total per attempt: the SDK call gets the time left until the deadline (connect
and every read), and a stream is cut when the deadline passes between two chunks. ``retries``
retries connection failures, timeouts, 408, 429 and 5xx with exponential backoff
(``retry_backoff`` seconds, doubled each time; the SDK's own retries are off so that every
attempt is counted in the answer); other 4xx are not retried.
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlparse

from .base import GenerationError, Generation, GenRequest, Generator, OnToken, build_messages, messages_to_prompt
from .schema import BaseConfig, Mode, err, setting

_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NO_KEY = "no-key"  # the SDK needs some key; servers started without one ignore it


def http_url(name: str, value: Any, base_dir: Optional[str]) -> str:
    u = urlparse(value) if isinstance(value, str) else None
    if u is None or u.scheme not in ("http", "https") or not u.netloc:
        raise err(name, f"must be an http(s) URL such as http://127.0.0.1:8080/v1, got {value!r}")
    return value.rstrip("/")


def env_name(name: str, value: Any, base_dir: Optional[str]) -> str:
    if not isinstance(value, str) or not _ENV_RE.match(value):
        raise err(name, f"must be the name of an environment variable, got {value!r}")
    return value


def server_lora(name: str, value: Any, base_dir: Optional[str]) -> list[dict[str, Any]]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return [{"id": value, "scale": 1.0}]
    if isinstance(value, list) and all(isinstance(x, dict) and isinstance(x.get("id"), int) for x in value):
        return [{"id": int(x["id"]), "scale": float(x.get("scale", 1.0))} for x in value]
    raise err(name, "must be an adapter id (int) or a list of {id, scale} for llama-server")


@dataclass(frozen=True)
class ApiConfig(BaseConfig):
    """The fields of every backend that talks to an OpenAI-compatible server: the model name it expects,
    where its key is, and chat or completion."""

    model: str = "default"
    api_key_env: Optional[str] = setting(None, check=env_name)
    mode: Mode = "auto"


@dataclass(frozen=True)
class OpenAIConfig(ApiConfig):
    """A server's ``base_url`` and llama-server adapter selection by id."""

    base_url: str = setting("", check=http_url, required=True)
    lora: Optional[list] = setting(None, check=server_lora)


def _sdk() -> Any:
    """The ``openai`` package, imported on first use."""
    try:
        import openai
    except ImportError as e:
        raise GenerationError(f'the openai backend needs the openai package: pip install "moedb[openai]" ({e})',
                              retryable=False) from None
    return openai


def caused_by(e: BaseException, cls: type) -> bool:
    """Whether ``cls`` is in the exception's cause chain (the SDK wraps the socket error)."""
    seen = 0
    x: Optional[BaseException] = e
    while x is not None and seen < 16:
        if isinstance(x, cls):
            return True
        x, seen = x.__cause__ or x.__context__, seen + 1
    return False


class OpenAIGenerator(Generator):
    """A model behind an OpenAI-compatible HTTP API.

    :meth:`base_url` (the API root) and :meth:`lora_body` (llama-server's per-request ``lora`` field)
    are where a subclass (the ``llama_server`` backend) says where and with which adapters to ask;
    building the request, timeouts, retries and error reporting stay here.
    """

    backend = "openai"
    config: ApiConfig

    def __init__(self, config: ApiConfig):
        super().__init__(config)
        self._client_for: tuple[str, Any] = ("", None)  # (api key, SDK client)
        self._lock = threading.Lock()

    def group_key(self) -> tuple:
        # Remote servers schedule their own requests: every request is its own group (concurrent).
        return ("openai", id(self))

    def describe(self) -> str:
        return f"openai {self.base_url()}"

    def base_url(self) -> str:
        """The server's OpenAI API root (``http://host:port/v1``)."""
        return self.config.base_url

    def lora_body(self) -> Optional[list[dict[str, Any]]]:
        """llama-server's per-request ``lora`` field ``[{"id", "scale"}]``, or None to send none."""
        lora = self.config.lora  # an OpenAIConfig here; subclasses with other configs override this
        return [dict(x) for x in lora] if lora else None

    def _api_key(self) -> str:
        env = self.config.api_key_env
        if not env:
            return NO_KEY
        key = os.environ.get(env)
        if not key:
            raise GenerationError(f"environment variable {env} (generator.api_key_env) is not set", retryable=False)
        return key

    def _client(self) -> Any:
        """The SDK client for the current key (read from the environment at every request)."""
        key = self._api_key()
        with self._lock:
            if self._client_for[0] != key or self._client_for[1] is None:
                sdk = _sdk()
                client = sdk.OpenAI(base_url=self.base_url(), api_key=key, timeout=self.config.timeout,
                                    max_retries=0)
                self._client_for = (key, client)
            return self._client_for[1]

    def request(self, req: GenRequest, stream: bool) -> tuple[str, dict[str, Any]]:
        """``("chat" | "completion", keyword arguments of the SDK's create call)`` for a request."""
        cfg = self.config
        messages = build_messages(req, cfg)
        kw: dict[str, Any] = {"model": cfg.model, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
                              "top_p": cfg.top_p, "seed": cfg.seed + req.seed_offset, "stream": stream}
        if cfg.stop:
            kw["stop"] = list(cfg.stop)
        lora = self.lora_body()
        if lora:  # not an OpenAI field: llama-server reads it from the body
            kw["extra_body"] = {"lora": lora}
        if cfg.mode == "completion":
            kw["prompt"] = messages_to_prompt(messages)
            return "completion", kw
        kw["messages"] = messages
        return "chat", kw

    def _generate(self, req: GenRequest, on_token: OnToken, deadline: float) -> Generation:
        client = self._client()
        sdk = _sdk()
        kind, kw = self.request(req, stream=on_token is not None)
        api = client.completions if kind == "completion" else client.chat.completions
        url = self.base_url() + ("/completions" if kind == "completion" else "/chat/completions")
        try:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise self._timed_out(url)
            r = api.create(timeout=left, **kw)
            if on_token is None:
                return self._result(r, url, req)
            with r:
                return self._stream(r, on_token, deadline, url, req)
        except GenerationError:
            raise
        except sdk.APIStatusError as e:
            raise self._status_error(url, e) from None
        except Exception as e:  # APITimeoutError, APIConnectionError, a broken stream, a bad response
            if isinstance(e, sdk.APITimeoutError) or caused_by(e, TimeoutError):
                raise self._timed_out(url) from None
            if caused_by(e, ConnectionRefusedError):
                raise GenerationError(f"{url}: connection refused (is the server running?)") from None
            if isinstance(e, sdk.APIConnectionError):
                cause = e.__cause__ or e
                raise GenerationError(f"{url}: {type(cause).__name__}: {cause}") from None
            raise GenerationError(f"{url} returned an unexpected response: {type(e).__name__}: {e}") from None

    def _timed_out(self, url: str) -> GenerationError:
        return GenerationError(f"{url}: no answer within {self.config.timeout} s (timed out)", timed_out=True)

    @staticmethod
    def _status_error(url: str, e: Any) -> GenerationError:
        status = int(e.status_code)
        try:
            detail = e.response.text[:300].strip()
        except Exception:  # a streamed body that was not read
            detail = ""
        return GenerationError(f"{url} answered HTTP {status}: {detail or e.message}",
                               retryable=status in (408, 429) or status >= 500)

    @staticmethod
    def _result(r: Any, url: str, req: GenRequest) -> Generation:
        try:
            choice = r.choices[0]
            text = choice.message.content if getattr(choice, "message", None) is not None else choice.text
        except (AttributeError, IndexError, TypeError):
            raise GenerationError(f"{url} returned an unexpected response: {str(r)[:200]!r}") from None
        u = getattr(r, "usage", None)
        return Generation(text=(text or "").strip(), prompt_tokens=int(getattr(u, "prompt_tokens", 0) or 0),
                          completion_tokens=int(getattr(u, "completion_tokens", 0) or 0),
                          finish_reason=choice.finish_reason or "stop", citations=list(req.passages),
                          info={"model": getattr(r, "model", None)})

    def _stream(self, chunks: Any, on_token, deadline: float, url: str, req: GenRequest) -> Generation:
        parts: list[str] = []
        fin, usage = "stop", None
        for chunk in chunks:
            if time.perf_counter() > deadline:
                raise GenerationError(f"{url}: timed out after {self.config.timeout} s while streaming",
                                      timed_out=True)
            usage = getattr(chunk, "usage", None) or usage
            for ch in chunk.choices or []:
                delta = getattr(ch, "delta", None)
                piece = delta.content if delta is not None else getattr(ch, "text", None)
                fin = ch.finish_reason or fin
                if piece:
                    parts.append(piece)
                    on_token(piece)
        return Generation(text="".join(parts).strip(), prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                          completion_tokens=int(getattr(usage, "completion_tokens", 0) or len(parts)),
                          finish_reason=fin, citations=list(req.passages))
