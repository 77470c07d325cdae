"""Generation experts: backends that turn an expert's routed passages into an answer.

Backends (each in its own module, heavy imports done lazily):

* ``extractive`` (default, no model): quotes and cites the best passages.
* ``llama``: a local GGUF model through llama-cpp-python, with an optional LoRA adapter per expert.
* ``mlx``: mlx-lm (Apple silicon; ``mlx[cpu]`` on Linux), with ``adapter_path`` per expert.
* ``openai``: any OpenAI-compatible server at its own ``base_url``.

:func:`validate_config` refuses a bad configuration when it is set; :func:`make_generator`
builds the backend object for a validated configuration.
"""
from __future__ import annotations

from .base import Generation, GenerationError, GenRequest, Generator
from .config import BACKENDS, effective_config, validate_config

__all__ = ["BACKENDS", "validate_config", "effective_config", "make_generator", "Generator", "GenRequest",
           "Generation", "GenerationError"]


def make_generator(config: dict) -> Generator:
    """The backend object for a validated configuration (see :func:`validate_config`)."""
    backend = config.get("backend", "extractive")
    if backend == "extractive":
        from .extractive import ExtractiveGenerator as cls
    elif backend == "llama":
        from .llama import LlamaGenerator as cls
    elif backend == "mlx":
        from .mlx import MlxGenerator as cls
    elif backend == "openai":
        from .openai import OpenAIGenerator as cls
    else:
        from ..errors import ConfigError

        raise ConfigError(f"generator.backend: unknown backend {backend!r}")
    return cls(config)
