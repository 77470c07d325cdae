"""Any sentence-transformers model, run by sentence-transformers itself (torch).

torch and sentence-transformers are the optional extra ``tune`` (``pip install "moedb[tune]"``); they
are imported on the first :meth:`SentenceTransformerEmbedder.embed`, never when this module is imported.
"""
from __future__ import annotations

import importlib.util
import threading
from typing import Any, Optional

import numpy as np

from ..errors import ConfigError, InvalidInput
from .base import DEFAULT_DIM, check_texts, default_model_path, model_name

EXTRA_HINT = 'pip install "moedb[tune]"'


def _missing_extra() -> ConfigError:
    return ConfigError("this embedder runs on sentence-transformers (torch), which is not installed; "
                       f"install the optional extra: {EXTRA_HINT}")


def require_sentence_transformers() -> None:
    """Raise :class:`ConfigError` naming the ``tune`` extra when sentence-transformers cannot be imported.

    Only looks the package up (no import: importing it costs seconds).
    """
    try:
        found = importlib.util.find_spec("sentence_transformers") is not None
    except (ImportError, ValueError):  # a broken or half-imported installation
        found = False
    if not found:
        raise _missing_extra()


def _sentence_transformer_class() -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise _missing_extra() from None
    try:
        from transformers.utils import logging as _tlog

        _tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - older transformers
        pass
    return SentenceTransformer


class SentenceTransformerEmbedder:
    """A sentence-transformers model, loaded lazily and offline (never fetched from a hub).

    ``model``: a model name (found in the local Hugging Face cache) or a local folder; ``None`` means
    the bundled all-MiniLM-L6-v2. ``dim``: the vector size when known (else read from the model).
    Raises :class:`ConfigError` when sentence-transformers is not installed.
    """

    def __init__(self, model: Optional[str] = None, batch_size: int = 64, device: str = "cpu",
                 dim: Optional[int] = None):
        require_sentence_transformers()
        self.model = model
        self.batch_size = batch_size
        self.device = device
        self.name = model_name(model)
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

    def _load(self) -> Any:
        """The loaded ``SentenceTransformer`` (loaded once, thread-safe)."""
        with self._lock:
            if self._st is None:
                cls = _sentence_transformer_class()
                path = default_model_path() if self.model is None else self.model
                try:
                    self._st = cls(path, device=self.device, local_files_only=True)
                except Exception as e:
                    raise ConfigError(f"embedder: cannot load sentence-transformers model {path!r}: {e}") from None
            return self._st

    @property
    def max_tokens(self) -> int:
        """Word pieces a text may hold, special tokens included (the model's ``max_seq_length``)."""
        return int(self._load().max_seq_length)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text as :meth:`embed` tokenises it, before truncation, special tokens included. ``(n,)``."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInput(f"text #{i} is {type(t).__name__}, expected str")
        if not texts:
            return []
        st = self._load()
        if getattr(st[0], "do_lower_case", False):
            texts = [t.lower() for t in texts]
        ids = st.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` -> float32 ``(n, dim)`` unit rows."""
        texts = check_texts(list(texts))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        st = self._load()
        v = st.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                      normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(v, dtype=np.float32)
