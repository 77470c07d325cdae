"""Retrieval: the best passages inside given experts, and the exhaustive :meth:`Retrieval.search` baseline.

Inside an expert: exact cosine in SQL (sqlite-vec, the store's vector index), or an exact NumPy scan when
the expert is hot (:meth:`Catalog.hot_docs`), or hnswlib for experts of at least ``ann_min_docs``
documents. No process holds a copy of the corpus: only hot experts, within ``vector_cache_mb``.

Three modes (``retrieval=`` per call, else the ``retrieval`` setting): ``"dense"`` (cosine), ``"lexical"``
(BM25 over the full-text index) and ``"hybrid"``: the best :data:`FUSION_DEPTH` of each, fused by reciprocal
rank, ``sum 1 / (RRF_K + rank)`` (Cormack et al. 2009; ``RRF_K`` = 60 as published, not tuned here). On
MTRAG (exhaustive, 377 questions) dense gave nDCG@10 0.778, BM25 0.782, hybrid 0.821
(``benches/bench_retrieval.py``). The mode decides the order; a hit's ``score`` is always its cosine
similarity to the query (comparable across queries and modes); ``explain`` adds each hit's ``components``
(cosine and BM25 with their ranks, and the fused value). A query given as a vector has no words: it is
retrieved dense."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from ..errors import InvalidInput
from ..routing.ann import HnswIndex, exact_topk
from ..store import Store
from ..types import Hit
from .catalog import Catalog
from .embedding import FileEmbedder
from .queries import encode_queries

MODES = ("hybrid", "dense", "lexical")
FUSION_DEPTH = 50  # candidates taken from each list before fusing
RRF_K = 60


def check_mode(mode: Any) -> str:
    """A valid retrieval mode, or :class:`InvalidInput` naming the field."""
    if mode not in MODES:
        raise InvalidInput(f"retrieval must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


class Retrieval:
    """Passages of one file's experts; hnswlib indexes of large experts are cached per expert version."""

    def __init__(self, store: Store, catalog: Catalog, embedding: FileEmbedder):
        self.store = store
        self.catalog = catalog
        self.embedding = embedding
        self._ann_docs: dict[int, tuple[int, Any]] = {}
        self._epoch = catalog.epoch

    def retrieve(self, q: np.ndarray, rows: list[dict], k: int, exact: bool = False, *, text: Optional[str] = None,
                 mode: Optional[str] = None, explain: bool = False) -> list[tuple]:
        """Best ``k`` ``(score, rowid, expert row, components or None)`` inside the given experts.

        ``q`` ``(d,)``: the query's unit vector; ``text``: its words (``None``: a vector query, retrieved
        dense); ``mode``: see the module docstring (default: the ``retrieval`` setting); ``exact``: no
        hnswlib; ``explain``: fill each candidate's components.
        """
        mode = check_mode(mode if mode is not None else self.catalog.settings.retrieval)
        if text is None or not text.strip():
            mode = "dense"
        if mode == "dense":
            return [(s, i, r, {"dense": s, "dense_rank": n + 1} if explain else None)
                    for n, (s, i, r) in enumerate(self.dense(q, rows, k, exact))]
        by_id = {r["id"]: r for r in rows}
        depth = k if mode == "lexical" else max(k, FUSION_DEPTH)
        rowids, bm25, eids = self.store.text.search(text, depth, list(by_id))
        lists = {"lexical": [(float(s), int(i), by_id[int(e)]) for i, s, e in zip(rowids, bm25, eids)]}
        if mode == "hybrid":
            lists["dense"] = self.dense(q, rows, depth, exact)
        fused: dict[int, list] = {}
        for name, cands in lists.items():
            for n, (s, i, r) in enumerate(cands):
                f = fused.setdefault(i, [0.0, r, {}])
                f[0] += 1.0 / (RRF_K + n + 1)
                f[2][name], f[2][f"{name}_rank"] = s, n + 1
        best = sorted(fused.items(), key=lambda c: (-c[1][0], c[0]))[:k]
        missing = [i for i, f in best if "dense" not in f[2]]  # found by BM25 alone: their cosine from the file
        cos = dict(zip(missing, (self.store.documents.vectors_by_rowid(missing, len(q)) @ q).tolist())) \
            if missing else {}
        out = []
        for i, (fv, row, comps) in best:
            c = comps["dense"] if "dense" in comps else float(cos[i])
            out.append((c, i, row, {**comps, "fused": fv} if explain and mode == "hybrid" else
                        (comps if explain else None)))
        return out

    def dense(self, q: np.ndarray, rows: list[dict], k: int, exact: bool = False) -> list[tuple[float, int, dict]]:
        """Best ``k`` ``(cosine, rowid, expert row)`` inside the given experts; large experts use hnswlib unless
        ``exact``."""
        cands: list[tuple[float, int, dict]] = []
        big = np.inf if exact else int(self.catalog.settings.ann_min_docs)
        cold: dict[int, dict] = {}
        for row in rows:
            if row["size"] >= big:
                lab, sim = self._doc_index(row).query(q, k)
                cands += [(float(s), int(i), row) for i, s in zip(lab[0], sim[0])]
                continue
            hot = self.catalog.hot_docs(row)
            if hot is None:
                cold[row["id"]] = row
                continue
            ids, m = hot
            if not len(ids):
                continue
            lab, sim = exact_topk(q, m, ids, k)
            cands += [(float(s), int(i), row) for i, s in zip(lab[0], sim[0])]
        if cold:
            rowids, sims, eids = self.store.vectors.knn(q, list(cold), k)
            cands += [(float(s), int(i), cold[int(e)]) for i, s, e in zip(rowids, sims, eids)]
        cands.sort(key=lambda c: (-c[0], c[1]))
        return cands[:k]

    def _doc_index(self, row: dict):
        """The hnswlib index of a large expert's documents: cached, else loaded and synced, then persisted."""
        if self._epoch != self.catalog.epoch:  # the file was re-embedded: every index is stale
            self._ann_docs, self._epoch = {}, self.catalog.epoch
        cache = self._ann_docs.get(row["id"])
        if cache is not None and cache[0] == row["version"]:
            return cache[1]
        name = f"ann:docs:{row['id']}"
        ef = int(self.catalog.settings.ann_ef)
        ids, m = self.catalog.expert_docs(row)
        idx = cache[1] if cache is not None else None
        if idx is None:
            stored = self.store.artefacts.get(name)
            if stored is not None:
                f = stored[2]
                idx = HnswIndex.from_bytes(stored[1], self.embedding.dim, np.asarray(f["labels"], np.int64), ef=ef,
                                           deleted=int(f.get("deleted", 0)))
                if stored[0] == str(row["version"]):
                    self._ann_docs[row["id"]] = (row["version"], idx)
                    return idx
        if idx is None:
            idx = HnswIndex(self.embedding.dim, ef=ef).fit(ids, m)
        else:
            idx.sync(ids, m)
        self.store.artefacts.put(name, str(row["version"]), idx.to_bytes(),
                                 {"labels": sorted(idx.labels_), "deleted": idx.deleted_, "ef": ef})
        self._ann_docs[row["id"]] = (row["version"], idx)
        return idx

    def hits(self, cands: list[tuple]) -> list[Hit]:
        """The passages of :meth:`retrieve`'s candidates, in that order."""
        docs = self.store.documents.by_rowid([c[1] for c in cands])
        return [Hit(expert=row["name"], id=docs[rid]["id"], text=docs[rid]["text"], score=score,
                    metadata=docs[rid]["metadata"], source=docs[rid]["source"], components=comps)
                for score, rid, row, comps in cands if rid in docs]

    def search(self, query: Union[str, np.ndarray], k: int = 10, experts: Optional[Sequence[str]] = None, *,
               retrieval: Optional[str] = None, explain: bool = False) -> list[Hit]:
        """Exhaustive search over every document (or only the named experts): the baseline.
        ``retrieval``: ``"hybrid"``, ``"dense"`` or ``"lexical"`` (default: the setting)."""
        self.catalog.refresh()
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInput(f"k must be an integer >= 1, got {k!r}")
        if retrieval is not None:
            check_mode(retrieval)
        texts, Q = encode_queries(self.embedding, [query])
        rows = [self.catalog.require(n) for n in experts] if experts is not None else \
            self.catalog.answering()
        text = query if isinstance(query, str) else None
        return self.hits(self.retrieve(Q[0], rows, k, exact=True, text=text, mode=retrieval, explain=explain))
