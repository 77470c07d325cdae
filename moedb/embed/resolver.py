"""Choosing an embedder: :func:`resolve` turns the ``embedder=`` argument of :func:`moedb.connect` into one.

The bundled model and local sentence-transformers BERT folders with mean pooling (tuned embedders) run
on onnxruntime (:class:`OnnxMiniLMEmbedder`) unless ``MOEDB_EMBEDDER=sentence-transformers`` is set or
onnxruntime / tokenizers are missing; anything else runs on sentence-transformers (the ``tune`` extra).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError
from .base import DEFAULT_MODEL, CallableEmbedder, Embedder, VectorsOnly
from .onnx_runtime import OnnxMiniLMEmbedder, check_pipeline
from .st import SentenceTransformerEmbedder

_ST_CHOICES = ("sentence-transformers", "sentence_transformers", "st", "torch")


def onnx_runtime_chosen() -> bool:
    """Whether models should run on onnxruntime: False when ``MOEDB_EMBEDDER=sentence-transformers`` is
    set or onnxruntime / tokenizers are missing (the caller then uses sentence-transformers, which gives
    the same vectors); ``MOEDB_EMBEDDER=onnx`` makes missing packages an error instead."""
    choice = os.environ.get("MOEDB_EMBEDDER", "").strip().lower()
    if choice in _ST_CHOICES:
        return False
    if choice not in ("", "onnx", "auto"):
        raise ConfigError(f"MOEDB_EMBEDDER={choice!r}: expected 'onnx' or 'sentence-transformers'")
    missing = [m for m in ("onnxruntime", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing and choice == "onnx":
        raise ConfigError(f"MOEDB_EMBEDDER=onnx needs the package(s) {', '.join(missing)} (pip install ...)")
    return not missing


def default_fast_embedder() -> Optional[OnnxMiniLMEmbedder]:
    """The ONNX embedder for the bundled model, or None when it cannot or should not be used
    (see :func:`onnx_runtime_chosen`)."""
    return OnnxMiniLMEmbedder() if onnx_runtime_chosen() else None


def _is_bert_folder(folder: str) -> bool:
    """A local BERT folder with ``tokenizer.json`` and ``model.safetensors`` (what the ONNX export reads)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            if json.load(f).get("model_type") != "bert":
                return False
    except (OSError, ValueError, AttributeError):
        return False
    return all(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "model.safetensors"))


def fast_folder(path: str) -> Optional[OnnxMiniLMEmbedder]:
    """The ONNX runtime for a local sentence-transformers BERT folder with mean pooling (a tuned
    embedder, say), else None: the caller uses sentence-transformers, which gives the same vectors.

    A bad ``MOEDB_EMBEDDER``, or ``MOEDB_EMBEDDER=onnx`` without its packages, raises
    :class:`ConfigError` (the user asked for it)."""
    folder = os.path.abspath(path)
    if not _is_bert_folder(folder) or not onnx_runtime_chosen():
        return None
    try:
        check_pipeline(Path(folder))
    except ConfigError:  # a pipeline the ONNX runtime does not reproduce: sentence-transformers runs it
        return None
    return OnnxMiniLMEmbedder(folder)


def resolve(embedder: Any) -> Embedder:
    """Turn the ``embedder=`` argument of :func:`moedb.connect` into an :class:`Embedder`.

    ``None`` -> the bundled MiniLM (the fast ONNX runtime when available, same vectors);
    ``str`` -> a sentence-transformers name or path (a local BERT folder with mean pooling runs on
    the ONNX runtime too); an object with ``embed`` -> wrapped. A model that needs sentence-transformers
    when it is not installed raises :class:`ConfigError` naming the ``tune`` extra.
    """
    if embedder is None:
        fast = default_fast_embedder()
        return fast if fast is not None else SentenceTransformerEmbedder()
    if isinstance(embedder, str):
        if embedder in (DEFAULT_MODEL, "sentence-transformers/" + DEFAULT_MODEL, "default"):
            return resolve(None)
        fast = fast_folder(embedder)
        return fast if fast is not None else SentenceTransformerEmbedder(embedder)
    if isinstance(embedder, (SentenceTransformerEmbedder, CallableEmbedder, VectorsOnly)):
        return embedder
    if getattr(embedder, "kind", None) in ("onnx-minilm", "onnx") and hasattr(embedder, "embed"):
        return embedder  # the ONNX runtime of the bundled model: keep it (the file records it as the model)
    if hasattr(embedder, "embed"):
        return CallableEmbedder(embedder)
    raise ConfigError(f"embedder: expected None, a model name or path, or an object with embed(); got {embedder!r}")
