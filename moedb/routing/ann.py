"""hnswlib indexes for centroids (thousands of experts) and for the documents of large experts.

:class:`HnswIndex` keeps integer labels in sync with a set of ``(label, unit vector)`` rows: new rows
are added (resizing explicitly), vanished rows are ``mark_deleted``, and the index is rebuilt when
deletions pile up. ``k`` is clamped to the live items. Writes hold a lock. The state round-trips
through bytes (hnswlib's own file format) so the store can persist it; ``ef`` is saved beside it.
"""
from __future__ import annotations

import os
import tempfile
import threading

import numpy as np


class HnswIndex:
    """Cosine HNSW index over unit vectors of dimension ``dim``.

    ``M``/``ef_construction``: graph parameters; ``ef``: search breadth (persisted);
    ``rebuild_ratio``: rebuild when deleted items exceed this share of all items.
    Learned state: ``labels_`` (set of live labels), ``index_`` (hnswlib.Index).
    """

    def __init__(self, dim: int, M: int = 32, ef_construction: int = 200, ef: int = 128,
                 rebuild_ratio: float = 0.3, seed: int = 0, space: str = "cosine"):
        self.dim = int(dim)
        self.M = M
        self.ef_construction = ef_construction
        self.ef = ef
        self.rebuild_ratio = rebuild_ratio
        self.seed = seed
        self.space = space
        self._lock = threading.Lock()
        self.index_ = None
        self.labels_: set[int] = set()
        self.deleted_ = 0

    def _new(self, capacity: int):
        import hnswlib

        idx = hnswlib.Index(space=self.space, dim=self.dim)
        idx.init_index(max_elements=max(int(capacity), 16), ef_construction=self.ef_construction, M=self.M,
                       random_seed=self.seed)
        idx.set_ef(self.ef)
        return idx

    def fit(self, labels: np.ndarray, vectors: np.ndarray) -> "HnswIndex":
        """Build from scratch: ``labels`` ``(n,)`` int64, ``vectors`` ``(n, dim)`` float32."""
        labels = np.asarray(labels, dtype=np.int64)
        with self._lock:
            self.index_ = self._new(len(labels) * 5 // 4 + 16)
            if len(labels):
                self.index_.add_items(np.asarray(vectors, dtype=np.float32), labels, num_threads=1)
            self.labels_ = set(labels.tolist())
            self.deleted_ = 0
        return self

    def sync(self, labels: np.ndarray, vectors: np.ndarray) -> dict[str, int]:
        """Make the live items exactly ``labels`` (rows of ``vectors``); returns counts added/deleted/rebuilt.

        A label whose vector changed must be deleted and re-added by the caller (labels are row ids,
        which never change their vector in moedb).
        """
        labels = np.asarray(labels, dtype=np.int64)
        if self.index_ is None:
            self.fit(labels, vectors)
            return {"added": len(labels), "deleted": 0, "rebuilt": 1}
        want = set(labels.tolist())
        gone = self.labels_ - want
        new_mask = np.fromiter((lab not in self.labels_ for lab in labels.tolist()), bool, count=len(labels))
        if self.deleted_ + len(gone) > self.rebuild_ratio * max(len(self.labels_) + self.deleted_, 1):
            self.fit(labels, vectors)
            return {"added": int(new_mask.sum()), "deleted": len(gone), "rebuilt": 1}
        with self._lock:
            for lab in gone:
                self.index_.mark_deleted(int(lab))
            self.deleted_ += len(gone)
            if new_mask.any():
                need = self.index_.get_current_count() + int(new_mask.sum())
                if need > self.index_.get_max_elements():
                    self.index_.resize_index(need * 5 // 4 + 16)
                self.index_.add_items(np.asarray(vectors, np.float32)[new_mask], labels[new_mask], num_threads=1)
            self.labels_ = want
        return {"added": int(new_mask.sum()), "deleted": len(gone), "rebuilt": 0}

    def __len__(self) -> int:
        return len(self.labels_)

    def set_ef(self, ef: int) -> None:
        self.ef = int(ef)
        if self.index_ is not None:
            self.index_.set_ef(self.ef)

    def query(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(labels (n, k'), cosine similarities (n, k'))`` with ``k' = min(k, live items)``, best first."""
        Q = np.atleast_2d(np.asarray(Q, dtype=np.float32))
        k = min(int(k), len(self.labels_))
        if k <= 0 or self.index_ is None:
            return np.zeros((len(Q), 0), np.int64), np.zeros((len(Q), 0), np.float32)
        self.index_.set_ef(max(self.ef, k))
        lab, dist = self.index_.knn_query(Q, k=k, num_threads=1)
        sim = 1.0 - dist if self.space == "cosine" else -dist
        return lab.astype(np.int64), sim.astype(np.float32)

    # ------------------------------------------------------------------ persistence
    def to_bytes(self) -> bytes:
        """hnswlib's serialised index (including deleted marks)."""
        with self._lock:
            fd, path = tempfile.mkstemp(suffix=".hnsw")
            os.close(fd)
            try:
                self.index_.save_index(path)
                with open(path, "rb") as f:
                    return f.read()
            finally:
                os.unlink(path)

    @classmethod
    def from_bytes(cls, blob: bytes, dim: int, labels: np.ndarray, ef: int = 128, deleted: int = 0,
                   **params) -> "HnswIndex":
        import hnswlib

        self = cls(dim, ef=ef, **params)
        fd, path = tempfile.mkstemp(suffix=".hnsw")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            idx = hnswlib.Index(space=self.space, dim=self.dim)
            idx.load_index(path, allow_replace_deleted=False)
        finally:
            os.unlink(path)
        idx.set_ef(ef)
        self.index_ = idx
        self.labels_ = set(np.asarray(labels, dtype=np.int64).tolist())
        self.deleted_ = int(deleted)
        return self


def exact_topk(Q: np.ndarray, X: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of unit ``Q`` ``(n, d)`` against unit ``X`` ``(m, d)``: ``(labels, sims)`` ``(n, k')``."""
    k = min(int(k), len(X))
    S = np.atleast_2d(np.asarray(Q, np.float32)) @ np.asarray(X, np.float32).T
    if k <= 0:
        return np.zeros((len(S), 0), np.int64), np.zeros((len(S), 0), np.float32)
    part = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < S.shape[1] else np.tile(np.arange(S.shape[1]), (len(S), 1))
    rows = np.arange(len(S))[:, None]
    order = np.argsort(-S[rows, part], axis=1, kind="stable")
    idx = part[rows, order]
    return np.asarray(labels, np.int64)[idx], S[rows, idx]
