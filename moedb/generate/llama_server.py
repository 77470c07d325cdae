"""The ``llama_server`` backend: one llama.cpp ``llama-server`` holding every expert's LoRA adapter.

The set-up of the DMOE design: one base model, every expert's adapter loaded and none applied,

    llama-server -m base.gguf --lora kids.gguf --lora pirates.gguf --lora-init-without-apply

and each expert names its adapter by file name. Every request carries llama-server's per-request
``lora`` field, ``[{"id": i, "scale": s}]``, for the routed expert's adapter only (adapters not listed
run at scale 0); the global ``POST /lora-adapters`` is never used, since it would race between
concurrent requests. A request of an expert without adapter lists every adapter at scale 0: in the
llama.cpp of llama-cpp-python 0.3.36, ``--lora-init-without-apply`` is accepted but has no effect
(``GET /lora-adapters`` reports scale 1.0), so a request without the field would get every adapter. Ids come
from the server's ``GET /lora-adapters`` by file name, never by position, once per generator (a
generator lives for one ``ask``), so a server restarted with its adapters in another order is followed.

Config fields: ``server`` (the server's root URL, e.g. ``http://127.0.0.1:8080``; a trailing ``/v1``
is accepted), ``lora`` (the adapter's file name as the server loaded it, e.g. ``kids.gguf``, or the
whole path the server was given; unset: the base model, every adapter at scale 0), ``lora_scale``
(1.0), and the ``openai`` backend's ``model``, ``api_key_env`` and ``mode`` and the common fields.
Requests go through the ``openai`` backend (official SDK, extra ``openai``): timeouts, retries and
error reports are the same.

When the configuration is set (``set_generator``, ``apply``, ``add_expert``) the server is asked for
its adapters: an adapter it does not have is a :class:`moedb.ConfigError` naming the expert and
listing the adapters the server has. A server that cannot be reached then leaves the check to the
first request, where a missing adapter, like a server down or a timeout, fails that expert's
contribution only.

Requests are grouped per server and adapter set (:meth:`LlamaServerGenerator.group_key`): requests
for different adapters run concurrently (llama-server batches requests per adapter set), requests for
one adapter run in turn in one worker (so the server's slot for that adapter keeps its prompt cache).
:func:`mix_adapters` turns several experts on one server into one generator that applies all their
adapters at once, each at ``lora_scale`` x its weight (the ``weighted`` strategy's ``mix_adapters``
option).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from ..errors import ConfigError
from .base import GenerationError, Generation, GenRequest, Generator, OnToken
from .openai import NO_KEY, ApiConfig, OpenAIGenerator, caused_by, http_url
from .schema import err, setting

CHECK_TIMEOUT = 5.0  # seconds the adapter check may take when a configuration is set


def server_url(name: str, value: Any, base_dir: Optional[str]) -> str:
    """The server's root URL (a trailing ``/`` or ``/v1`` removed)."""
    url = http_url(name, value, base_dir)
    return url[:-3] if url.endswith("/v1") else url


def adapter_name(name: str, value: Any, base_dir: Optional[str]) -> str:
    if not isinstance(value, str) or not value.strip():
        raise err(name, f"must be the file name of an adapter the server loaded (e.g. kids.gguf), got {value!r}")
    return value.strip()


def file_name(path: str) -> str:
    """The last component of a path as a server on any system reports it."""
    return re.split(r"[\\/]", path)[-1]


@dataclass(frozen=True)
class LlamaServerConfig(ApiConfig):
    """A llama-server's root URL and the file name and scale of the expert's adapter on it."""

    server: str = setting("", check=server_url, required=True)
    lora: Optional[str] = setting(None, check=adapter_name)
    lora_scale: float = 1.0

    def verify(self, expert: Optional[str] = None) -> None:
        """The adapter is on the server (when the server answers); else :class:`ConfigError`."""
        if self.lora is None:
            return
        gen = LlamaServerGenerator(replace(self, timeout=min(self.timeout, CHECK_TIMEOUT)))
        try:
            table = gen.adapters(time.perf_counter() + gen.config.timeout)
        except GenerationError:
            return  # not reachable now: the first request checks (and reports in the contribution)
        try:
            resolve(table, self.lora, self.server)
        except GenerationError as e:
            who = f"expert {expert!r}: " if expert else ""
            raise ConfigError(f"{who}generator.lora: {e}") from None


def resolve(table: list[dict[str, Any]], name: str, server: str) -> int:
    """The id of adapter ``name`` (a file name, or the path the server was given) in ``table``, the rows
    ``{"id", "path", "scale"}`` of ``GET /lora-adapters``; :class:`GenerationError` when it is missing or
    ambiguous, listing what the server has."""
    ids = [int(a["id"]) for a in table if a["path"] == name]
    ids = ids or [int(a["id"]) for a in table if file_name(a["path"]) == name]
    have = ", ".join(a["path"] for a in table) or "no adapters"
    if not ids:
        raise GenerationError(f"adapter {name!r} is not loaded on {server} (the server has: {have})",
                              retryable=False)
    if len(ids) > 1:
        raise GenerationError(f"adapter {name!r} is ambiguous on {server}: several adapters have that file name "
                              f"({have}); give the whole path", retryable=False)
    return ids[0]


def _table(data: Any) -> Optional[list[dict[str, Any]]]:
    """The rows of a ``GET /lora-adapters`` answer, or None when it is not one."""
    if not isinstance(data, list):
        return None
    ok = all(isinstance(a, dict) and isinstance(a.get("id"), int) and isinstance(a.get("path"), str) for a in data)
    return [{"id": a["id"], "path": a["path"], "scale": a.get("scale")} for a in data] if ok else None


