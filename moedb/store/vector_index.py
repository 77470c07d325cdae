"""The passage vector index: a sqlite-vec ``vec0`` table partitioned by expert.

``doc_vectors(rowid = documents.id, expert_id partition key, embedding float[d] cosine)`` mirrors
``documents.embedding``. Triggers on ``documents`` keep it in step inside the transaction of every write
(insert, delete, a cascade from a removed expert, a move between experts, a re-embedding), so no code
path can leave the two apart. The table is created when the file's vector dimension is first known
(the first document, or migration 0008 for a file that has documents), because ``vec0`` fixes ``d``.

``documents.embedding`` stays the canonical copy: reading one expert's vectors back out of ``vec0``
(fitting a gate, a centroid, a split) costs about 31 us a vector through point lookups, or a scan of
the whole table with a partition filter, against 6 ms for 1,000 vectors from ``documents``
(sqlite-vec 0.1.9, measured in ``benches/bench_scale.py``). ``vec0`` serves what it is good at:
k-nearest search inside the routed experts without a copy of the corpus in the process.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .connection import CHUNK, Connection

TABLE = "doc_vectors"
# vectors per storage chunk; a partition (expert) allocates whole chunks, so sqlite-vec's default of 1,024
# costs 1.5 MB of file per expert at d=384 however few passages it has (CLINC150: 225 MB for 23 MB of
# vectors). 128 wastes at most 127 slots per expert; k-nearest time inside 1,000 vectors is unchanged
# within this machine's noise (benches/bench_scale.py).
CHUNK_SIZE = 128
WIDE = 64  # a k-nearest query over more experts than this scans the whole table once
MAX_K = 4096  # the most neighbours sqlite-vec returns per query
_TRIGGERS = (
    f"""CREATE TRIGGER IF NOT EXISTS {TABLE}_insert AFTER INSERT ON documents WHEN new.embedding IS NOT NULL
    BEGIN INSERT INTO {TABLE}(rowid, expert_id, embedding) VALUES (new.id, new.expert_id, new.embedding); END""",
    f"""CREATE TRIGGER IF NOT EXISTS {TABLE}_delete AFTER DELETE ON documents
    BEGIN DELETE FROM {TABLE} WHERE rowid = old.id; END""",
    f"""CREATE TRIGGER IF NOT EXISTS {TABLE}_update AFTER UPDATE OF expert_id, embedding ON documents
    BEGIN DELETE FROM {TABLE} WHERE rowid = old.id;
          INSERT INTO {TABLE}(rowid, expert_id, embedding)
          SELECT new.id, new.expert_id, new.embedding WHERE new.embedding IS NOT NULL; END""",
)


def exists(conn) -> bool:
    """Whether the file has its vector index (``conn``: an apsw connection)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name=?", (TABLE,)).fetchone() is not None


def create(conn, dim: int) -> None:
    """Create the index for vectors of ``dim`` floats, fill it from ``documents`` and add its triggers.

    Run inside a write transaction (migration 0008 and :meth:`VectorIndex.ensure` do)."""
    conn.execute(f"CREATE VIRTUAL TABLE {TABLE} USING vec0(expert_id integer partition key, "
                 f"embedding float[{int(dim)}] distance_metric=cosine, chunk_size={CHUNK_SIZE})")
    conn.execute(f"INSERT INTO {TABLE}(rowid, expert_id, embedding) "
                 "SELECT id, expert_id, embedding FROM documents WHERE embedding IS NOT NULL ORDER BY id")
    for sql in _TRIGGERS:
        conn.execute(sql)


def drop(conn) -> None:
    """Remove the index and its triggers (before the file's vectors change dimension)."""
    for name in ("insert", "delete", "update"):
        conn.execute(f"DROP TRIGGER IF EXISTS {TABLE}_{name}")
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")


class VectorIndex:
    """k-nearest passages inside experts, in SQL (sqlite-vec, exact float32 cosine)."""

    def __init__(self, db: Connection):
        self.db = db
        self._dim = 0  # the dimension this connection saw the index created with (0: unknown)

    def ensure(self, dim: int) -> None:
        """Create the index for ``dim``-float vectors if the file has none yet (inside the caller's transaction)."""
        if self._dim == dim:
            return
        with self.db.atomic():
            if not exists(self.db.conn):
                create(self.db.conn, dim)
        self._dim = dim

    def rebuild(self, dim: int) -> None:
        """Recreate the index from ``documents`` (after a re-embedding, possibly to another dimension)."""
        with self.db.atomic():
            drop(self.db.conn)
            create(self.db.conn, dim)
        self._dim = dim

    def count(self) -> int:
        """Vectors in the index (0 when the file has none yet)."""
        return self.db.q1(f"SELECT count(*) FROM {TABLE}")[0] if exists(self.db.conn) else 0

    def knn(self, q: np.ndarray, expert_ids: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``k`` passages nearest to the unit vector ``q`` ``(d,)`` inside the given experts.

        Returns ``(rowids (m,) int64, cosine similarities (m,) float32, expert ids (m,) int64)``, best
        first, ``m <= k``.
        sqlite-vec returns ``k`` per partition for ``expert_id IN (...)``; they are merged here.
        """
        ids = [int(i) for i in expert_ids]
        if not ids or k < 1 or not exists(self.db.conn):
            return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
        blob = np.asarray(q, dtype="<f4").tobytes()
        rows: list[tuple] = []
        if len(ids) > WIDE:  # many experts (an exhaustive search): one scan of the table beats a query per
            # partition (1,000 partitions of 1,000: 0.6 s against 16 s), then keep the wanted experts
            want = set(ids)
            got = [r for r in self.db.q(f"SELECT rowid, distance, expert_id FROM {TABLE} WHERE embedding MATCH ? "
                                        "AND k = ?", [blob, min(MAX_K, 4 * int(k) + 100)]) if r[2] in want]
            if len(got) >= k or len(got) == self.count():
                ids = []
                rows = got
        for s in range(0, len(ids), CHUNK):
            part = ids[s:s + CHUNK]
            where = "expert_id = ?" if len(part) == 1 else f"expert_id IN ({','.join('?' * len(part))})"
            rows += self.db.q(f"SELECT rowid, distance, expert_id FROM {TABLE} WHERE embedding MATCH ? AND k = ? AND {where}",
                              [blob, int(k), *part])
        rows.sort(key=lambda r: (r[1], r[0]))
        rows = rows[:k]
        return (np.fromiter((r[0] for r in rows), np.int64, len(rows)),
                np.fromiter((1.0 - r[1] for r in rows), np.float32, len(rows)),
                np.fromiter((r[2] for r in rows), np.int64, len(rows)))
