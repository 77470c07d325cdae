"""The SQLite connection of a store: one file opened through apsw with sqlite-vec loaded, its
transactions, its migrations and its ``meta`` table.

Every write runs inside :meth:`Connection.atomic`, a ``BEGIN IMMEDIATE`` transaction (nested calls become
savepoints), so a failure or a crash in the middle of a call leaves the file as it was before the call.
Migrations are append-only files in ``moedb/store/migrations/``, each applied in the transaction that
records its name and checksum: ``NNNN_name.sql`` (a script) or ``NNNN_name.py`` (a module whose
``migrate(conn)`` runs, for a step SQL cannot state alone, such as a table whose shape depends on the data).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from importlib import resources
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import apsw
import numpy as np
import sqlite_vec

from ..errors import DatabaseBusy, EmbedderMismatch, MoedbError, SchemaError
from ..vectors import F4

_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(sql|py)$")
# the most host parameters one statement binds in ``IN (?, ...)`` lists
CHUNK = 500


def dumps(obj: Any) -> str:
    """JSON text as the file stores it (UTF-8, sorted keys)."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


class Migration(NamedTuple):
    """A migration shipped in the package: ``NNNN_name.sql`` or ``NNNN_name.py``."""

    version: int
    name: str
    source: str
    checksum: str  # sha256 of source
    kind: str  # "sql" (a script) or "py" (a module with migrate(conn))


def migrations() -> list[Migration]:
    """The migrations shipped in the package, sorted by version."""
    out = []
    for entry in resources.files("moedb.store.migrations").iterdir():
        m = _MIGRATION_RE.match(entry.name)
        if not m:
            continue
        src = entry.read_text(encoding="utf-8")
        out.append(Migration(int(m.group(1)), m.group(2), src, hashlib.sha256(src.encode()).hexdigest(), m.group(3)))
    out.sort()
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions) or (versions and versions[0] < 1):
        raise SchemaError(f"migration files must have unique positive numbers: {versions}")
    return out


def window(col: str, since: Optional[float], until: Optional[float]) -> tuple[str, list]:
    """``AND``-able SQL condition on a time column (``since <= col < until``) and its parameters."""
    parts, params = [], []
    if since is not None:
        parts.append(f"{col} >= ?")
        params.append(float(since))
    if until is not None:
        parts.append(f"{col} < ?")
        params.append(float(until))
    return (" AND ".join(parts) if parts else "1"), params


def matrix(blobs: Sequence[bytes]) -> np.ndarray:
    """Stack ``<f4`` blobs into a float32 matrix ``(n, d)`` (``(0, 0)`` when empty)."""
    if not blobs:
        return np.zeros((0, 0), np.float32)
    return np.frombuffer(b"".join(blobs), dtype=F4).reshape(len(blobs), -1).astype(np.float32)


class Connection:
    """One apsw connection to a moedb file. Not thread-safe for writes without :meth:`atomic`."""

    def __init__(self, path: str, busy_timeout_ms: int = 30_000):
        self.path = path
        # the embedder name this connection embeds with (set by Database); writes of vectors check it
        # inside their transaction, so vectors of a model the file no longer uses never land in it
        self.expected_embedder: Optional[str] = None
        try:
            self.conn = apsw.Connection(path)
        except apsw.Error as e:
            raise MoedbError(f"cannot open database {path!r}: {e}") from None
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.conn.setbusytimeout(self.busy_timeout_ms)
        self.conn.enable_load_extension(True)
        self.conn.load_extension(sqlite_vec.loadable_path())
        self.conn.enable_load_extension(False)
        self._lock = threading.RLock()
        self._depth = 0
        self.rolled_back = False  # set when a write transaction rolls back (Database drops its caches)
        try:
            self._refuse_foreign()
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
        except apsw.Error as e:  # a damaged file (CorruptError), a device (IOError), a read-only folder, ...
            self.conn.close()
            raise MoedbError(f"cannot open database {path!r}: {type(e).__name__.replace('Error', ' error')}: {e}"
                             ) from None

    def _refuse_foreign(self) -> None:
        """Refuse, before any write, a SQLite file that holds tables but is not a moedb file (another
        application's database is left byte-identical: no WAL switch, no migrations)."""
        tables = [r[0] for r in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        if tables and "schema_migrations" not in tables:
            self.conn.close()
            shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            raise MoedbError(f"{self.path!r} is a SQLite database of another application (tables: {shown}); "
                             "moedb leaves it alone: give a new or a moedb file")

    def _busy_retry(self, sql: str, what: str) -> None:
        """Run ``sql`` (``BEGIN IMMEDIATE`` or ``COMMIT``), retrying while another connection holds the
        write lock, until the busy timeout; then :class:`DatabaseBusy` (never a raw ``apsw.BusyError``)."""
        deadline = time.monotonic() + self.busy_timeout_ms / 1000.0
        pause = 0.005
        while True:
            try:
                self.conn.execute(sql)
                return
            except apsw.BusyError:
                if time.monotonic() >= deadline:
                    raise DatabaseBusy(
                        f"database is busy: another connection held the write lock of {self.path!r} for more "
                        f"than {self.busy_timeout_ms / 1000:g} s while this one waited to {what} "
                        "(a long write in another process); nothing was written, try again") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.25)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """A write transaction (``BEGIN IMMEDIATE``); nested calls are savepoints. While another connection
        writes, it waits (SQLite's busy handler, then retries) up to the busy timeout, then raises
        :class:`~moedb.errors.DatabaseBusy`."""
        with self._lock:
            depth = self._depth
            name = f"sp{depth}"
            if depth == 0:
                self._busy_retry("BEGIN IMMEDIATE", "begin a write")
            else:
                self.conn.execute(f"SAVEPOINT {name}")
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
                if depth == 0:
                    try:
                        self._busy_retry("COMMIT", "commit")
                    except DatabaseBusy:
                        self.conn.execute("ROLLBACK")
                        self.rolled_back = True
                        raise
                else:
                    self.conn.execute(f"RELEASE {name}")

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

    def in_chunks(self, sql: str, values: Sequence[Any]) -> list[tuple]:
        """Rows of ``sql`` whose ``{marks}`` is an ``IN`` list of ``values``, run in chunks of :data:`CHUNK`
        host parameters (SQLite limits how many one statement binds)."""
        values = list(values)
        out: list[tuple] = []
        for s in range(0, len(values), CHUNK):
            part = values[s:s + CHUNK]
            out += self.q(sql.format(marks=",".join("?" * len(part))), part)
        return out

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
            known_versions = {m.version for m in known}
            unknown = sorted(set(applied) - known_versions)
            if unknown:
                raise SchemaError(
                    f"{self.path!r} was written by a newer moedb (schema version {newest}, this moedb "
                    f"knows up to {max(known_versions, default=0)}); upgrade moedb to open it"
                )
            for version, name, source, checksum, kind in known:
                if version in applied:
                    if applied[version][1] != checksum:
                        raise SchemaError(
                            f"migration {version:04d}_{name}.{kind} was edited after it was applied to "
                            f"{self.path!r} (checksum differs); migrations are append-only"
                        )
                    continue
                if kind == "py":
                    code: dict[str, Any] = {}
                    exec(compile(source, f"{version:04d}_{name}.py", "exec"), code)
                    code["migrate"](self.conn)
                else:
                    self.conn.execute(source)
                self.conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?, ?)", (version, name, checksum, time.time())
                )

    def schema_version(self) -> int:
        return self.q1("SELECT max(version) FROM schema_migrations")[0] or 0

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
                (key, dumps(value)),
            )
