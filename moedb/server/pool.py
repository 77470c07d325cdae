"""The server's open files: a pool of :class:`moedb.Database` objects for reads and one writer.

A ``Database`` belongs to one thread at a time (its catalog and gate caches are not shared), so the
service opens ``readers`` of them over the same file (WAL: readers never wait for each other) and hands
one to each request for its duration; a request that finds all of them busy waits for the next one
free. Writes go through a single writer ``Database`` under a lock, so two writes never race for the
file; after each change of experts the writer fits and stores the gate at once (``warm_router``), so
the readers load the stored gate when they next see the change instead of fitting it themselves.

SQLite's busy timeout (30 s in :mod:`moedb.store`) absorbs the short waits for the file's write lock
(every logged route writes a row); a wait longer than that reaches the client as ``503 busy`` with a
``Retry-After`` header, never as a raw SQLite error (see :mod:`.errors`).
"""
from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from typing import Any, Callable, Iterator, Optional

import moedb


class DatabasePool:
    """``readers`` open ``Database`` objects on ``path`` for reads and one for writes.

    ``connect``: how to open one (``moedb.connect`` by default; tests and embedders may pass
    their own, e.g. with ``log_queries=False``). ``recent``: how many routes :meth:`remember` keeps.
    """

    def __init__(self, path: str, readers: int = 2, *, connect: Optional[Callable[[str], Any]] = None,
                 recent: int = 200):
        if isinstance(readers, bool) or not isinstance(readers, int) or readers < 1:
            raise moedb.InvalidInput(f"readers must be an integer >= 1, got {readers!r}")
        if path == ":memory:" or str(path).startswith("file::memory"):
            raise moedb.InvalidInput("db_path: the service needs a file (each connection to ':memory:' would "
                                     "be a database of its own)")
        self.path = path
        self._connect = connect or moedb.connect
        self._write_lock = threading.Lock()
        # last in, first out: at low load one connection serves every request, its caches warm and no
        # other connection's commit making it re-check the file
        self._free: queue.LifoQueue = queue.LifoQueue()
        self._all: list[Any] = []
        self._recent: deque = deque(maxlen=recent)
        self._recent_lock = threading.Lock()
        try:
            self.writer = self._open()
            for _ in range(readers):
                self._free.put(self._open())
        except BaseException:
            self.close()
            raise
        with self.write() as db:
            db.warm_router()  # fitted once now and stored: the readers load it instead of fitting it each
        for db in self._all[1:]:
            db.warm_router()  # load the stored gate, and run the embedder once, before the first request
            db.embedder.embed(["warm up"])

    def _open(self) -> Any:
        db = self._connect(self.path)
        self._all.append(db)
        return db

    @property
    def size(self) -> int:
        """How many ``Database`` objects serve reads."""
        return len(self._all) - 1

    @contextlib.contextmanager
    def read(self) -> Iterator[Any]:
        """A ``Database`` for this request alone (waits for a free one)."""
        db = self._free.get()
        try:
            yield db
        finally:
            self._free.put(db)

    @contextlib.contextmanager
    def write(self) -> Iterator[Any]:
        """The writer ``Database``, one request at a time."""
        with self._write_lock:
            yield self.writer

    def change_experts(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(db)`` (a change of experts or documents) on the writer, then fit and store the gate
        before the lock is released, so no reader has to fit it. Returns what ``fn`` returned."""
        with self.write() as db:
            out = fn(db)
            db.warm_router()
            return out

    def remember(self, entry: dict[str, Any]) -> None:
        """Keep a served route (``query``, ``experts``, ``abstained``, ...) for the dashboard's list."""
        with self._recent_lock:
            self._recent.appendleft(entry)

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The routes served by this process, newest first."""
        with self._recent_lock:
            return list(self._recent)[:limit]

    def close(self) -> None:
        for db in self._all:
            with contextlib.suppress(Exception):
                db.close()
        self._all.clear()