class LlamaServerGenerator(OpenAIGenerator):
    """An expert's adapter (or a mix of adapters) on a llama-server holding many.

    ``mix``: ``(file name, scale)`` pairs applied together (built by :func:`mix_adapters`); by default
    the config's ``lora`` at ``lora_scale``.
    """

    backend = "llama_server"
    config: LlamaServerConfig

    def __init__(self, config: LlamaServerConfig, mix: Optional[Sequence[tuple[str, float]]] = None):
        super().__init__(config)
        if mix is None:
            mix = [(config.lora, config.lora_scale)] if config.lora is not None else []
        self.mix: tuple[tuple[str, float], ...] = tuple((str(n), float(s)) for n, s in mix)
        self._ids: Optional[list[dict[str, Any]]] = None  # the resolved lora field, once per generator

    def describe(self) -> str:
        on = " + ".join(f"{n}*{s:g}" for n, s in self.mix) or "base model"
        return f"llama_server {self.config.server} ({on})"

    def base_url(self) -> str:
        return self.config.server + "/v1"

    def adapter_key(self) -> str:
        return "|".join(f"{n}*{s:g}" for n, s in sorted(self.mix))

    def group_key(self) -> tuple:
        # one group per server and adapter set: different adapters run concurrently
        return ("llama_server", self.config.server, self.adapter_key())

    def lora_body(self) -> Optional[list[dict[str, Any]]]:
        return [dict(x) for x in self._ids] if self._ids else None

    def adapters(self, deadline: float) -> list[dict[str, Any]]:
        """The server's adapters ``[{"id", "path", "scale"}]`` (``GET /lora-adapters``); :class:`GenerationError`
        (server down, timeout, not a llama-server) otherwise."""
        try:
            import httpx  # comes with the openai SDK
        except ImportError as e:
            raise GenerationError(f'the llama_server backend needs the openai extra: pip install "moedb[openai]" ({e})',
                                  retryable=False) from None
        url = self.config.server + "/lora-adapters"
        key = self._api_key()
        headers = {"Authorization": f"Bearer {key}"} if key != NO_KEY else {}
        left = deadline - time.perf_counter()
        if left <= 0:
            raise self._timed_out(url)
        try:
            r = httpx.get(url, headers=headers, timeout=left)
        except httpx.TimeoutException:
            raise self._timed_out(url) from None
        except httpx.HTTPError as e:
            if caused_by(e, ConnectionRefusedError) or "refused" in str(e).lower():
                raise GenerationError(f"{url}: connection refused (is the server running?)") from None
            raise GenerationError(f"{url}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            hint = " (not a llama-server?)" if r.status_code == 404 else ""
            raise GenerationError(f"{url} answered HTTP {r.status_code}{hint}: {r.text[:300].strip()}",
                                  retryable=r.status_code in (408, 429) or r.status_code >= 500)
        try:
            table = _table(r.json())
        except ValueError:
            table = None
        if table is None:
            raise GenerationError(f"{url} returned an unexpected response: {r.text[:200]!r}", retryable=False)
        return table

    def _lora_field(self, deadline: float) -> list[dict[str, Any]]:
        """``[{"id", "scale"}]`` for this generator's adapters, every other adapter of the server at 0."""
        table = self.adapters(deadline)
        scales: dict[int, float] = {int(a["id"]): 0.0 for a in table}
        for name, scale in self.mix:
            i = resolve(table, name, self.config.server)
            scales[i] += scale
        routed = [{"id": i, "scale": s} for i, s in sorted(scales.items()) if s != 0.0]
        # the base model (or a mix at scale 0): every adapter listed at 0, since an empty field would let
        # the server's global scales apply
        return routed or [{"id": i, "scale": 0.0} for i in sorted(scales)]

    def _generate(self, req: GenRequest, on_token: OnToken, deadline: float) -> Generation:
        with self._lock:
            ids = self._ids
        if ids is None:
            ids = self._lora_field(deadline)
            with self._lock:
                self._ids = ids
        return super()._generate(req, on_token, deadline)


def mix_adapters(parts: Sequence[tuple[Generator, float]]) -> LlamaServerGenerator:
    """One generator applying several experts' adapters at once: each at its ``lora_scale`` x its weight.

    ``parts``: ``(generator, weight)`` pairs, weights >= 0 (e.g. routing confidences as shares of 1).
    The first generator's other settings (limits, prompt, timeout) are used. :class:`ConfigError`
    says why when they cannot be mixed: not all ``llama_server`` generators on one server.
    """
    if not parts:
        raise ConfigError("mix_adapters: no generators to mix")
    for gen, w in parts:
        if not isinstance(gen, LlamaServerGenerator):
            raise ConfigError(f"mix_adapters: {gen.describe()} is not a llama_server generator; only adapters on "
                              "one llama-server can be mixed")
        if not w >= 0:
            raise ConfigError(f"mix_adapters: weights must be >= 0, got {w!r}")
    first = parts[0][0]
    assert isinstance(first, LlamaServerGenerator)
    servers = sorted({g.config.server for g, _ in parts if isinstance(g, LlamaServerGenerator)})
    if len(servers) > 1:
        raise ConfigError(f"mix_adapters: the experts are on several servers ({', '.join(servers)}); only adapters "
                          "on one llama-server can be mixed")
    mix = [(name, scale * float(w)) for g, w in parts if isinstance(g, LlamaServerGenerator) for name, scale in g.mix]
    return LlamaServerGenerator(replace(first.config, lora=None), mix=mix)
