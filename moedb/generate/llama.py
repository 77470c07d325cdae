"""The ``llama`` backend: a local GGUF model through llama-cpp-python (extra ``llama``).

Several experts may share one base model with different LoRA adapters. The base model is
loaded once per process (keyed by path, ``n_ctx`` and ``n_threads``); each adapter file is
loaded once and then activated on the shared context when a request needs it. Requests are
grouped per adapter by the ask runner (:meth:`Generator.adapter_key`), so an adapter is activated
once per group instead of being swapped back and forth. :func:`llama_stats` reports the
counts (model loads, adapter loads, adapter switches, generations) so this can be checked.

Config fields: ``model`` (GGUF path), ``lora`` (adapter GGUF path), ``lora_scale`` (1.0),
``n_ctx`` (2048), ``n_threads`` (half the cores, for prompts and generation alike), ``mode``
(``auto``: chat when the GGUF has a chat template, else a plain completion prompt), and the common
``system_prompt``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``timeout``, ``retries``.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from .base import GenerationError, Generation, GenRequest, Generator, OnToken, build_messages, messages_to_prompt
from .schema import BaseConfig, Mode, err, resolve_path, setting


def _gguf_kv(p: str) -> Optional[dict[str, Any]]:
    """Selected string metadata of a GGUF file, or None when the gguf package is absent."""
    try:
        import gguf
    except ImportError:
        return None
    try:
        r = gguf.GGUFReader(p)
    except Exception as e:  # corrupt header, truncated file
        raise ValueError(f"{type(e).__name__}: {e}") from None
    out: dict[str, Any] = {}
    for key in ("general.type", "general.architecture", "adapter.type"):
        f = r.fields.get(key)
        if f is not None and f.data:
            out[key] = bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
    return out


def _gguf(name: str, value: Any, base_dir: Optional[str], adapter: bool) -> str:
    """The absolute path of a readable GGUF file: a model, or (``adapter``) a LoRA adapter."""
    p = resolve_path(name, value, base_dir)
    if not os.path.exists(p):
        raise err(name, f"no such file: {p}")
    if not os.path.isfile(p):
        raise err(name, f"not a file: {p}")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise err(name, f"cannot read {p} ({e.strerror or e})") from None
    if magic != b"GGUF":
        raise err(name, f"{p} is not a GGUF file")
    try:
        kv = _gguf_kv(p)
    except ValueError as e:
        raise err(name, f"cannot parse {'adapter ' if adapter else ''}{p} ({e})") from None
    if kv is None:
        return p
    if not adapter and kv.get("general.type") == "adapter":
        raise err(name, f"{p} is a LoRA adapter, not a model (put it in generator.lora)")
    if adapter and (kv.get("general.type") != "adapter" or kv.get("adapter.type") != "lora"):
        raise err(name, f"{p} is not a LoRA adapter (general.type={kv.get('general.type')!r}, "
                        f"adapter.type={kv.get('adapter.type')!r})")
    return p


def gguf_model(name: str, value: Any, base_dir: Optional[str]) -> str:
    return _gguf(name, value, base_dir, adapter=False)


def gguf_lora(name: str, value: Any, base_dir: Optional[str]) -> str:
    return _gguf(name, value, base_dir, adapter=True)


@dataclass(frozen=True)
class LlamaConfig(BaseConfig):
    """A GGUF model, an optional LoRA adapter GGUF for it, and llama.cpp's context settings."""

    model: str = setting("", check=gguf_model, required=True)
    lora: Optional[str] = setting(None, check=gguf_lora)
    lora_scale: float = 1.0
    n_ctx: int = setting(2048, ge=16)
    n_threads: Optional[int] = setting(None, ge=1)
    mode: Mode = "auto"

_POOL: dict[tuple, "_SharedModel"] = {}
_POOL_LOCK = threading.Lock()


