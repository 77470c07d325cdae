"""The ``documents`` table: passages with their vectors, kept in step with their expert's running sum."""
from __future__ import annotations

import json
import time
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ..errors import DuplicateDocument
from ..vectors import F4
from .connection import Connection, dumps as _dumps
from .vector_index import VectorIndex


class DocumentTable:
    """Documents of experts: text, metadata, source, position and a ``<f4`` unit vector."""

    def __init__(self, db: Connection, vectors: VectorIndex):
        self.db = db
        self.vectors = vectors  # kept in step by triggers; created here with the first vectors

    def insert(self, expert_id: int, rows: Sequence[tuple], vectors: np.ndarray,
                         on_conflict: str = "error") -> int:
        """Insert documents and update the expert's running vector sum.

        ``rows``: ``(doc_id, text, metadata: dict, source, position)`` per document;
        ``vectors``: float32 array of shape ``(len(rows), d)``, already validated and normalised.
        ``on_conflict``: ``"error"`` (raise DuplicateDocument), ``"skip"`` or ``"replace"``.
        Returns the number of documents inserted.
        """
        if on_conflict not in ("error", "skip", "replace"):
            raise ValueError(f"on_conflict must be error, skip or replace, not {on_conflict!r}")
        now = time.time()
        vecs = np.asarray(vectors, dtype=F4)
        with self.db.atomic():
            self.db.check_embedder()
            if len(vecs):
                self.vectors.ensure(vecs.shape[1])
            row = self.db.q1("SELECT n_docs, vec_sum FROM experts WHERE id=?", (expert_id,))
            n, vs = row
            total = np.frombuffer(vs, dtype="<f8").copy() if vs else np.zeros(vecs.shape[1], dtype="<f8")
            added = 0
            cur = self.db.conn.cursor()
            for (doc_id, text, md, source, position), v in zip(rows, vecs):
                old = self.db.q1("SELECT id, embedding FROM documents WHERE expert_id=? AND doc_id=?", (expert_id, doc_id))
                if old is not None:
                    if on_conflict == "error":
                        raise DuplicateDocument(f"document id {doc_id!r} already exists in this expert")
                    if on_conflict == "skip":
                        continue
                    total -= np.frombuffer(old[1], dtype=F4)
                    n -= 1
                    cur.execute("DELETE FROM documents WHERE id=?", (old[0],))
                cur.execute(
                    "INSERT INTO documents(expert_id, doc_id, text, metadata, source, position, embedding, created_at)"
                    " VALUES (?,?,?,?,?,?,?,?)",
                    (expert_id, doc_id, text, _dumps(md), source, position, v.tobytes(), now),
                )
                total += v
                n += 1
                added += 1
            self.db.conn.execute(
                "UPDATE experts SET n_docs=?, vec_sum=?, version=version+1, updated_at=? WHERE id=?",
                (n, total.astype("<f8").tobytes() if n else None, now, expert_id),
            )
        return added

    def delete(self, expert_id: int, doc_ids: Iterable[str]) -> int:
        """Remove documents by id; returns how many were removed. Unknown ids are ignored."""
        now = time.time()
        with self.db.atomic():
            n, vs = self.db.q1("SELECT n_docs, vec_sum FROM experts WHERE id=?", (expert_id,))
            total = np.frombuffer(vs, dtype="<f8").copy() if vs else None
            removed = 0
            for doc_id in doc_ids:
                old = self.db.q1("SELECT id, embedding FROM documents WHERE expert_id=? AND doc_id=?", (expert_id, doc_id))
                if old is None:
                    continue
                total -= np.frombuffer(old[1], dtype=F4)
                self.db.conn.execute("DELETE FROM documents WHERE id=?", (old[0],))
                n -= 1
                removed += 1
            if removed:
                if n == 0:
                    total = None
                self.db.conn.execute(
                    "UPDATE experts SET n_docs=?, vec_sum=?, version=version+1, updated_at=? WHERE id=?",
                    (n, total.tobytes() if total is not None else None, now, expert_id),
                )
        return removed

    def move(self, from_id: int, to_id: int, rowids: Optional[Sequence[int]] = None) -> int:
        """Move documents (all, or the given row ids) between experts, keeping both sums current."""
        with self.db.atomic():
            if rowids is None:
                rowids = [r[0] for r in self.db.q("SELECT id FROM documents WHERE expert_id=?", (from_id,))]
            moved = 0
            for rid in rowids:
                row = self.db.q1("SELECT doc_id FROM documents WHERE id=? AND expert_id=?", (rid, from_id))
                if row is None:
                    continue
                if self.db.q1("SELECT 1 FROM documents WHERE expert_id=? AND doc_id=?", (to_id, row[0])):
                    self.db.conn.execute(
                        "UPDATE documents SET doc_id = doc_id || '~' || id WHERE id=?", (rid,)
                    )
                self.db.conn.execute("UPDATE documents SET expert_id=? WHERE id=?", (to_id, rid))
                moved += 1
            self.recompute_sum(from_id)
            self.recompute_sum(to_id)
        return moved

    def recompute_sum(self, expert_id: int) -> None:
        """Recompute an expert's vector sum from its members (used after bulk moves)."""
        ids, m = self.vectors_of(expert_id)
        total = m.astype(np.float64).sum(axis=0) if len(ids) else None
        self.db.conn.execute(
            "UPDATE experts SET n_docs=?, vec_sum=?, version=version+1, updated_at=? WHERE id=?",
            (len(ids), total.astype("<f8").tobytes() if total is not None else None, time.time(), expert_id),
        )

    def vectors_of(self, expert_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ids ``(n,)`` int64 and vectors ``(n, d)`` float32 of an expert's documents."""
        rows = self.db.q("SELECT id, embedding FROM documents WHERE expert_id=? ORDER BY id", (expert_id,))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        m = np.frombuffer(b"".join(r[1] for r in rows), dtype=F4).reshape(len(rows), -1).astype(np.float32)
        return ids, m

    def sample(self, expert_id: int, n: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Up to ``n`` of an expert's documents, the same ones every time while it is unchanged (a fixed
        hash of the row id orders them): ``(rowids (m,) int64, texts, unit vectors (m, d) float32)``."""
        rows = self.db.q("SELECT id, text, embedding FROM documents WHERE expert_id=? "
                         "ORDER BY (id * 2654435761) % 4294967296 LIMIT ?", (expert_id, int(n)))
        if not rows:
            return np.zeros(0, np.int64), [], np.zeros((0, 0), np.float32)
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        m = np.frombuffer(b"".join(r[2] for r in rows), dtype=F4).reshape(len(rows), -1).astype(np.float32)
        return ids, [r[1] for r in rows], m

    def by_rowid(self, rowids: Sequence[int]) -> dict[int, dict[str, Any]]:
        if not len(rowids):
            return {}
        rows = self.db.in_chunks("SELECT id, expert_id, doc_id, text, metadata, source, position FROM documents "
                                 "WHERE id IN ({marks})", [int(r) for r in rowids])
        return {rid: {"expert_id": eid, "id": doc_id, "text": text, "metadata": json.loads(md), "source": source,
                      "position": position} for rid, eid, doc_id, text, md, source, position in rows}

    def list(self, expert_id: int, limit: int = -1, offset: int = 0) -> list[dict[str, Any]]:
        return [
            {"rowid": rid, "id": d, "text": t, "metadata": json.loads(md), "source": s, "position": p}
            for rid, d, t, md, s, p in self.db.q(
                "SELECT id, doc_id, text, metadata, source, position FROM documents WHERE expert_id=? "
                "ORDER BY id LIMIT ? OFFSET ?", (expert_id, limit, offset))
        ]

    def count(self) -> int:
        return self.db.q1("SELECT count(*) FROM documents")[0]

    def for_fit(self, expert_ids: Sequence[int]) -> dict[int, tuple[list[int], list[str], bytes, list[int]]]:
        """``{expert_id: (rowids, texts, concatenated <f4 embeddings, tuned flags)}`` for fitting the gate."""
        out: dict[int, tuple[list[int], list[str], list[bytes], list[int]]] = {
            int(i): ([], [], [], []) for i in expert_ids}
        if not out:
            return {}
        for rid, eid, text, emb, tuned in self.db.in_chunks(
                "SELECT id, expert_id, text, embedding, tuned FROM documents WHERE expert_id IN ({marks}) ORDER BY id",
                list(out)):
            o = out[eid]
            o[0].append(rid)
            o[1].append(text)
            o[2].append(emb)
            o[3].append(tuned)
        return {i: (a, b, b"".join(c), t) for i, (a, b, c, t) in out.items()}

    def vectors_by_rowid(self, rowids: Sequence[int], dim: int) -> np.ndarray:
        """The stored vectors ``(len(rowids), dim)`` float32 of these documents, in that order (zeros for a
        row id that is not there)."""
        out = np.zeros((len(rowids), dim), dtype=np.float32)
        pos: dict[int, list[int]] = {}
        for i, r in enumerate(rowids):
            pos.setdefault(int(r), []).append(i)
        for rid, emb in self.db.in_chunks("SELECT id, embedding FROM documents WHERE id IN ({marks})", list(pos)):
            if emb is not None:
                out[pos[rid]] = np.frombuffer(emb, dtype=F4)
        return out
