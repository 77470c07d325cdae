"""Validation of generator configurations, at the time they are set.

A configuration is a dict with a ``backend`` (``extractive``, ``llama``, ``mlx``, ``openai``) and
that backend's fields. A dict without ``backend`` is an *overlay*: it only sets common fields
(``system_prompt``, limits, ...) on top of the database default generator.

Every problem raises :class:`moedb.ConfigError` naming the field (``generator.lora: ...``), so a bad
configuration is refused when it is set, not when the first question arrives. Model and adapter
paths are checked (exist, readable, right format) and stored as absolute paths.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional
from urllib.parse import urlparse

from ..errors import ConfigError

BACKENDS = ("extractive", "llama", "mlx", "openai")

_COMMON: dict[str, str] = {
    "backend": "str", "system_prompt": "str", "max_tokens": "int>=1", "temperature": "float>=0",
    "top_p": "prob", "seed": "int", "stop": "stop", "timeout": "float>0", "retries": "int>=0",
    "retry_backoff": "float>=0", "max_context_chars": "int>=0",
}
_FIELDS: dict[str, dict[str, str]] = {
    "extractive": {"max_passages": "int>=1", "max_chars": "int>=1"},
    "llama": {"model": "gguf_model", "lora": "gguf_lora", "lora_scale": "float", "n_ctx": "int>=16",
              "n_threads": "int>=1", "mode": "mode"},
    "mlx": {"model": "mlx_model", "adapter_path": "mlx_adapter", "mode": "mode"},
    "openai": {"base_url": "url", "model": "str", "api_key_env": "envname", "lora": "server_lora",
               "mode": "mode"},
}
_REQUIRED = {"llama": ("model",), "mlx": ("model",), "openai": ("base_url",)}
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _err(field: str, msg: str) -> ConfigError:
    return ConfigError(f"generator.{field}: {msg}")


def _path(field: str, value: Any, base_dir: Optional[str]) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _err(field, "must be a non-empty path")
    p = os.path.expanduser(value)
    if not os.path.isabs(p):
        p = os.path.join(base_dir or os.getcwd(), p)
    return os.path.abspath(p)


def _readable_file(field: str, p: str) -> None:
    if not os.path.exists(p):
        raise _err(field, f"no such file: {p}")
    if not os.path.isfile(p):
        raise _err(field, f"not a file: {p}")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise _err(field, f"cannot read {p} ({e.strerror or e})") from None
    if magic != b"GGUF":
        raise _err(field, f"{p} is not a GGUF file")


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


def _check_value(field: str, kind: str, value: Any, base_dir: Optional[str]) -> Any:
    if kind == "str":
        if not isinstance(value, str):
            raise _err(field, f"must be a string, got {type(value).__name__}")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _err(field, f"must be an integer, got {value!r}")
        lo = int(kind[5:]) if kind.startswith("int>=") else None
        if lo is not None and value < lo:
            raise _err(field, f"must be >= {lo}, got {value}")
        return value
    if kind.startswith("float") or kind == "prob":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise _err(field, f"must be a number, got {value!r}")
        v = float(value)
        if kind == "float>=0" and v < 0:
            raise _err(field, f"must be >= 0, got {v}")
        if kind == "float>0" and v <= 0:
            raise _err(field, f"must be > 0, got {v}")
        if kind == "prob" and not (0 < v <= 1):
            raise _err(field, f"must be in (0, 1], got {v}")
        return v
    if kind == "stop":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise _err(field, "must be a string or a list of non-empty strings")
        return list(items)
    if kind == "mode":
        if value not in ("auto", "chat", "completion"):
            raise _err(field, f"must be auto, chat or completion, got {value!r}")
        return value
    if kind == "url":
        u = urlparse(value) if isinstance(value, str) else None
        if u is None or u.scheme not in ("http", "https") or not u.netloc:
            raise _err(field, f"must be an http(s) URL such as http://127.0.0.1:8080/v1, got {value!r}")
        return value.rstrip("/")
    if kind == "envname":
        if not isinstance(value, str) or not _ENV_RE.match(value):
            raise _err(field, f"must be the name of an environment variable, got {value!r}")
        return value
    if kind == "server_lora":
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return [{"id": value, "scale": 1.0}]
        if isinstance(value, list) and all(isinstance(x, dict) and isinstance(x.get("id"), int) for x in value):
            return [{"id": int(x["id"]), "scale": float(x.get("scale", 1.0))} for x in value]
        raise _err(field, "must be an adapter id (int) or a list of {id, scale} for llama-server")
    if kind in ("gguf_model", "gguf_lora"):
        p = _path(field, value, base_dir)
        _readable_file(field, p)
        what = "adapter " if kind == "gguf_lora" else ""
        try:
            kv = _gguf_kv(p)
        except ValueError as e:
            raise _err(field, f"cannot parse {what}{p} ({e})") from None
        if kv is None:
            return p
        if kind == "gguf_model" and kv.get("general.type") == "adapter":
            raise _err(field, f"{p} is a LoRA adapter, not a model (put it in generator.lora)")
        if kind == "gguf_lora" and (kv.get("general.type") != "adapter" or kv.get("adapter.type") != "lora"):
            raise _err(field, f"{p} is not a LoRA adapter (general.type={kv.get('general.type')!r}, "
                              f"adapter.type={kv.get('adapter.type')!r})")
        return p
    if kind == "mlx_model":
        if isinstance(value, str) and not os.path.exists(os.path.expanduser(value)) and \
                re.match(r"^[\w.-]+/[\w.-]+$", value) and base_dir is None and not value.startswith("."):
            raise _err(field, f"{value!r} is not a local directory (models are never downloaded; "
                              "give the path of an mlx model directory)")
        p = _path(field, value, base_dir)
        if not os.path.isdir(p) or not os.path.isfile(os.path.join(p, "config.json")):
            raise _err(field, f"{p} is not an mlx model directory (needs config.json and *.safetensors)")
        return p
    if kind == "mlx_adapter":
        p = _path(field, value, base_dir)
        for need in ("adapter_config.json", "adapters.safetensors"):
            q = os.path.join(p, need)
            if not os.path.isfile(q) or not os.access(q, os.R_OK):
                raise _err(field, f"{p} has no readable {need}")
        return p
    raise AssertionError(kind)


def validate_config(cfg: Any, base_dir: Optional[str] = None) -> dict:
    """The normalised configuration, or :class:`moedb.ConfigError` naming the bad field.

    ``base_dir``: where relative model/adapter paths are resolved (default: the current directory).
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"generator must be a dict, got {type(cfg).__name__}")
    if "api_key" in cfg:
        raise _err("api_key", "API keys are never stored in the file; put the key in an environment "
                              "variable and give its name as generator.api_key_env")
    backend = cfg.get("backend")
    if backend is not None and backend not in BACKENDS:
        raise _err("backend", f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    allowed = dict(_COMMON)
    if backend is not None:
        allowed.update(_FIELDS[backend])
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key not in allowed:
            where = f"the {backend} backend" if backend else "a generator without backend (an overlay)"
            raise _err(str(key), f"unknown field for {where}")
        if value is None and key != "backend":
            continue
        out[key] = _check_value(key, allowed[key], value, base_dir) if key != "backend" else value
    for req in _REQUIRED.get(backend or "", ()):
        if req not in out:
            raise _err(req, f"is required for the {backend} backend")
    return out


def effective_config(expert_cfg: Optional[dict], default_cfg: Optional[dict]) -> dict:
    """An expert's generator: its own, or its overlay on the database default, or extractive."""
    base = dict(default_cfg or {"backend": "extractive"})
    if not base.get("backend"):
        base = {"backend": "extractive", **base}
    if not expert_cfg:
        return base
    if expert_cfg.get("backend"):
        return dict(expert_cfg)
    return {**base, **expert_cfg}