class _SharedModel:
    """One loaded base model, its loaded adapters and the currently active one."""

    def __init__(self, path: str, n_ctx: int, n_threads: Optional[int]):
        try:
            import llama_cpp
        except ImportError as e:
            raise GenerationError(f"llama-cpp-python is not installed (pip install 'moedb[llama]'): {e}",
                                  retryable=False) from None
        self.llama_cpp = llama_cpp
        # The same thread count for prompt processing and generation (llama-cpp-python's default uses
        # every core for prompts, which makes threads spin against each other on a busy machine).
        threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        kw: dict[str, Any] = {"n_ctx": n_ctx, "verbose": False, "n_threads": threads, "n_threads_batch": threads}
        try:
            self.llm = llama_cpp.Llama(model_path=path, **kw)
        except Exception as e:
            raise GenerationError(f"cannot load {path}: {e}", retryable=False) from None
        self.path = path
        self.n_ctx = n_ctx
        self.lock = threading.RLock()
        self.adapters: dict[str, Any] = {}
        self.active: tuple[Optional[str], float] = (None, 1.0)
        self.stats = {"model_loads": 1, "adapter_loads": 0, "adapter_switches": 0, "generations": 0,
                      "activations": []}
        self.has_chat_template = "tokenizer.chat_template" in (self.llm.metadata or {})

    def activate(self, lora: Optional[str], scale: float) -> None:
        """Make ``lora`` (or no adapter) the active adapter of the shared context."""
        if self.active == (lora, scale):
            return
        lc = self.llama_cpp
        ctx = self.llm._ctx.ctx
        if lora is None:
            rc = lc.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            ptr = self.adapters.get(lora)
            if ptr is None:
                ptr = lc.llama_adapter_lora_init(self.llm._model.model, lora.encode("utf-8"))
                if not ptr:
                    raise GenerationError(f"llama.cpp could not load the adapter {lora} for {self.path}",
                                          retryable=False)
                self.adapters[lora] = ptr
                self.stats["adapter_loads"] += 1
            arr = (lc.llama_adapter_lora_p_ctypes * 1)(ptr)
            rc = lc.llama_set_adapters_lora(ctx, arr, 1, (ctypes.c_float * 1)(scale))
        if rc != 0:
            raise GenerationError(f"llama.cpp could not activate adapter {lora}", retryable=False)
        self.llm.reset()  # cached KV entries were computed with the previous adapter
        self.active = (lora, scale)
        self.stats["adapter_switches"] += 1
        self.stats["activations"].append(lora)

    def close(self) -> None:
        for ptr in self.adapters.values():
            self.llama_cpp.llama_adapter_lora_free(ptr)
        self.adapters.clear()
        self.llm.close()


def _shared(path: str, n_ctx: int, n_threads: Optional[int]) -> _SharedModel:
    key = (path, n_ctx, n_threads)
    with _POOL_LOCK:
        m = _POOL.get(key)
        if m is None:
            m = _POOL[key] = _SharedModel(path, n_ctx, n_threads)
        return m


def llama_stats() -> dict[str, dict[str, Any]]:
    """Per loaded model: model loads, adapter loads, adapter switches, generations, activation order."""
    with _POOL_LOCK:
        return {f"{p} (n_ctx={c})": {**m.stats, "activations": list(m.stats["activations"])}
                for (p, c, _), m in _POOL.items()}


def unload_all() -> None:
    """Free every loaded model and adapter (tests and long-running processes)."""
    with _POOL_LOCK:
        for m in _POOL.values():
            m.close()
        _POOL.clear()


