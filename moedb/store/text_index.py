"""The passage text index: SQLite FTS5 over each passage's title (``metadata.title``) and text.

``documents_fts`` is a contentless FTS5 table (no second copy of the text; ``contentless_delete=1``
lets rows be removed) with the Porter stemmer over ``unicode61``. Triggers on ``documents`` (migration
0007) keep it in step inside the transaction of every write. :meth:`TextIndex.search` ranks by BM25
inside given experts or everywhere.

User text is never FTS5 query syntax: :func:`match_expression` keeps its words and quotes each one,
joined by ``OR`` (BM25 ranks passages that hold more and rarer words first), so quotes, ``*``, ``NEAR``,
``-``, ``:`` and parentheses are plain characters that cannot raise an SQL error.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..text import content_words, words
from .connection import CHUNK, Connection

TABLE = "documents_fts"
MAX_TERMS = 64  # a pasted page as a query keeps its first 64 words


def match_expression(text: str) -> str:
    """An FTS5 MATCH expression for the words of ``text`` (empty when it has none). Function words
    (:data:`moedb.text.STOPWORDS`) are left out unless the text has nothing else: they match nearly every
    passage, which costs time and adds nothing to the ranking."""
    terms = (content_words(text) or words(text))[:MAX_TERMS]
    return " OR ".join(f'"{w}"' for w in terms)


class TextIndex:
    """BM25 search over passages (FTS5)."""

    def __init__(self, db: Connection):
        self.db = db

    def search(self, text: str, k: int, expert_ids: Optional[Sequence[int]] = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``k`` passages that best match the words of ``text``, inside the given experts (``None``: all).

        Returns ``(rowids (m,) int64, BM25 scores (m,) float64, expert ids (m,) int64)``, best first,
        ``m <= k``; higher is better (FTS5's ``bm25()`` is negated). A text without words matches nothing.
        """
        expr = match_expression(text)
        if not expr or k < 1 or (expert_ids is not None and not len(expert_ids)):
            return np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64)
        base = (f"SELECT f.rowid, -bm25({TABLE}) AS s, d.expert_id FROM {TABLE} f JOIN documents d ON d.id = f.rowid "
                f"WHERE {TABLE} MATCH ?")
        rows: list[tuple] = []
        if expert_ids is None:
            rows = self.db.q(base + " ORDER BY s DESC, f.rowid LIMIT ?", (expr, int(k)))
        else:
            ids = [int(i) for i in expert_ids]
            for s in range(0, len(ids), CHUNK):
                part = ids[s:s + CHUNK]
                rows += self.db.q(base + f" AND d.expert_id IN ({','.join('?' * len(part))})"
                                  " ORDER BY s DESC, f.rowid LIMIT ?", [expr, *part, int(k)])
            rows.sort(key=lambda r: (-r[1], r[0]))
            rows = rows[:k]
        return (np.fromiter((r[0] for r in rows), np.int64, len(rows)),
                np.fromiter((r[1] for r in rows), np.float64, len(rows)),
                np.fromiter((r[2] for r in rows), np.int64, len(rows)))
