"""The store: one SQLite file opened through apsw with sqlite-vec loaded.

All SQL of moedb lives in this module. Every public write method runs inside
:meth:`Store.atomic`, a ``BEGIN IMMEDIATE`` transaction (nested calls become
savepoints), so a failure or a crash in the middle of a call leaves the file as it
was before the call.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from importlib import resources
from typing import Any, Iterable, Iterator, Optional, Sequence

import apsw
import numpy as np

from .errors import DuplicateDocument, DuplicateExpert, EmbedderMismatch, MoedbError, SchemaError, UnknownExpert
from .db_generation import GenerationSQL
from .db_lifecycle import LifecycleSQL
from .db_routing import RoutingSQL
from .vectors import F4

_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


def migrations() -> list[tuple[int, str, str, str]]:
    """The migrations shipped in the package: ``(version, name, sql, sha256)`` sorted by version."""
    out = []
    for entry in resources.files("moedb.migrations").iterdir():
        m = _MIGRATION_RE.match(entry.name)
        if not m:
            continue
        sql = entry.read_text(encoding="utf-8")
        out.append((int(m.group(1)), m.group(2), sql, hashlib.sha256(sql.encode()).hexdigest()))
    out.sort()
    versions = [v for v, *_ in out]
    if len(set(versions)) != len(versions) or (versions and versions[0] < 1):
        raise SchemaError(f"migration files must have unique positive numbers: {versions}")
    return out


class Store(RoutingSQL, LifecycleSQL, GenerationSQL):
    """Low-level access to a moedb file. Not thread-safe for writes without :meth:`atomic`."""

    def __init__(self, path: str, busy_timeout_ms: int = 30_000):
        import sqlite_vec

        self.path = path
        # the embedder name this connection embeds with (set by Database); writes of vectors check it
        # inside their transaction, so vectors of a model the file no longer uses never land in it
        self.expected_embedder: Optional[str] = None
        try:
            self.conn = apsw.Connection(path)
        except apsw.Error as e:
            raise MoedbError(f"cannot open database {path!r}: {e}") from None
        self.conn.setbusytimeout(busy_timeout_ms)
        self.conn.enable_load_extension(True)
        self.conn.load_extension(sqlite_vec.loadable_path())
        self.conn.enable_load_extension(False)
        self._lock = threading.RLock()
        self._depth = 0
        self.rolled_back = False  # set when a write transaction rolls back (Database drops its caches)
        try:
            self.conn.execute("PRAGMA foreign_keys=ON")
            if path != ":memory:" and not path.startswith("file::memory"):
                mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise MoedbError(f"cannot switch {path!r} to WAL mode (got {mode})")
                self.conn.execute("PRAGMA synchronous=NORMAL")
            self.migrate()
        except apsw.NotADBError:
            self.conn.close()
            raise MoedbError(f"{path!r} is not a SQLite database") from None

    # ------------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """A write transaction (``BEGIN IMMEDIATE``); nested calls are savepoints."""
        with self._lock:
            depth = self._depth
            name = f"sp{depth}"
            self.conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if depth == 0:
                    self.conn.execute("ROLLBACK")
                    self.rolled_back = True  # what was read inside it (cached rows) may never have existed
                else:
                    self.conn.execute(f"ROLLBACK TO {name}; RELEASE {name}")
                raise
            else:
                self._depth -= 1
                self.conn.execute("COMMIT" if depth == 0 else f"RELEASE {name}")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads that see one committed state of the file (a deferred read transaction; inside a write
        transaction, that transaction's state)."""
        with self._lock:
            if self._depth or not self.conn.getautocommit():
                yield
                return
            self.conn.execute("BEGIN")
            try:
                yield
            finally:
                self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    def data_version(self) -> int:
        """Changes when another connection commits (``PRAGMA data_version``)."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    def q(self, sql: str, params: Sequence | dict = ()) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()

    def q1(self, sql: str, params: Sequence | dict = ()) -> Optional[tuple]:
        return self.conn.execute(sql, params).fetchone()

    # ------------------------------------------------------------------ migrations
    def migrate(self) -> None:
        """Apply missing migrations, each in the transaction that records it."""
        known = migrations()
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
            "name TEXT NOT NULL, checksum TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        with self.atomic():
            applied = {v: (n, c) for v, n, c in self.q("SELECT version, name, checksum FROM schema_migrations")}
            newest = max(applied, default=0)
            known_versions = {v for v, *_ in known}
            unknown = sorted(set(applied) - known_versions)
            if unknown:
                raise SchemaError(
                    f"{self.path!r} was written by a newer moedb (schema version {newest}, this moedb "
                    f"knows up to {max(known_versions, default=0)}); upgrade moedb to open it"
                )
            for version, name, sql, checksum in known:
                if version in applied:
                    if applied[version][1] != checksum:
                        raise SchemaError(
                            f"migration {version:04d}_{name}.sql was edited after it was applied to "
                            f"{self.path!r} (checksum differs); migrations are append-only"
                        )
                    continue
                self.conn.execute(sql)
                self.conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?, ?)", (version, name, checksum, time.time())
                )

    def schema_version(self) -> int:
        return self.q1("SELECT max(version) FROM schema_migrations")[0] or 0

    # ------------------------------------------------------------------ meta
    def check_embedder(self) -> None:
        """Raise EmbedderMismatch if the file's embedder is not the one this connection embeds with
        (another process re-embedded the file since); call inside the write transaction."""
        if self.expected_embedder is None:
            return
        rec = self.get_meta("embedder")
        if rec is not None and rec.get("name") != self.expected_embedder:
            raise EmbedderMismatch(f"the file was re-embedded with {rec.get('name')!r} by another process while "
                                   f"this one embedded with {self.expected_embedder!r}; nothing was written, "
                                   "run the call again")

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.q1("SELECT value FROM meta WHERE key=?", (key,))
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        with self.atomic():
            self.conn.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, _dumps(value)),
            )

    # ------------------------------------------------------------------ experts
    _EXPERT_COLS = (
        "e.id, e.name, e.description, e.keywords, p.name, e.metadata, e.generator, e.n_docs, "
        "e.vec_sum, e.version, e.created_at, e.updated_at, e.parent_id, e.refuse"
    )

    @staticmethod
    def _expert_dict(row: tuple) -> dict[str, Any]:
        (id_, name, desc, kw, parent, md, gen, n, vec_sum, version, created, updated, parent_id, refuse) = row
        return {
            "id": id_, "name": name, "description": desc, "keywords": json.loads(kw),
            "parent": parent, "parent_id": parent_id, "metadata": json.loads(md),
            "generator": json.loads(gen) if gen else None, "size": n,
            "vec_sum": np.frombuffer(vec_sum, dtype="<f8") if vec_sum else None,
            "version": version, "created_at": created, "updated_at": updated, "refuse": bool(refuse),
        }

    def expert_rows(self, ids: Optional[Sequence[int]] = None) -> list[dict[str, Any]]:
        """Every expert (``ids``: only these), in id order."""
        sql = f"SELECT {self._EXPERT_COLS} FROM experts e LEFT JOIN experts p ON p.id = e.parent_id"
        if ids is None:
            return [self._expert_dict(r) for r in self.q(sql + " ORDER BY e.id")]
        ids = list(ids)
        out = []
        for s in range(0, len(ids), 500):
            part = ids[s:s + 500]
            out += self.q(sql + f" WHERE e.id IN ({','.join('?' * len(part))}) ORDER BY e.id", part)
        return [self._expert_dict(r) for r in sorted(out)]

    def expert_stamps(self) -> list[tuple[int, int, float, Optional[int]]]:
        """``(id, version, updated_at, parent_id)`` of every expert in id order: what tells a cached row
        from a changed one (every change of a row moves its version and updated_at; deleting its parent
        moves parent_id)."""
        return self.q("SELECT id, version, updated_at, parent_id FROM experts ORDER BY id")

    def expert_row(self, name: str) -> dict[str, Any]:
        row = self.q1(
            f"SELECT {self._EXPERT_COLS} FROM experts e LEFT JOIN experts p ON p.id = e.parent_id WHERE e.name=?",
            (name,),
        )
        if row is None:
            raise UnknownExpert(name)
        return self._expert_dict(row)

    def expert_id(self, name: str) -> int:
        row = self.q1("SELECT id FROM experts WHERE name=?", (name,))
        if row is None:
            raise UnknownExpert(name)
        return row[0]

    def insert_expert(self, name: str, description: str, keywords: list[str], parent_id: Optional[int],
                      metadata: dict, generator: Optional[dict], refuse: bool = False) -> int:
        now = time.time()
        with self.atomic():
            if self.q1("SELECT 1 FROM experts WHERE name=?", (name,)):
                raise DuplicateExpert(f"expert {name!r} already exists")
            self.conn.execute(
                "INSERT INTO experts(name, description, keywords, parent_id, metadata, generator, "
                "created_at, updated_at, refuse) VALUES (?,?,?,?,?,?,?,?,?)",
                (name, description, _dumps(keywords), parent_id, _dumps(metadata),
                 _dumps(generator) if generator is not None else None, now, now, int(bool(refuse))),
            )
            return self.conn.last_insert_rowid()

    _UPDATABLE = {"name", "description", "keywords", "parent_id", "metadata", "generator", "refuse"}

    def update_expert(self, expert_id: int, **fields: Any) -> None:
        bad = set(fields) - self._UPDATABLE
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        if not fields:
            return
        enc = {
            k: (_dumps(v) if k in ("keywords", "metadata") or (k == "generator" and v is not None) else v)
            for k, v in fields.items()
        }
        sets = ", ".join(f"{k}=:{k}" for k in enc)
        enc["id"] = expert_id
        enc["now"] = time.time()
        with self.atomic():
            if "name" in fields and self.q1("SELECT 1 FROM experts WHERE name=? AND id<>?", (fields["name"], expert_id)):
                raise DuplicateExpert(f"expert {fields['name']!r} already exists")
            self.conn.execute(f"UPDATE experts SET {sets}, version=version+1, updated_at=:now WHERE id=:id", enc)

    def delete_expert(self, expert_id: int) -> None:
        with self.atomic():
            self.conn.execute("DELETE FROM documents WHERE expert_id=?", (expert_id,))
            self.conn.execute("DELETE FROM experts WHERE id=?", (expert_id,))

    def children(self, expert_id: int) -> list[int]:
        return [r[0] for r in self.q("SELECT id FROM experts WHERE parent_id=?", (expert_id,))]

    # ------------------------------------------------------------------ documents
    def insert_documents(self, expert_id: int, rows: Sequence[tuple], vectors: np.ndarray,
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
        with self.atomic():
            self.check_embedder()
            row = self.q1("SELECT n_docs, vec_sum FROM experts WHERE id=?", (expert_id,))
            n, vs = row
            total = np.frombuffer(vs, dtype="<f8").copy() if vs else np.zeros(vecs.shape[1], dtype="<f8")
            added = 0
            cur = self.conn.cursor()
            for (doc_id, text, md, source, position), v in zip(rows, vecs):
                old = self.q1("SELECT id, embedding FROM documents WHERE expert_id=? AND doc_id=?", (expert_id, doc_id))
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
            self.conn.execute(
                "UPDATE experts SET n_docs=?, vec_sum=?, version=version+1, updated_at=? WHERE id=?",
                (n, total.astype("<f8").tobytes() if n else None, now, expert_id),
            )
        return added

    def delete_documents(self, expert_id: int, doc_ids: Iterable[str]) -> int:
        """Remove documents by id; returns how many were removed. Unknown ids are ignored."""
        now = time.time()
        with self.atomic():
            n, vs = self.q1("SELECT n_docs, vec_sum FROM experts WHERE id=?", (expert_id,))
            total = np.frombuffer(vs, dtype="<f8").copy() if vs else None
            removed = 0
            for doc_id in doc_ids:
                old = self.q1("SELECT id, embedding FROM documents WHERE expert_id=? AND doc_id=?", (expert_id, doc_id))
                if old is None:
                    continue
                total -= np.frombuffer(old[1], dtype=F4)
                self.conn.execute("DELETE FROM documents WHERE id=?", (old[0],))
                n -= 1
                removed += 1
            if removed:
                if n == 0:
                    total = None
                self.conn.execute(
                    "UPDATE experts SET n_docs=?, vec_sum=?, version=version+1, updated_at=? WHERE id=?",
                    (n, total.tobytes() if total is not None else None, now, expert_id),
                )
        return removed

    def move_documents(self, from_id: int, to_id: int, rowids: Optional[Sequence[int]] = None) -> int:
        """Move documents (all, or the given row ids) between experts, keeping both sums current."""
        with self.atomic():
            if rowids is None:
                rowids = [r[0] for r in self.q("SELECT id FROM documents WHERE expert_id=?", (from_id,))]
            moved = 0
            for rid in rowids:
                row = self.q1("SELECT doc_id FROM documents WHERE id=? AND expert_id=?", (rid, from_id))
                if row is None:
                    continue
                if self.q1("SELECT 1 FROM documents WHERE expert_id=? AND doc_id=?", (to_id, row[0])):
                    self.conn.execute(
                        "UPDATE documents SET doc_id = doc_id || '~' || id WHERE id=?", (rid,)
                    )
                self.conn.execute("UPDATE documents SET expert_id=? WHERE id=?", (to_id, rid))
                moved += 1
            self.recompute_sum(from_id)
            self.recompute_sum(to_id)
        return moved

    def recompute_sum(self, expert_id: int) -> None:
        """Recompute an expert's vector sum from its members (used after bulk moves)."""
        ids, m = self.expert_vectors(expert_id)
        total = m.astype(np.float64).sum(axis=0) if len(ids) else None
        self.conn.execute(
            "UPDATE experts SET n_docs=?, vec_sum=?, version=version+1, updated_at=? WHERE id=?",
            (len(ids), total.astype("<f8").tobytes() if total is not None else None, time.time(), expert_id),
        )

    def expert_vectors(self, expert_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ids ``(n,)`` int64 and vectors ``(n, d)`` float32 of an expert's documents."""
        rows = self.q("SELECT id, embedding FROM documents WHERE expert_id=? ORDER BY id", (expert_id,))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        m = np.frombuffer(b"".join(r[1] for r in rows), dtype=F4).reshape(len(rows), -1).astype(np.float32)
        return ids, m

    def documents_by_rowid(self, rowids: Sequence[int]) -> dict[int, dict[str, Any]]:
        if not len(rowids):
            return {}
        out = {}
        ids = [int(r) for r in rowids]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for rid, eid, doc_id, text, md, source, position in self.q(
                f"SELECT id, expert_id, doc_id, text, metadata, source, position FROM documents WHERE id IN ({marks})",
                chunk,
            ):
                out[rid] = {"expert_id": eid, "id": doc_id, "text": text, "metadata": json.loads(md),
                            "source": source, "position": position}
        return out

    def list_documents(self, expert_id: int, limit: int = -1, offset: int = 0) -> list[dict[str, Any]]:
        return [
            {"rowid": rid, "id": d, "text": t, "metadata": json.loads(md), "source": s, "position": p}
            for rid, d, t, md, s, p in self.q(
                "SELECT id, doc_id, text, metadata, source, position FROM documents WHERE expert_id=? "
                "ORDER BY id LIMIT ? OFFSET ?", (expert_id, limit, offset))
        ]

    def count_documents(self) -> int:
        return self.q1("SELECT count(*) FROM documents")[0]

    # ------------------------------------------------------------------ query log
    def log_routes(self, entries: Sequence[dict[str, Any]]) -> list[int]:
        """Append routes to the query log in one transaction; returns their query ids.

        Each entry: ``ts, query, query_vec (bytes|None), abstained, top_confidence, latency_ms,
        choices: [(expert_id, rank, score, confidence)]``.
        """
        ids = []
        with self.atomic():
            cur = self.conn.cursor()
            for e in entries:
                cur.execute(
                    "INSERT INTO query_log(ts, query, query_vec, abstained, top_confidence, latency_ms) "
                    "VALUES (?,?,?,?,?,?)",
                    (e["ts"], e["query"], e.get("query_vec"), int(e["abstained"]), e.get("top_confidence"),
                     e["latency_ms"]),
                )
                qid = self.conn.last_insert_rowid()
                ids.append(qid)
                if e["choices"]:
                    cur.executemany(
                        "INSERT INTO query_choices(query_id, expert_id, rank, score, confidence) VALUES (?,?,?,?,?)",
                        [(qid, eid, rank, score, conf) for eid, rank, score, conf in e["choices"]],
                    )
        return ids

    def query_log_count(self) -> int:
        return self.q1("SELECT count(*) FROM query_log")[0]

    def query_entry(self, query_id: int) -> Optional[dict[str, Any]]:
        row = self.q1("SELECT id, ts, query, query_vec, abstained, top_confidence, latency_ms FROM query_log "
                      "WHERE id=?", (query_id,))
        if row is None:
            return None
        qid, ts, query, qv, abst, topc, lat = row
        choices = self.q(
            "SELECT e.name, c.rank, c.score, c.confidence FROM query_choices c JOIN experts e ON e.id=c.expert_id "
            "WHERE c.query_id=? ORDER BY c.rank", (qid,))
        return {"id": qid, "ts": ts, "query": query,
                "query_vec": np.frombuffer(qv, dtype=F4) if qv else None, "abstained": bool(abst),
                "top_confidence": topc, "latency_ms": lat,
                "choices": [{"expert": n, "rank": r, "score": s, "confidence": c} for n, r, s, c in choices]}
