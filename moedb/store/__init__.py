"""The store layer: everything moedb keeps, behind one interface (:mod:`moedb.store.base`) with one
implementation, SQLite (:class:`SQLiteStore`). Nothing above this package writes SQL."""
from .base import Store
from .sqlite import SQLiteStore


def open_store(path: str) -> Store:
    """Open (or create) the store at ``path`` (``":memory:"``: a private in-memory one)."""
    return SQLiteStore(path)


__all__ = ["Store", "SQLiteStore", "open_store"]
