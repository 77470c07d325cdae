"""The catalog: this connection's view of the file's experts, kept current with every process's writes.

Every part that reads experts asks the :class:`Catalog` (``refresh()`` first). It re-reads only the
expert rows that changed since it last looked (``PRAGMA data_version`` tells when another connection
committed; ``touch()`` when this one wrote), derives parents' centroids from their children, follows a
switch of embedder made by another process, and keeps hot experts' document vectors in a bounded cache
(:class:`~moedb.engine.hot_vectors.HotVectors`, ``vector_cache_mb``).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..errors import UnknownExpert
from ..routing.hierarchy import parent_centroids
from ..settings import Settings
from ..store import Store
from .embedding import FileEmbedder
from .hot_vectors import HotVectors


def own_centroid(row: dict[str, Any]) -> Optional[np.ndarray]:
    """Mean of an expert row's own documents ``(d,)`` float32, read-only (the cache and every Expert
    handed out share it); ``None`` without documents."""
    if not row["size"]:
        return None
    c = (row["vec_sum"] / row["size"]).astype(np.float32)
    c.flags.writeable = False
    return c


class Catalog:
    """Expert rows of one open file (dicts as :meth:`Store.expert_rows` gives them, plus ``centroid``,
    ``own_centroid`` and ``parent``), their names, the settings, and hot experts' document vectors.

    ``epoch`` moves whenever every cached vector became stale (the file was re-embedded): parts that
    cache vectors or indexes compare it with the epoch they cached under.
    """

    def __init__(self, store: Store, embedding: FileEmbedder):
        self.store = store
        self.embedding = embedding
        self.rows: list[dict[str, Any]] = []
        self.by_name: dict[str, dict[str, Any]] = {}
        self.settings: Settings = Settings.from_stored(store.get_meta("settings"))
        self.epoch = 0
        self._dv: Optional[int] = None
        self._dirty = True
        self.changed_here = False  # this connection changed the experts since its router was fitted
        self.hot = HotVectors(int(self.settings.vector_cache_mb * 2**20))

    def touch(self) -> None:
        """This connection changed the file: re-read on the next :meth:`refresh` (and ``changed_here``
        stays set until the gate service has a router that reflects the change)."""
        self._dirty = True
        self.changed_here = True

    def stale(self) -> None:
        """Every cached vector is stale (this connection re-embedded the file)."""
        self.hot.clear()
        self.epoch += 1
        self._dirty = True

    def refresh(self) -> None:
        """Reload expert rows if this or another process changed the file."""
        dv = self.store.data_version()
        if self.store.rolled_back:  # rows read inside a transaction that rolled back may never have existed
            self.store.rolled_back = False
            self.rows, self._dirty = [], True
            self.hot.clear()
        if not self._dirty and dv == self._dv:
            return
        if dv != self._dv and self.embedding.follow():  # another process re-embedded the file (tune_embedder)
            self.stale()
        with self.store.snapshot():  # the stamps and the changed rows from one state of the file
            rows = self._reload_rows()
            settings = Settings.from_stored(self.store.get_meta("settings"))
        parent_centroids(rows)
        self.rows = rows
        self.by_name = {r["name"]: r for r in rows}
        live = {r["id"]: r["version"] for r in rows}
        self.hot.keep(live)
        if settings != self.settings:
            self.settings = settings
            self.hot.budget = int(settings.vector_cache_mb * 2**20)
        self._dv = dv
        self._dirty = False

    def _reload_rows(self) -> list[dict[str, Any]]:
        """Expert rows as the file has them now. Only new or changed rows are read and decoded (a file of
        thousands of experts stays cheap to refresh after each write); unchanged ones are the same dicts
        (a Database is not shared between threads; the router keeps its own arrays, not these)."""
        old = {r["id"]: r for r in self.rows}
        stamps = self.store.experts.stamps()
        changed = [i for i, v, u, _ in stamps
                   if i not in old or old[i]["version"] != v or old[i]["updated_at"] != u]
        fresh = {r["id"]: r for r in self.store.experts.rows(changed)} if changed else {}
        rows = []
        for i, _, _, parent_id in stamps:
            r = fresh.get(i)
            if r is None:
                r = old[i]
                r["parent_id"] = parent_id  # (deleting its parent sets it NULL without a version bump)
            else:
                r["own_centroid"] = own_centroid(r)
            r["centroid"] = r["own_centroid"]  # (parent_centroids gives pure parents their subtree's)
            rows.append(r)
        names = {r["id"]: r["name"] for r in rows}
        for r in rows:
            r["parent"] = names.get(r["parent_id"])
        return rows

    def require(self, name: Any) -> dict[str, Any]:
        """The current row of expert ``name``; :class:`UnknownExpert` if there is none (a name that is not a
        string, such as a number or a NaN that cannot even be hashed, names none)."""
        if not isinstance(name, str):
            raise UnknownExpert(repr(name))
        self.refresh()
        row = self.by_name.get(name)
        if row is None:
            raise UnknownExpert(name)
        return row

    def routable(self) -> list[dict[str, Any]]:
        """The experts the gate scores: every expert with documents, refusal experts included."""
        return [r for r in self.rows if r["size"] > 0]

    def answering(self) -> list[dict[str, Any]]:
        """The experts that answer queries: with documents, not refusal experts (creation order)."""
        return [r for r in self.rows if r["size"] > 0 and not r.get("refuse")]

    def hot_docs(self, row: dict[str, Any]) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """An expert's ``(rowids (n,), unit vectors (n, d))`` if it is hot (cached, or missed recently too:
        then loaded and cached); ``None`` otherwise (search it in SQL)."""
        got = self.hot.get(row["id"], row["version"])
        if got is None and self.hot.admit(row["id"]):
            got = self._load_docs(row)
            self.hot.put(row["id"], row["version"], *got)
        return got

    def _load_docs(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        ids, m = self.store.documents.vectors_of(row["id"])
        if m.size == 0:
            m = np.zeros((0, self.embedding.dim), dtype=np.float32)
        return ids, m

    def expert_docs(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """``(rowids (n,), unit vectors (n, d))`` of one expert: from the hot cache, else read from the file."""
        return self.hot_docs(row) or self._load_docs(row)
