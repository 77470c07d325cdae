"""The backend registry, and generator configurations at the boundary (plain dicts, stored as JSON).

A configuration is a dict with a ``backend`` (``extractive``, ``llama``, ``llama_server``, ``mlx``, ``openai``) and
that backend's fields. A dict without ``backend`` is an *overlay*: it only sets common fields
(``system_prompt``, limits, ...) on top of the database default generator.

Every backend is one entry of :data:`REGISTRY`: its :class:`Generator` class and its config class
(a frozen dataclass deriving from :class:`~moedb.generate.schema.BaseConfig`, which holds the
fields all backends share). Adding a backend is a module with those two classes and one line here.

:func:`validate_config` refuses a bad configuration when it is set, with
:class:`moedb.ConfigError` naming the field (``generator.lora: ...``); model and adapter paths are
checked (exist, readable, right format) and stored as absolute paths. :func:`make_generator`
builds the backend object for a validated configuration.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

from ..errors import ConfigError
from .base import Generator
from .extractive import ExtractiveConfig, ExtractiveGenerator
from .llama import LlamaConfig, LlamaGenerator
from .llama_server import LlamaServerConfig, LlamaServerGenerator
from .mlx import MlxConfig, MlxGenerator
from .openai import OpenAIConfig, OpenAIGenerator
from .schema import BaseConfig, err, parse


class Backend(NamedTuple):
    """A registered backend: the generator class and the config class it is built from."""

    generator: type[Generator]
    config: type[BaseConfig]


REGISTRY: dict[str, Backend] = {
    "extractive": Backend(ExtractiveGenerator, ExtractiveConfig),
    "llama": Backend(LlamaGenerator, LlamaConfig),
    "llama_server": Backend(LlamaServerGenerator, LlamaServerConfig),
    "mlx": Backend(MlxGenerator, MlxConfig),
    "openai": Backend(OpenAIGenerator, OpenAIConfig),
}
BACKENDS = tuple(REGISTRY)
# backends that need an optional package: backend -> (module, the moedb extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {"llama": ("llama_cpp", "llama"), "mlx": ("mlx_lm", "mlx"),
                                      "openai": ("openai", "openai"), "llama_server": ("openai", "openai")}


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # (ValueError: marked unimportable in sys.modules)
        return False


def validate_config(cfg: Any, base_dir: Optional[str] = None, expert: Optional[str] = None) -> dict:
    """The normalised configuration, or :class:`moedb.ConfigError` naming the bad field.

    ``base_dir``: where relative model/adapter paths are resolved (default: the current directory).
    ``expert``: the expert it is set for, named in errors of the backend's outside-world check
    (:meth:`BaseConfig.verify`, e.g. a llama-server's adapters).
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"generator must be a dict, got {type(cfg).__name__}")
    if "api_key" in cfg:
        raise err("api_key", "API keys are never stored in the file; put the key in an environment "
                             "variable and give its name as generator.api_key_env")
    backend = cfg.get("backend")
    if backend is None:
        return parse(BaseConfig, cfg, base_dir, None)
    entry = REGISTRY.get(backend) if isinstance(backend, str) else None
    if entry is None:
        raise err("backend", f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend in EXTRAS and not _installed(EXTRAS[backend][0]):
        module, extra = EXTRAS[backend]
        raise err("backend", f"the {backend} backend needs the extra {extra!r}, which is not installed "
                             f"(no module {module}): pip install \"moedb[{extra}]\"")
    out = parse(entry.config, cfg, base_dir, backend)
    entry.config.from_dict(out).verify(expert)
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


def make_generator(config: dict) -> Generator:
    """The backend object for a validated configuration (see :func:`validate_config`)."""
    backend = config.get("backend", "extractive")
    entry = REGISTRY.get(backend) if isinstance(backend, str) else None
    if entry is None:
        raise ConfigError(f"generator.backend: unknown backend {backend!r}")
    return entry.generator(entry.config.from_dict(config))
