"""The store interface: what moedb keeps and how the layers above reach it.

A backend implements :class:`Store`: a transaction and meta API plus one object per area (experts,
documents with their vectors, query log, feedback, load aggregates, fitted artefacts, balancing state).
:class:`~moedb.store.sqlite.SQLiteStore` is the implementation; a second backend (say PostgreSQL with
pgvector) implements the same protocols. Rows cross this boundary as plain dicts, tuples and NumPy arrays.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Optional, Protocol, Sequence

import numpy as np


class Experts(Protocol):
    """Experts: one row each (name, description, keywords, parent, metadata, generator, running vector sum)."""
    def rows(self, ids: Optional[Sequence[int]] = None) -> list[dict[str, Any]]:
        """Every expert (``ids``: only these), in id order."""
        ...
    def stamps(self) -> list[tuple[int, int, float, Optional[int]]]:
        """``(id, version, updated_at, parent_id)`` of every expert in id order: what tells a cached row"""
        ...
    def row(self, name: str) -> dict[str, Any]:
        ...
    def id_of(self, name: str) -> int:
        ...
    def insert(self, name: str, description: str, keywords: list[str], parent_id: Optional[int],
                      metadata: dict, generator: Optional[dict], refuse: bool = False) -> int:
        ...
    def update(self, expert_id: int, **fields: Any) -> None:
        ...
    def delete(self, expert_id: int) -> None:
        ...
    def children(self, expert_id: int) -> list[int]:
        ...

class Documents(Protocol):
    """Documents of experts: text, metadata, source, position and a ``<f4`` unit vector."""
    def insert(self, expert_id: int, rows: Sequence[tuple], vectors: np.ndarray,
                         on_conflict: str = "error") -> int:
        """Insert documents and update the expert's running vector sum."""
        ...
    def delete(self, expert_id: int, doc_ids: Iterable[str]) -> int:
        """Remove documents by id; returns how many were removed. Unknown ids are ignored."""
        ...
    def move(self, from_id: int, to_id: int, rowids: Optional[Sequence[int]] = None) -> int:
        """Move documents (all, or the given row ids) between experts, keeping both sums current."""
        ...
    def recompute_sum(self, expert_id: int) -> None:
        """Recompute an expert's vector sum from its members (used after bulk moves)."""
        ...
    def vectors_of(self, expert_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ids ``(n,)`` int64 and vectors ``(n, d)`` float32 of an expert's documents."""
        ...
    def by_rowid(self, rowids: Sequence[int]) -> dict[int, dict[str, Any]]:
        ...
    def list(self, expert_id: int, limit: int = -1, offset: int = 0) -> list[dict[str, Any]]:
        ...
    def count(self) -> int:
        ...
    def for_fit(self, expert_ids: Sequence[int]
                          ) -> dict[int, tuple[list[int], list[str], bytes, list[int]]]:
        """``{expert_id: (rowids, texts, concatenated <f4 embeddings, tuned flags)}`` for fitting the gate."""
        ...
    def sample(self, expert_id: int, n: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Up to ``n`` documents of an expert, the same while it is unchanged: ``(rowids, texts, vectors (m, d))``."""
        ...
    def vectors_by_rowid(self, rowids: Sequence[int], dim: int) -> np.ndarray:
        """The stored vectors ``(len(rowids), dim)`` float32 of these documents, in that order."""
        ...

class Log(Protocol):
    """Logged routes and the experts they chose."""
    def append(self, entries: Sequence[dict[str, Any]]) -> list[int]:
        """Append routes to the query log in one transaction; returns their query ids."""
        ...
    def count(self) -> int:
        ...
    def entry(self, query_id: int) -> Optional[dict[str, Any]]:
        ...
    def queries(self, query_ids: Sequence[int]) -> dict[int, tuple[str, Optional[bytes]]]:
        """``{query_id: (query text, query_vec bytes or None)}`` for the ids present in the log."""
        ...

class FeedbackEvents(Protocol):
    """Feedback events: query (text and vector), expert, reward, time, holdout bucket."""
    def keys_present(self, keys: Sequence[str]) -> set[str]:
        """The subset of ``keys`` already stored as feedback event keys."""
        ...
    def insert(self, rows: Sequence[tuple]) -> int:
        """Insert feedback rows in one transaction; returns how many were new."""
        ...
    def rows(self, heldout: Optional[bool], cut: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Usable feedback of live experts: ``(row ids (m,), vectors (m, d), expert ids (m,), rewards (m,))``."""
        ...
    def usable_count(self) -> int:
        """Feedback rows with a vector whose expert still exists (what the gate can learn from)."""
        ...
    def count(self, since_id: int = 0) -> int:
        ...
    def max_id(self) -> int:
        ...
    def of_expert(self, expert_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Feedback of one expert that carries a vector: ``(row ids (m,), vectors (m, d))``."""
        ...
    def set_expert(self, feedback_ids: Sequence[int], expert_id: int) -> None:
        ...
    def record_retrain(self, feedback_max: int, figures: dict[str, Any]) -> int:
        ...
    def last_retrain(self) -> Optional[dict[str, Any]]:
        ...
    def id_of(self, key: str) -> Optional[int]:
        """The row id of the event with this key (``None`` if there is none)."""
        ...
    def holdout_cut(self) -> int:
        """Events with ``bucket < cut`` are held out of training (set by the last retrain)."""
        ...
    def set_holdout_cut(self, cut: int) -> None:
        ...

class Loads(Protocol):
    """Per-expert load, latency percentiles, feedback success and router confusion over a time window."""
    def summary(self, since: Optional[float], until: Optional[float]) -> dict[str, Any]:
        """Totals over the window: queries, abstentions, first and last time."""
        ...
    def selections(self, since: Optional[float], until: Optional[float]) -> dict[int, int]:
        """Per expert id: how many times routes chose it at any rank."""
        ...
    def top_load(self, since: Optional[float], until: Optional[float], start: float,
                 width: float) -> list[tuple[int, int, int, float]]:
        """``(expert id, bucket, routes where it ranked first, sum of its confidence there)`` with"""
        ...
    def abstentions(self, since: Optional[float], until: Optional[float], start: float,
                              width: float) -> list[tuple[int, int]]:
        """``(bucket, abstained routes)`` over the window."""
        ...
    def by_expert(self, since: Optional[float], until: Optional[float]) -> dict[int, dict[str, float]]:
        """Per expert id: ``top`` (routes where it ranked first), ``mean_confidence`` there."""
        ...
    def latency_percentiles(self, since: Optional[float], until: Optional[float], n: int,
                            ps: Sequence[float] = (0.5, 0.95),
                            res: int = 64) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        """Exact nearest-rank latency percentiles (the value at sorted position ``floor(p * (n - 1))``),"""
        ...
    def feedback(self, since: Optional[float], until: Optional[float]) -> dict[int, dict[str, float]]:
        """Per expert id: feedback events, good (reward > 0), bad (reward < 0), mean reward."""
        ...
    def confused_pairs(self, ratio: float) -> list[tuple[int, int, int]]:
        """``(first expert id, second expert id, routes)`` where the second confidence of a logged"""
        ...

class ArtefactStore(Protocol):
    """Named artefacts (``routing_state``): ``(key, data bytes, figures dict)`` each, replaced atomically."""
    def get(self, name: str) -> Optional[tuple[str, bytes, dict[str, Any]]]:
        """``(key, data, figures)`` of a stored artefact, read in one statement, or ``None``."""
        ...
    def key(self, name: str) -> Optional[str]:
        ...
    def put(self, name: str, key: str, data: bytes, figures: Optional[dict] = None) -> None:
        """Replace an artefact atomically (one row, one transaction)."""
        ...
    def drop(self, prefix: str) -> int:
        """Delete artefacts whose name starts with ``prefix``; returns how many."""
        ...
    def names(self) -> list[str]:
        ...

class BalanceState(Protocol):
    """Per expert (``routing_balance``): bias, load, expected load, window start and count."""
    def rows(self) -> dict[int, tuple[float, float, float, float, int]]:
        """``{expert_id: (bias, load, expected, window_start, window_count)}``."""
        ...
    def apply(self, updates: Sequence[tuple[int, float, float, float, int]], max_bias: float,
                      window_start: float, now: float) -> None:
        """Add deltas ``(expert_id, d_bias, d_load, d_expected, d_window)`` in one transaction."""
        ...
    def reset(self, biases: bool = True) -> None:
        """Zero the load counters (and the biases unless ``biases=False``)."""
        ...


class VectorSearch(Protocol):
    """k-nearest passages inside experts (kept in step with the documents in their transactions)."""
    def knn(self, q: np.ndarray, expert_ids: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rowids (m,), cosine similarities (m,), expert ids (m,))`` of the ``k`` passages nearest to
        ``q`` ``(d,)`` inside the experts, best first."""
        ...
    def count(self) -> int:
        ...


class TextSearch(Protocol):
    """BM25 over passage titles and texts (kept in step with the documents in their transactions)."""
    def search(self, text: str, k: int, expert_ids: Optional[Sequence[int]] = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rowids (m,), BM25 scores (m,), expert ids (m,))`` best first; user text is plain words, never
        query syntax."""
        ...


class Store(Protocol):
    """One moedb file (or database): transactions, meta values and the areas above."""

    path: str
    experts: Experts
    documents: Documents
    log: Log
    feedback: FeedbackEvents
    loads: Loads
    artefacts: ArtefactStore
    balance: BalanceState
    vectors: VectorSearch
    text: TextSearch
    rolled_back: bool
    expected_embedder: Optional[str]

    def atomic(self) -> contextlib.AbstractContextManager:
        """A write transaction; nested calls are savepoints. A failure leaves the store as it was."""
        ...

    def snapshot(self) -> contextlib.AbstractContextManager:
        """Reads that see one committed state."""
        ...

    def data_version(self) -> int:
        """A number that changes when another connection commits."""
        ...

    def get_meta(self, key: str, default: Any = None) -> Any:
        ...

    def set_meta(self, key: str, value: Any) -> None:
        ...

    def schema_version(self) -> int:
        ...

    def close(self) -> None:
        ...

    def reassign_references(self, from_id: int, to_id: int) -> tuple[int, int]:
        """Point feedback and logged choices of one expert at another."""
        ...

    def texts_to_embed(self) -> tuple[list[tuple[int, int, str]], list[tuple[int, str]]]:
        """Every document ``(rowid, expert id, text)`` and feedback query ``(id, text)`` to re-embed."""
        ...

    def replace_embeddings(self, doc_vecs: dict[int, tuple[str, bytes]], tuned: set[int],
                           fb_vecs: dict[int, tuple[str, bytes]], record: dict[str, Any], embed: Any,
                           expect: Optional[dict[str, Any]] = None) -> dict[str, int]:
        """Switch the whole store to a new embedder in one transaction."""
        ...
