"""The SQLite implementation of the store: one file, every table behind one :class:`SQLiteStore`.

:class:`SQLiteStore` composes a :class:`~moedb.store.connection.Connection` (transactions, migrations,
meta) with one object per table area (experts, documents, query log, feedback, load aggregates, routing
artefacts, balancing state). The parts of moedb above the store use only these objects' methods, never
SQL: a second backend implements the same interface (:mod:`moedb.store.base`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import numpy as np

from ..errors import EmbedderMismatch
from ..vectors import F4
from .artefacts import Artefacts
from .balance import BalanceTable
from .connection import Connection
from .documents import DocumentTable
from .experts import ExpertTable
from .feedback import FeedbackTable
from .loads import LoadQueries
from .querylog import QueryLog
from .text_index import TextIndex
from . import vector_index
from .vector_index import VectorIndex

# feedback whose query text can be re-embedded ("<vector>" stands for a query routed as a vector)
_FB_TEXT = "query IS NOT NULL AND query != '' AND query != '<vector>'"


class SQLiteStore:
    """A moedb file opened through apsw (``path``, or ``":memory:"``), migrated to this version's schema."""

    def __init__(self, path: str, busy_timeout_ms: int = 30_000):
        self.db = Connection(path, busy_timeout_ms)
        self.path = path
        self.experts = ExpertTable(self.db)
        self.vectors = VectorIndex(self.db)
        self.text = TextIndex(self.db)
        self.documents = DocumentTable(self.db, self.vectors)
        self.log = QueryLog(self.db)
        self.feedback = FeedbackTable(self.db)
        self.loads = LoadQueries(self.db)
        self.artefacts = Artefacts(self.db)
        self.balance = BalanceTable(self.db)

    # ------------------------------------------------------------------ the connection
    def atomic(self) -> contextlib.AbstractContextManager:
        """A write transaction (``BEGIN IMMEDIATE``); nested calls are savepoints."""
        return self.db.atomic()

    def snapshot(self) -> contextlib.AbstractContextManager:
        """Reads that see one committed state of the file."""
        return self.db.snapshot()

    def data_version(self) -> int:
        """Changes when another connection commits."""
        return self.db.data_version()

    def get_meta(self, key: str, default: Any = None) -> Any:
        return self.db.get_meta(key, default)

    def set_meta(self, key: str, value: Any) -> None:
        self.db.set_meta(key, value)

    def schema_version(self) -> int:
        return self.db.schema_version()

    def close(self) -> None:
        self.db.close()

    @property
    def rolled_back(self) -> bool:
        """Set when a write transaction rolled back (what was read inside it may never have existed)."""
        return self.db.rolled_back

    @rolled_back.setter
    def rolled_back(self, value: bool) -> None:
        self.db.rolled_back = value

    @property
    def expected_embedder(self) -> Optional[str]:
        """The embedder name this connection embeds with; writes of vectors check it in their transaction."""
        return self.db.expected_embedder

    @expected_embedder.setter
    def expected_embedder(self, name: Optional[str]) -> None:
        self.db.expected_embedder = name

    # SQL for tests and tools that inspect the file (the library itself goes through the tables)
    @property
    def conn(self):
        return self.db.conn

    def q(self, sql: str, params: Any = ()) -> list[tuple]:
        return self.db.q(sql, params)

    def q1(self, sql: str, params: Any = ()) -> Optional[tuple]:
        return self.db.q1(sql, params)

    # ------------------------------------------------------------------ across tables
    def reassign_references(self, from_id: int, to_id: int) -> tuple[int, int]:
        """Point feedback and logged choices of one expert at another; returns ``(feedback, choices)`` moved."""
        with self.atomic():
            self.db.conn.execute("UPDATE feedback SET expert_id=? WHERE expert_id=?", (to_id, from_id))
            nf = self.db.conn.changes()
            self.db.conn.execute("UPDATE query_choices SET expert_id=? WHERE expert_id=?", (to_id, from_id))
            nc = self.db.conn.changes()
        return nf, nc

    def texts_to_embed(self) -> tuple[list[tuple[int, int, str]], list[tuple[int, str]]]:
        """``([(rowid, expert_id, text)] of every document, [(feedback id, query)] of feedback with text)``."""
        docs = [(r[0], r[1], r[2]) for r in self.db.q("SELECT id, expert_id, text FROM documents ORDER BY id")]
        fb = [(r[0], r[1]) for r in self.db.q(f"SELECT id, query FROM feedback WHERE {_FB_TEXT} ORDER BY id")]
        return docs, fb

    def replace_embeddings(self, doc_vecs: dict[int, tuple[str, bytes]], tuned: set[int],
                           fb_vecs: dict[int, tuple[str, bytes]], record: dict[str, Any], embed: Any,
                           expect: Optional[dict[str, Any]] = None) -> dict[str, int]:
        """Switch the whole file to a new embedder in one transaction.

        ``doc_vecs`` / ``fb_vecs``: ``(text, new <f4 bytes)`` by document row id / feedback id, computed
        before the transaction; rows added since then (or whose text changed: a reused row id) are
        embedded here with ``embed(texts) -> (n, d)``. ``tuned``: row ids of the documents that trained the
        embedder (``documents.tuned = 1``; a row whose text changed since is not one of them).
        ``expect``: the embedder record the caller started from; another one now (a concurrent tune)
        raises EmbedderMismatch and nothing changes.
        Every expert's sum is recomputed (its version moves, so gates and indexes refit), feedback
        without query text loses its vector (it cannot be re-embedded), the query log's vectors are
        cleared, fitted routing state is dropped, and ``record`` becomes the file's embedder.
        """

        with self.atomic():
            if expect is not None and self.get_meta("embedder") != expect:
                raise EmbedderMismatch("another process changed this file's embedder during the tune; nothing "
                                       "was changed (run the tune again)")
            docs, fb = self.texts_to_embed()
            vector_index.drop(self.db.conn)  # rebuilt below from the new vectors (their dimension may differ)
            fresh = {rid for rid, _, t in docs if rid in doc_vecs and doc_vecs[rid][0] == t}
            late = [(rid, t) for rid, _, t in docs if rid not in fresh]
            late_fb = [(fid, t) for fid, t in fb if fid not in fb_vecs or fb_vecs[fid][0] != t]
            new: dict[int, bytes] = {rid: doc_vecs[rid][1] for rid in fresh}
            new_fb: dict[int, bytes] = {fid: v for fid, (t, v) in fb_vecs.items()}
            if late or late_fb:
                v = np.asarray(embed([t for _, t in late] + [t for _, t in late_fb]), dtype=F4)
                new.update({rid: v[i].tobytes() for i, (rid, _) in enumerate(late)})
                new_fb.update({fid: v[len(late) + i].tobytes() for i, (fid, _) in enumerate(late_fb)})
            self.db.conn.executemany("UPDATE documents SET embedding=?, tuned=? WHERE id=?",
                                  [(new[rid], int(rid in tuned and rid in fresh), rid) for rid, _, _ in docs])
            for (eid,) in self.db.q("SELECT id FROM experts"):
                self.documents.recompute_sum(eid)
            have = {fid for fid, _ in fb}
            dropped = self.db.q1(f"SELECT COUNT(*) FROM feedback WHERE query_vec IS NOT NULL AND NOT ({_FB_TEXT})")[0]
            self.db.conn.execute(f"UPDATE feedback SET query_vec=NULL WHERE NOT ({_FB_TEXT})")
            self.db.conn.executemany("UPDATE feedback SET query_vec=? WHERE id=?",
                                  [(new_fb[fid], fid) for fid in have])
            cleared = self.db.q1("SELECT COUNT(*) FROM query_log WHERE query_vec IS NOT NULL")[0]
            self.db.conn.execute("UPDATE query_log SET query_vec=NULL WHERE query_vec IS NOT NULL")
            self.vectors.rebuild(int(record["dim"]))
            self.db.conn.execute("DELETE FROM routing_state")
            self.set_meta("embedder", record)
        return {"documents": len(docs), "embedded_late": len(late) + len(late_fb), "feedback": len(have),
                "feedback_dropped": int(dropped), "log_vectors_cleared": int(cleared)}