class LlamaGenerator(Generator):
    """A GGUF model (optionally with a LoRA adapter) run in-process by llama.cpp."""

    backend = "llama"
    config: LlamaConfig

    def _key(self) -> tuple:
        return (self.config.model, self.config.n_ctx, self.config.n_threads)

    def group_key(self) -> tuple:
        return ("llama",) + self._key()

    def adapter_key(self) -> str:
        return f"{self.config.lora or ''}@{float(self.config.lora_scale)}"

    def describe(self) -> str:
        lora = self.config.lora
        return f"llama {self.config.model}" + (f" + {lora}" if lora else "")

    def _generate(self, req: GenRequest, on_token: OnToken, deadline: float) -> Generation:
        m = _shared(*self._key())
        cfg = self.config
        params: dict[str, Any] = {
            "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "stop": list(cfg.stop), "seed": cfg.seed + req.seed_offset,
            "stopping_criteria": self.llama_stop(m, deadline),
        }
        messages = build_messages(req, cfg)
        chat = cfg.mode == "chat" or (cfg.mode == "auto" and m.has_chat_template)
        with m.lock:
            m.activate(cfg.lora, float(cfg.lora_scale))
            try:
                if chat:
                    text, pt, ct, fin = self._chat(m, messages, params, on_token)
                else:
                    text, pt, ct, fin = self._complete(m, messages, params, on_token)
            except GenerationError:
                raise
            except Exception as e:  # llama.cpp errors (context overflow, decode failure)
                raise GenerationError(f"{type(e).__name__}: {e}", retryable=False) from None
            m.stats["generations"] += 1
        if time.perf_counter() > deadline:
            raise GenerationError(f"timed out after {cfg.timeout} s", timed_out=True, retryable=False)
        return Generation(text=text.strip(), prompt_tokens=pt, completion_tokens=ct, finish_reason=fin or "stop",
                          citations=list(req.passages), info={"adapter": cfg.lora})

    @staticmethod
    def llama_stop(m: _SharedModel, deadline: float):
        lc = m.llama_cpp
        return lc.StoppingCriteriaList([lambda ids, logits: time.perf_counter() > deadline])

    @staticmethod
    def _complete(m: _SharedModel, messages, params, on_token) -> tuple[str, int, int, Optional[str]]:
        prompt = messages_to_prompt(messages)
        toks = m.llm.tokenize(prompt.encode("utf-8"), add_bos=True)
        room = m.n_ctx - params["max_tokens"]
        if room < 8:
            raise GenerationError(f"max_tokens {params['max_tokens']} leaves no room for the prompt in "
                                  f"n_ctx={m.n_ctx}", retryable=False)
        if len(toks) > room:  # keep the end of the prompt: the question and the "Answer:" cue
            toks = toks[:1] + toks[len(toks) - room + 1:]
        if on_token is None:
            r = m.llm.create_completion(toks, **params)
            u = r.get("usage") or {}
            return (r["choices"][0]["text"], int(u.get("prompt_tokens", len(toks))),
                    int(u.get("completion_tokens", 0)), r["choices"][0].get("finish_reason"))
        parts, fin = [], None
        for chunk in m.llm.create_completion(toks, stream=True, **params):
            piece = chunk["choices"][0]["text"]
            fin = chunk["choices"][0].get("finish_reason") or fin
            if piece:
                parts.append(piece)
                on_token(piece)
        return "".join(parts), len(toks), len(parts), fin

    @staticmethod
    def _chat(m: _SharedModel, messages, params, on_token) -> tuple[str, int, int, Optional[str]]:
        if on_token is None:
            r = m.llm.create_chat_completion(messages=messages, **params)
            u = r.get("usage") or {}
            return (r["choices"][0]["message"].get("content") or "", int(u.get("prompt_tokens", 0)),
                    int(u.get("completion_tokens", 0)), r["choices"][0].get("finish_reason"))
        parts, fin = [], None
        for chunk in m.llm.create_chat_completion(messages=messages, stream=True, **params):
            piece = chunk["choices"][0]["delta"].get("content")
            fin = chunk["choices"][0].get("finish_reason") or fin
            if piece:
                parts.append(piece)
                on_token(piece)
        return "".join(parts), 0, len(parts), fin
