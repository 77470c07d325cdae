"""The ``mlx`` backend: mlx-lm models (extra ``mlx``: Apple silicon, or ``mlx[cpu]`` on Linux).

Config fields: ``model`` (a local mlx model directory: config.json, *.safetensors, tokenizer
files; nothing is downloaded), ``adapter_path`` (a directory with ``adapter_config.json`` and
``adapters.safetensors`` as written by ``mlx_lm.lora``), ``mode`` (``auto``: chat when the
tokenizer has a chat template), and the common fields.

mlx-lm applies an adapter by replacing the model's linear layers, so each (model, adapter) pair
is loaded once per process and kept; requests are grouped per base model and ordered by adapter
by the ask runner. All mlx calls are serialised by one lock (mlx streams are per process).
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from .base import GenerationError, Generation, GenRequest, Generator, OnToken, build_messages, messages_to_prompt
from .schema import BaseConfig, Mode, err, resolve_path, setting


def mlx_model(name: str, value: Any, base_dir: Optional[str]) -> str:
    """The absolute path of a local mlx model directory (a hub id such as ``org/model`` is refused)."""
    if isinstance(value, str) and not os.path.exists(os.path.expanduser(value)) and \
            re.match(r"^[\w.-]+/[\w.-]+$", value) and base_dir is None and not value.startswith("."):
        raise err(name, f"{value!r} is not a local directory (models are never downloaded; "
                        "give the path of an mlx model directory)")
    p = resolve_path(name, value, base_dir)
    if not os.path.isdir(p) or not os.path.isfile(os.path.join(p, "config.json")):
        raise err(name, f"{p} is not an mlx model directory (needs config.json and *.safetensors)")
    return p


def mlx_adapter(name: str, value: Any, base_dir: Optional[str]) -> str:
    """The absolute path of an adapter directory written by ``mlx_lm.lora``."""
    p = resolve_path(name, value, base_dir)
    for need in ("adapter_config.json", "adapters.safetensors"):
        q = os.path.join(p, need)
        if not os.path.isfile(q) or not os.access(q, os.R_OK):
            raise err(name, f"{p} has no readable {need}")
    return p


@dataclass(frozen=True)
class MlxConfig(BaseConfig):
    """A local mlx model directory and an optional LoRA adapter directory for it."""

    model: str = setting("", check=mlx_model, required=True)
    adapter_path: Optional[str] = setting(None, check=mlx_adapter)
    mode: Mode = "auto"

_LOADED: dict[tuple[str, Optional[str]], tuple[Any, Any]] = {}
_LOCK = threading.RLock()
_STATS = {"model_loads": 0, "generations": 0}


def mlx_stats() -> dict[str, int]:
    """How many (model, adapter) pairs were loaded and how many generations ran."""
    with _LOCK:
        return dict(_STATS)


def unload_all() -> None:
    with _LOCK:
        _LOADED.clear()


def _load(model: str, adapter: Optional[str]) -> tuple[Any, Any]:
    key = (model, adapter)
    with _LOCK:
        if key not in _LOADED:
            try:
                import mlx_lm
            except ImportError as e:
                raise GenerationError(f"mlx-lm is not installed (pip install 'moedb[mlx]'): {e}",
                                      retryable=False) from None
            try:
                _LOADED[key] = mlx_lm.load(model, adapter_path=adapter)
            except Exception as e:
                raise GenerationError(f"cannot load mlx model {model}"
                                      + (f" with adapter {adapter}" if adapter else "") + f": {e}",
                                      retryable=False) from None
            _STATS["model_loads"] += 1
        return _LOADED[key]


class MlxGenerator(Generator):
    """An mlx-lm model, optionally with a LoRA adapter directory."""

    backend = "mlx"
    config: MlxConfig

    def group_key(self) -> tuple:
        return ("mlx", self.config.model)

    def adapter_key(self) -> str:
        return self.config.adapter_path or ""

    def describe(self) -> str:
        a = self.config.adapter_path
        return f"mlx {self.config.model}" + (f" + {a}" if a else "")

    def _generate(self, req: GenRequest, on_token: OnToken, deadline: float) -> Generation:
        cfg = self.config
        with _LOCK:
            model, tok = _load(cfg.model, cfg.adapter_path)
            import mlx.core as mx
            from mlx_lm import stream_generate
            from mlx_lm.sample_utils import make_sampler

            messages = build_messages(req, cfg)
            has_template = getattr(tok, "chat_template", None) is not None
            if cfg.mode == "chat" or (cfg.mode == "auto" and has_template):
                prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            else:
                prompt = messages_to_prompt(messages)
            mx.random.seed(cfg.seed + req.seed_offset)
            sampler = make_sampler(temp=cfg.temperature, top_p=cfg.top_p)
            stops = list(cfg.stop)
            parts: list[str] = []
            pt = ct = 0
            fin = "length"
            timed_out = False
            try:
                for r in stream_generate(model, tok, prompt, max_tokens=cfg.max_tokens,
                                         sampler=sampler):
                    pt, ct = int(r.prompt_tokens), int(r.generation_tokens)
                    if r.text:
                        parts.append(r.text)
                        if on_token is not None:
                            on_token(r.text)
                    if r.finish_reason:
                        fin = r.finish_reason
                    text_so_far = "".join(parts)
                    if stops and any(s in text_so_far for s in stops):
                        fin = "stop"
                        break
                    if time.perf_counter() > deadline:
                        timed_out = True
                        break
            except Exception as e:
                raise GenerationError(f"mlx generation failed: {type(e).__name__}: {e}", retryable=False) from None
            _STATS["generations"] += 1
        if timed_out:
            raise GenerationError(f"timed out after {cfg.timeout} s", timed_out=True, retryable=False)
        text = "".join(parts)
        for s in stops:
            if s in text:
                text = text[:text.index(s)]
        return Generation(text=text.strip(), prompt_tokens=pt, completion_tokens=ct, finish_reason=fin,
                          citations=list(req.passages), info={"adapter": cfg.adapter_path})
