"""Generation experts: backends that turn an expert's routed passages into an answer.

Backends (each in its own module, heavy imports done lazily):

* ``extractive`` (default, no model): quotes and cites the best passages.
* ``llama``: a local GGUF model through llama-cpp-python, with an optional LoRA adapter per expert.
* ``mlx``: mlx-lm (Apple silicon; ``mlx[cpu]`` on Linux), with ``adapter_path`` per expert.
* ``openai``: any OpenAI-compatible server at its own ``base_url`` (the ``openai`` SDK).
* ``llama_server``: one llama.cpp ``llama-server`` holding every expert's LoRA adapter, the adapter chosen
  per request by file name (:func:`mix_adapters` applies several at once).

Each backend is registered once in :data:`moedb.generate.config.REGISTRY` (generator class and
typed config class). :func:`validate_config` refuses a bad configuration when it is set;
:func:`make_generator` builds the backend object for a validated configuration.
"""
from __future__ import annotations

from .base import Generation, GenerationError, GenRequest, Generator
from .config import BACKENDS, effective_config, make_generator, validate_config
from .llama_server import mix_adapters

__all__ = ["BACKENDS", "validate_config", "effective_config", "make_generator", "Generator", "GenRequest",
           "Generation", "GenerationError", "mix_adapters"]
