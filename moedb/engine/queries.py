"""Checking and encoding what a caller passes to ``route()`` and ``search()``: queries (texts or vectors),
``top_k`` / ``k`` / ``min_confidence`` and conversation context."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..errors import InvalidInput
from ..text import is_unicode
from ..vectors import as_matrix, normalize
from .embedding import FileEmbedder


def encode_queries(embedding: FileEmbedder, queries: Sequence[Any]) -> tuple[list[str], np.ndarray]:
    texts: list[Optional[str]] = []
    vecs: list[Optional[np.ndarray]] = []
    for i, q in enumerate(queries):
        if isinstance(q, str):
            if not q.strip():
                raise InvalidInput("query is empty" if len(queries) == 1 else f"query #{i} is empty")
            if not is_unicode(q):
                raise InvalidInput(f"query #{i} is not valid Unicode (a lone surrogate)")
            texts.append(q)
            vecs.append(None)
        elif isinstance(q, np.ndarray) or isinstance(q, (list, tuple)):
            v = as_matrix(q, embedding.dim, what="query vector")
            if v.shape[0] != 1:
                raise InvalidInput("a query vector must have shape (d,)")
            texts.append(None)
            vecs.append(normalize(v)[0])
        else:
            raise InvalidInput(f"query #{i}: expected str or vector, got {type(q).__name__}")
    todo = [i for i, v in enumerate(vecs) if v is None]
    if todo:
        emb = embedding.embed([texts[i] for i in todo])
        for j, i in enumerate(todo):
            vecs[i] = emb[j]
    Q = np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, embedding.dim), np.float32)
    return [t if t is not None else "<vector>" for t in texts], Q


def check_route_args(top_k: int, k: int, min_confidence: Optional[float]) -> Optional[float]:
    """Validated arguments; the explicit threshold or ``None`` (database default / calibrated)."""
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
        raise InvalidInput(f"top_k must be an integer >= 1, got {top_k!r}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise InvalidInput(f"k must be an integer >= 0, got {k!r}")
    if min_confidence is None:
        return None
    if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float, np.floating)) or \
            not (0.0 <= float(min_confidence) <= 1.0):
        raise InvalidInput(f"min_confidence must be a number in [0, 1], got {min_confidence!r}")
    return float(min_confidence)


def check_context(context: Any) -> list[str]:
    if context is None:
        return []
    if isinstance(context, str) or not isinstance(context, (list, tuple)):
        raise InvalidInput(f"context must be a list of strings (earlier turns), got {type(context).__name__}")
    for i, t in enumerate(context):
        if not isinstance(t, str):
            raise InvalidInput(f"context must be a list of strings: item #{i} is {type(t).__name__}")
    return [t for t in context if t.strip()]
