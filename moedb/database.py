"""The library object: :class:`Database` (experts, documents, routing, retrieval)."""
from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from . import db as _db
from .chunk import Passage, iter_files, read_passages
from .embed import CallableEmbedder, SentenceTransformerEmbedder, VectorsOnly, check_texts, resolve
from .errors import ConfigError, EmbedderMismatch, InvalidInput, MoedbError, UnknownExpert
from .routing.ann import HnswIndex, exact_topk
from .routing.balance import Balancer, load_figures
from .routing.engine import Router, fingerprint, mix_context
from .routing.gating import select
from .routing.hierarchy import parent_centroids
from .routing.settings import check_routing_settings
from .routing.hybrid import HybridGate
from .analytics import AnalyticsMixin
from .ask import AskMixin
from .lifecycle import LifecycleMixin
from .types import Expert, ExpertScore, Hit, RouteResult
from .vectors import as_matrix, normalize, to_blob

Document = Union[str, dict, Passage]
Progress = Optional[Callable[[int, int], None]]

DEFAULTS: dict[str, Any] = {
    "temperature": 0.05,      # kept for files written by the first router (the hybrid gate fits its own scale)
    "min_confidence": None,   # None = the threshold calibrated on held-out documents; 0.0 = never abstain
    "refuse_rate": 0.03,      # share of in-scope held-out documents the calibrated threshold refuses
    "min_heldout": 30,        # fewer held-out documents than this: no calibrated abstention
    "gate_C": 30.0,           # inverse ridge strength of the gate (as in scikit-learn); chosen on CLINC val
    "gate_folds": 3,          # cross-fitting folds for the mix weights and the threshold (< 2: no calibration)
    "gate_max_iter": 300,     # L-BFGS iterations of the gate fit
    "lexical": True,          # keyword/BM25 signal in the mix
    "balance": True,          # load balancing among near-equivalent experts
    "balance_rate": 0.01,     # bias step per routed query (logit units)
    "balance_max_bias": 1.0,  # |bias| bound (logit units)
    "balance_margin": 2.0,    # experts within this logit margin of the best are near-equivalent ...
    "balance_similarity": 0.95,  # ... and within this cosine of the best one's mean direction (0 = any);
                                 # these balancing defaults were chosen on CLINC val replicas (bench_balance)
    "capacity": None,         # max selections per expert per window (None = unlimited)
    "capacity_window": 3600.0,
    "beam": None,             # None = auto (width 3 on a tree with >= 1000 experts), 0 = flat, n = width
    "ann_min_centroids": 4000,  # hnswlib over the centroids from this many
    "ann_candidates": 64,     # centroids fetched by hnswlib per query
    "ann_min_docs": 20000,    # hnswlib inside experts with at least this many documents
    "ann_ef": 128,            # hnswlib search breadth (persisted with each index)
    "context_weight": 0.5,    # weight of the conversation in route(..., context=[...])
    "log_queries": True,
    "log_vectors": True,
}


def _embedder_record(emb) -> dict[str, Any]:
    if isinstance(emb, VectorsOnly):
        kind, model = "vectors", None
    elif isinstance(emb, SentenceTransformerEmbedder):
        kind, model = "sentence-transformers", emb.model
    elif getattr(emb, "kind", None) == "onnx-minilm":
        kind, model = "sentence-transformers", None
    else:
        kind, model = "callable", None
    return {"name": emb.name, "dim": int(emb.dim), "kind": kind, "model": model}


def _check_name(name: Any, what: str = "expert name") -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(f"{what} must be a non-empty string")
    if name != name.strip() or any(ord(c) < 32 for c in name):
        raise InvalidInput(f"{what} {name!r} has leading/trailing spaces or control characters")
    return name


class Database(LifecycleMixin, AnalyticsMixin, AskMixin):
    """An open moedb file. Create with :func:`moedb.connect`."""

    def __init__(self, path: str = "moedb.db", embedder: Any = None, *, log_queries: Optional[bool] = None,
                 generator: Optional[dict] = None):
        self.path = os.fspath(path)
        self.store = _db.Store(self.path)
        try:
            self.embedder = self._open_embedder(embedder)
        except BaseException:
            self.store.close()
            raise
        self._log_override = log_queries
        self._dv: Optional[int] = None
        self._dirty = True
        self._experts: list[dict[str, Any]] = []
        self._by_name: dict[str, dict[str, Any]] = {}
        self._doc_cache: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        self._all_cache: Optional[tuple[tuple, np.ndarray, np.ndarray, np.ndarray]] = None
        self._settings: dict[str, Any] = {}
        self._router_cache: Any = None
        self._ann_docs: dict[int, tuple[int, Any]] = {}
        if generator is not None:
            self.set_default_generator(generator)

    # ------------------------------------------------------------------ setup
    def _open_embedder(self, embedder: Any):
        rec = self.store.get_meta("embedder")
        if embedder is None and rec is not None:
            if rec["kind"] == "vectors":
                emb = VectorsOnly(rec["dim"], rec["name"])
            elif rec["kind"] == "sentence-transformers":
                emb = resolve(rec["model"]) if rec["model"] else resolve(None)
            else:
                raise EmbedderMismatch(
                    f"{self.path!r} was built with the custom embedder {rec['name']!r} (dimension {rec['dim']}); "
                    "pass the same embedder to connect(..., embedder=...)")
        else:
            emb = resolve(embedder)
        new = _embedder_record(emb)
        if rec is None:
            self.store.set_meta("embedder", new)
        elif rec["name"] != new["name"] or rec["dim"] != new["dim"]:
            raise EmbedderMismatch(
                f"{self.path!r} was built with embedder {rec['name']!r} (dimension {rec['dim']}), "
                f"not {new['name']!r} (dimension {new['dim']})")
        return emb

    @property
    def dim(self) -> int:
        return int(self.embedder.dim)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<moedb.Database {self.path!r} embedder={self.embedder.name!r} dim={self.dim}>"

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict[str, Any]:
        """Database-wide settings (defaults merged with what the file stores)."""
        return {**DEFAULTS, **(self.store.get_meta("settings", {}) or {})}

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change database-wide settings (e.g. ``min_confidence=0.3``, ``temperature=0.05``)."""
        unknown = set(settings) - set(self._known_settings())
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        check_routing_settings(settings)
        cur = self.store.get_meta("settings", {}) or {}
        cur.update(settings)
        self.store.set_meta("settings", cur)
        self._dirty = True
        return self.settings()

    def _known_settings(self) -> Iterable[str]:
        return DEFAULTS.keys()

    def set_default_generator(self, generator: dict) -> None:
        self.store.set_meta("generator", self._check_generator(generator))

    # ------------------------------------------------------------------ state cache
    def _touch(self) -> None:
        self._dirty = True

    def _refresh(self) -> None:
        """Reload expert rows if this or another process changed the file."""
        dv = self.store.data_version()
        if not self._dirty and dv == self._dv:
            return
        rows = self.store.expert_rows()
        for r in rows:
            r["centroid"] = (r["vec_sum"] / r["size"]).astype(np.float32) if r["size"] else None
        parent_centroids(rows)
        self._experts = rows
        self._by_name = {r["name"]: r for r in rows}
        live = {r["id"]: r["version"] for r in rows}
        self._doc_cache = {i: c for i, c in self._doc_cache.items() if live.get(i) == c[0]}
        self._settings = self.settings()
        self._dv = dv
        self._dirty = False

    def _expert_docs(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Cached ``(rowids (n,), unit vectors (n, d))`` of one expert."""
        c = self._doc_cache.get(row["id"])
        if c is None or c[0] != row["version"]:
            ids, m = self.store.expert_vectors(row["id"])
            if m.size == 0:
                m = np.zeros((0, self.dim), dtype=np.float32)
            c = (row["version"], ids, m)
            self._doc_cache[row["id"]] = c
        return c[1], c[2]

    def _require(self, name: str) -> dict[str, Any]:
        self._refresh()
        row = self._by_name.get(name)
        if row is None:
            raise UnknownExpert(name)
        return row

    # ------------------------------------------------------------------ experts
    def _to_expert(self, row: dict[str, Any]) -> Expert:
        return Expert(name=row["name"], description=row["description"], keywords=list(row["keywords"]),
                      parent=row["parent"], size=row["size"], metadata=dict(row["metadata"]),
                      generator=row["generator"], created_at=row["created_at"], updated_at=row["updated_at"],
                      centroid=row.get("centroid"))

    def experts(self) -> list[Expert]:
        """All experts, in creation order."""
        self._refresh()
        return [self._to_expert(r) for r in self._experts]

    def expert(self, name: str) -> Expert:
        """One expert by name; raises :class:`UnknownExpert`."""
        return self._to_expert(self._require(name))

    def _check_parent(self, parent: Optional[str], child: Optional[str] = None) -> Optional[int]:
        if parent is None:
            return None
        _check_name(parent, "parent name")
        self._refresh()
        if parent not in self._by_name:
            raise UnknownExpert(parent, role="parent expert")
        if child is not None:
            node: Optional[str] = parent
            while node is not None:
                if node == child:
                    raise InvalidInput(f"setting {parent!r} as parent of {child!r} would create a cycle")
                node = self._by_name[node]["parent"]
        return self._by_name[parent]["id"]

    def add_expert(self, name: str, documents: Optional[Sequence[Document]] = None, *, description: str = "",
                   keywords: Optional[Sequence[str]] = None, parent: Optional[str] = None,
                   metadata: Optional[dict] = None, vectors: Optional[np.ndarray] = None,
                   generator: Optional[dict] = None, progress: Progress = None) -> Expert:
        """Create an expert, optionally with documents, in one transaction."""
        _check_name(name)
        kw = [str(k) for k in (keywords or [])]
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidInput("metadata must be a dict")
        gen = self._check_generator(generator) if generator is not None else None
        parent_id = self._check_parent(parent)
        prepared = self._prepare(documents or [], vectors, progress) if documents or vectors is not None else None
        with self.store.atomic():
            eid = self.store.insert_expert(name, description or "", kw, parent_id, metadata or {}, gen)
            if prepared:
                self.store.insert_documents(eid, *prepared)
        self._touch()
        return self.expert(name)

    def _check_generator(self, generator: dict) -> dict:
        """Validated generator config (full validation lives in moedb.generate when installed)."""
        try:
            from .generate import validate_config
        except ImportError:
            if not isinstance(generator, dict):
                raise ConfigError("generator must be a dict") from None
            return dict(generator)
        return validate_config(generator)

    def update_expert(self, name: str, *, description: Optional[str] = None, keywords: Optional[Sequence[str]] = None,
                      parent: Any = ..., metadata: Optional[dict] = None) -> Expert:
        """Change an expert's description, keywords, parent (``None`` detaches) or metadata."""
        row = self._require(name)
        fields: dict[str, Any] = {}
        if description is not None:
            fields["description"] = description
        if keywords is not None:
            fields["keywords"] = [str(k) for k in keywords]
        if metadata is not None:
            fields["metadata"] = metadata
        if parent is not ...:
            fields["parent_id"] = self._check_parent(parent, child=name)
        self.store.update_expert(row["id"], **fields)
        self._touch()
        return self.expert(name)

    def remove_expert(self, name: str) -> None:
        """Delete an expert and its documents; its children become roots."""
        row = self._require(name)
        self.store.delete_expert(row["id"])
        self._touch()

    # ------------------------------------------------------------------ documents
    def _prepare(self, documents: Sequence[Document], vectors: Optional[np.ndarray], progress: Progress,
                 batch: int = 256) -> tuple[list[tuple], np.ndarray]:
        """Normalise documents to rows and compute/validate their vectors (before any write)."""
        if isinstance(documents, (str, dict)):
            documents = [documents]
        rows = []
        for i, d in enumerate(documents):
            if isinstance(d, Passage):
                text, did, md, src, pos = d.text, d.id, d.metadata, d.source, d.position
            elif isinstance(d, str):
                text, did, md, src, pos = d, None, {}, None, None
            elif isinstance(d, dict):
                text, did = d.get("text"), d.get("id")
                md, src, pos = d.get("metadata") or {}, d.get("source"), d.get("position")
                if not isinstance(md, dict):
                    raise InvalidInput(f"document #{i}: metadata must be a dict")
            else:
                raise InvalidInput(f"document #{i}: expected str or dict with 'text', got {type(d).__name__}")
            if not isinstance(text, str) or not text.strip():
                raise InvalidInput(f"document #{i}: empty text")
            if did is None:
                did = f"{src}#{pos}" if src is not None and pos is not None else \
                    hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
            rows.append((str(did), text, md, src, pos))
        ids = [r[0] for r in rows]
        if len(set(ids)) != len(ids):
            dup = next(x for x in ids if ids.count(x) > 1)
            raise InvalidInput(f"document id {dup!r} appears twice in this call")
        if vectors is not None:
            v = as_matrix(vectors, self.dim, what="vectors")
            if v.shape[0] != len(rows):
                raise InvalidInput(f"{v.shape[0]} vectors given for {len(rows)} documents")
            return rows, normalize(v)
        texts = [r[1] for r in rows]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(texts), batch):
            out[s:s + batch] = self._embed(texts[s:s + batch])
            if progress:
                progress(min(s + batch, len(texts)), len(texts))
        return rows, out

    def _embed(self, texts: list[str]) -> np.ndarray:
        v = self.embedder.embed(texts)
        return normalize(as_matrix(v, self.dim, what=f"embedder {self.embedder.name!r} output"))

    def add_documents(self, name: str, documents: Sequence[Document], vectors: Optional[np.ndarray] = None, *,
                      on_conflict: str = "error", progress: Progress = None) -> int:
        """Add documents to an expert in one transaction; returns how many were added."""
        row = self._require(name)
        prepared = self._prepare(documents, vectors, progress)
        n = self.store.insert_documents(row["id"], *prepared, on_conflict=on_conflict)
        self._touch()
        return n

    def add_files(self, name: str, paths: Sequence[str], *, chunk_size: int = 1000, on_conflict: str = "error",
                  progress: Progress = None) -> int:
        """Split files (or directories of .txt/.md/.jsonl) into passages and add them in one transaction."""
        self._require(name)
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        passages = [p for f in iter_files(list(paths)) for p in read_passages(f, chunk_size)]
        if not passages:
            raise InvalidInput("no passages found in " + ", ".join(map(str, paths)))
        return self.add_documents(name, passages, on_conflict=on_conflict, progress=progress)

    def remove_documents(self, name: str, ids: Sequence[str]) -> int:
        """Remove documents by id; returns how many were removed."""
        row = self._require(name)
        n = self.store.delete_documents(row["id"], [str(i) for i in ids])
        self._touch()
        return n

    def documents(self, name: str, limit: int = -1, offset: int = 0) -> list[dict[str, Any]]:
        """An expert's documents (id, text, metadata, source, position)."""
        row = self._require(name)
        return [{k: v for k, v in d.items() if k != "rowid"} for d in self.store.list_documents(row["id"], limit, offset)]

    # ------------------------------------------------------------------ routing
    def _query_vectors(self, queries: Sequence[Any]) -> tuple[list[str], np.ndarray]:
        texts: list[Optional[str]] = []
        vecs: list[Optional[np.ndarray]] = []
        for i, q in enumerate(queries):
            if isinstance(q, str):
                if not q.strip():
                    raise InvalidInput("query is empty" if len(queries) == 1 else f"query #{i} is empty")
                texts.append(q)
                vecs.append(None)
            elif isinstance(q, np.ndarray) or isinstance(q, (list, tuple)):
                v = as_matrix(q, self.dim, what="query vector")
                if v.shape[0] != 1:
                    raise InvalidInput("a query vector must have shape (d,)")
                texts.append(None)
                vecs.append(normalize(v)[0])
            else:
                raise InvalidInput(f"query #{i}: expected str or vector, got {type(q).__name__}")
        todo = [i for i, v in enumerate(vecs) if v is None]
        if todo:
            emb = self._embed([texts[i] for i in todo])
            for j, i in enumerate(todo):
                vecs[i] = emb[j]
        Q = np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, self.dim), np.float32)
        return [t if t is not None else "<vector>" for t in texts], Q

    def _router(self):
        """The fitted router over the routable experts (documents > 0), loaded or refitted lazily.

        The gate persisted in the file is used when it was fitted on exactly the current experts
        (ids and versions) and settings; otherwise it is refitted and written back in one transaction.
        """
        cur = self._router_cache
        if cur is not None and cur.seen and cur.seen[0] is self._experts and cur.seen[1] is self._settings:
            return cur  # nothing reloaded since the last call: same experts, same settings
        routable = [r for r in self._experts if r["size"] > 0]
        if not routable:
            return None
        key = fingerprint(routable, self._settings)
        if cur is not None and cur.key == key:
            self._attach_ann(cur)
            cur.seen = (self._experts, self._settings)
            return cur
        stored = self.store.routing_get("gate")
        if stored is not None and stored[0] == key:
            router = Router(routable, self._experts, HybridGate.from_bytes(stored[1]), key)
        else:
            router = self._fit_router(routable, key, previous=cur)
        self._attach_ann(router)
        router.seen = (self._experts, self._settings)
        self._router_cache = router
        return router

    def _fit_router(self, routable: list[dict], key: str, previous=None):
        docs = {}
        for eid, (rowids, texts, blob) in self.store.routing_documents([r["id"] for r in routable]).items():
            docs[eid] = (np.frombuffer(blob, dtype="<f4").reshape(len(rowids), self.dim).astype(np.float32), texts)
        if previous is None:
            stored = self.store.routing_get("gate")
            if stored is not None:
                try:
                    g = HybridGate.from_bytes(stored[1])
                    ids = g.figures_.get("expert_ids", [])
                    if len(ids) == g.n_experts_ and g.coef_.shape[0] == self.dim:
                        rows = [{"id": i, "version": -1} for i in ids]
                        previous = Router(rows, rows, g, stored[0])
                except (ValueError, KeyError, OSError):
                    previous = None
        router = Router.fit(routable, self._experts, docs, self._settings, feedback=self._feedback_examples(),
                            previous=previous, key=key)
        self.store.routing_put("gate", key, router.gate_bytes(), router.figures())
        return router

    def _attach_ann(self, router) -> None:
        """Index the centroids with hnswlib once they are many (persisted, keyed by the gate)."""
        C = router.gate.centroids_
        ef = int(self._settings["ann_ef"])
        if len(C) < int(self._settings["ann_min_centroids"]):
            router.set_ann(None)
            return
        if router._ann is not None:
            router._ann.set_ef(ef)
            return
        stored = self.store.routing_get("ann:centroids")
        labels = np.arange(len(C), dtype=np.int64)
        if stored is not None and stored[0] == router.key:
            idx = HnswIndex.from_bytes(stored[1], self.dim, labels, ef=ef)
        else:
            idx = HnswIndex(self.dim, ef=ef).fit(labels, C)
            self.store.routing_put("ann:centroids", router.key, idx.to_bytes(), {"items": len(C), "ef": ef})
        router.set_ann(idx)

    def refit_router(self) -> dict[str, Any]:
        """Refit the gate from the experts' documents and the feedback, persist it; returns fit figures.

        Figures: ``experts``, ``documents``, ``feedback``, held-out ``heldout_accuracy``, ``heldout_ece``,
        ``heldout_refused``, the mix weights, the calibrated ``threshold``, ``centroids``.
        """
        self._refresh()
        routable = [r for r in self._experts if r["size"] > 0]
        if not routable:
            self._router_cache = None
            return {"experts": 0}
        key = fingerprint(routable, self._settings)
        router = self._fit_router(routable, key, previous=self._router_cache)
        self._attach_ann(router)
        self._router_cache = router
        return router.figures()

    def router_figures(self) -> dict[str, Any]:
        """Figures of the current gate (fitting it first if the experts changed)."""
        self._refresh()
        r = self._router()
        return r.figures() if r is not None else {"experts": 0}

    def _beam_width(self, router) -> int:
        b = self._settings["beam"]
        if b is None:
            return 3 if router.tree.has_structure() and len(router.rows) >= 1000 else 0
        return int(b)

    def _gate(self, Q: np.ndarray, texts: Optional[list[Optional[str]]]):
        """Score queries ``(n, d)``: ``(router, components {name: (n, E)}, logits (n, E), conf (n, E), scored (n,))``.

        Candidates come from a beam over the tree, or hnswlib over the centroids, or all experts.
        """
        router = self._router()
        if router is None:
            z = np.zeros((len(Q), 0))
            return None, {}, z, z, np.zeros(len(Q), dtype=np.int64)
        width = self._beam_width(router)
        cands = None
        if width > 0:
            cands = [router.beam(q, width)[0] for q in Q]
        elif router._ann is not None:
            cands = router.ann_candidates(Q, int(self._settings["ann_candidates"]))
        comps, z, conf, mask = router.score(Q, texts, cands)
        return router, comps, z, conf, mask.sum(axis=1)

    def _retrieve(self, q: np.ndarray, rows: list[dict], k: int, exact: bool = False) -> list[tuple[float, int, dict]]:
        """Best ``k`` (score, rowid, expert row) inside the given experts; large experts use hnswlib unless ``exact``."""
        cands: list[tuple[float, int, dict]] = []
        big = np.inf if exact else int(self._settings["ann_min_docs"])
        for row in rows:
            if row["size"] >= big:
                lab, sim = self._doc_index(row).query(q, k)
                cands += [(float(s), int(i), row) for i, s in zip(lab[0], sim[0])]
                continue
            ids, m = self._expert_docs(row)
            if not len(ids):
                continue
            lab, sim = exact_topk(q, m, ids, k)
            cands += [(float(s), int(i), row) for i, s in zip(lab[0], sim[0])]
        cands.sort(key=lambda c: (-c[0], c[1]))
        return cands[:k]

    def _doc_index(self, row: dict):
        """The hnswlib index of a large expert's documents: cached, else loaded and synced, then persisted."""
        cache = self._ann_docs.get(row["id"])
        if cache is not None and cache[0] == row["version"]:
            return cache[1]
        name = f"ann:docs:{row['id']}"
        ef = int(self._settings["ann_ef"])
        ids, m = self._expert_docs(row)
        idx = cache[1] if cache is not None else None
        if idx is None:
            stored = self.store.routing_get(name)
            if stored is not None:
                f = stored[2]
                idx = HnswIndex.from_bytes(stored[1], self.dim, np.asarray(f["labels"], np.int64), ef=ef,
                                           deleted=int(f.get("deleted", 0)))
                if stored[0] == str(row["version"]):
                    self._ann_docs[row["id"]] = (row["version"], idx)
                    return idx
        if idx is None:
            idx = HnswIndex(self.dim, ef=ef).fit(ids, m)
        else:
            idx.sync(ids, m)
        self.store.routing_put(name, str(row["version"]), idx.to_bytes(),
                               {"labels": sorted(idx.labels_), "deleted": idx.deleted_, "ef": ef})
        self._ann_docs[row["id"]] = (row["version"], idx)
        return idx

    def _hits(self, cands: list[tuple[float, int, dict]]) -> list[Hit]:
        docs = self.store.documents_by_rowid([c[1] for c in cands])
        return [Hit(expert=row["name"], id=docs[rid]["id"], text=docs[rid]["text"], score=score,
                    metadata=docs[rid]["metadata"], source=docs[rid]["source"])
                for score, rid, row in cands if rid in docs]

    def _check_route_args(self, top_k: int, k: int, min_confidence: Optional[float]) -> Optional[float]:
        """Validated arguments; the explicit threshold or ``None`` (database default / calibrated)."""
        if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
            raise InvalidInput(f"top_k must be an integer >= 1, got {top_k!r}")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
            raise InvalidInput(f"k must be an integer >= 0, got {k!r}")
        if min_confidence is None:
            return None
        if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float, np.floating)) or \
                not (0.0 <= float(min_confidence) <= 1.0):
            raise InvalidInput(f"min_confidence must be a number in [0, 1], got {min_confidence!r}")
        return float(min_confidence)

    def _threshold(self, explicit: Optional[float], router) -> float:
        if explicit is not None:
            return explicit
        s = self._settings["min_confidence"]
        if s is not None:
            return float(s)
        return float(router.gate.threshold_) if router is not None else 0.0

    def _check_context(self, context: Any) -> list[str]:
        if context is None:
            return []
        if isinstance(context, str) or not isinstance(context, (list, tuple)):
            raise InvalidInput(f"context must be a list of strings (earlier turns), got {type(context).__name__}")
        for i, t in enumerate(context):
            if not isinstance(t, str):
                raise InvalidInput(f"context must be a list of strings: item #{i} is {type(t).__name__}")
        return [t for t in context if t.strip()]

    def _with_context(self, Q: np.ndarray, texts: list[Optional[str]], context: list[str]
                      ) -> tuple[np.ndarray, list[Optional[str]]]:
        """Mix the conversation into each query: ``q + w * sum_i 0.5^i c_i`` (latest turn first), renormalised.

        ``w = context_weight``; the lexical signal sees the query plus the latest turn.
        """
        Q2 = mix_context(Q, self._embed(list(context)), float(self._settings["context_weight"]))
        return Q2, [(t + " " + context[-1]) if t is not None else context[-1] for t in texts]

    def route(self, query: Union[str, np.ndarray], top_k: int = 2, k: int = 5,
              min_confidence: Optional[float] = None, *, log: Optional[bool] = None, explain: bool = False,
              context: Optional[Sequence[str]] = None) -> RouteResult:
        """Route one query (text or vector of shape ``(d,)``) to experts and retrieve passages.

        ``min_confidence=None`` uses the database default (the threshold calibrated on held-out
        documents unless ``configure(min_confidence=...)`` set one); ``0.0`` never abstains.
        ``explain=True`` fills each expert's ``components`` and ``r.explanation``; ``context``: earlier
        turns of a conversation (list of str) mixed into the query.
        """
        if isinstance(query, (list, tuple)) and query and isinstance(query[0], str):
            raise InvalidInput("route() takes one query; use route_many() for a list")
        return self.route_many([query], top_k=top_k, k=k, min_confidence=min_confidence, log=log,
                               explain=explain, context=context)[0]

    def route_many(self, queries: Sequence[Union[str, np.ndarray]], top_k: int = 2, k: int = 5,
                   min_confidence: Optional[float] = None, *, log: Optional[bool] = None, explain: bool = False,
                   context: Optional[Sequence[str]] = None) -> list[RouteResult]:
        """Route a batch of queries: one embedding call, vectorised gating, one log transaction."""
        t0 = time.perf_counter()
        self._refresh()
        explicit = self._check_route_args(top_k, k, min_confidence)
        ctx = self._check_context(context)
        if isinstance(queries, np.ndarray) and queries.ndim == 2:
            queries = list(queries)
        if not len(queries):
            return []
        texts, Q = self._query_vectors(list(queries))
        lex_texts: list[Optional[str]] = [t if t != "<vector>" else None for t in texts]
        if ctx:
            Q, lex_texts = self._with_context(Q, lex_texts, ctx)
        router, comps, z, conf, scored = self._gate(Q, [t or "" for t in lex_texts])
        thr = self._threshold(explicit, router)
        n, E = conf.shape
        bal = self._balancer(router) if router is not None and self._settings["balance"] else None
        results = []
        for i in range(n):
            if bal is not None:
                sel = select(conf[i:i + 1], top_k, thr, bias=bal.bias, logits=z[i:i + 1], blocked=bal.blocked())[0]
                bal.observe(z[i], sel, top_k)
            else:
                sel = select(conf[i:i + 1], top_k, thr)[0] if E else np.zeros(0, np.int64)
            rows = [router.rows[j] for j in sel]
            es = [ExpertScore(router.rows[j]["name"], float(z[i, j]), float(conf[i, j])) for j in sel]
            hits = self._hits(self._retrieve(Q[i], rows, k)) if rows and k else []
            r = RouteResult(query=texts[i], experts=es, hits=hits, abstained=not es)
            if rows:
                r.path = router.path(rows[0]["id"])
            if explain:
                router.explain(r, comps, z[i], conf[i], i, sel, thr, bal.bias if bal is not None else None,
                               int(scored[i]), lex_texts[i], len(ctx))
            results.append(r)
        elapsed = (time.perf_counter() - t0) * 1000.0 / len(results)
        for r in results:
            r.latency_ms = elapsed
        if bal is not None and log is not False:
            self._save_balance(router, bal)
        self._log(results, Q, log)
        return results

    # ------------------------------------------------------------------ load balancing
    def _balancer(self, router) -> Balancer:
        s = self._settings
        rows = self.store.balance_rows()
        now = time.time()
        ws = now - float(s["capacity_window"])
        bias = np.zeros(len(router.rows))
        used = np.zeros(len(router.rows), dtype=np.int64)
        for eid, (b, _, _, start, count) in rows.items():
            j = router.col.get(eid)
            if j is not None:
                bias[j] = b
                used[j] = count if start >= ws else 0
        return Balancer(bias, rate=float(s["balance_rate"]), max_bias=float(s["balance_max_bias"]),
                        margin=float(s["balance_margin"]), capacity=s["capacity"], window_used=used,
                        means=router.means(), similarity=float(s["balance_similarity"]))

    def _save_balance(self, router, bal: Balancer) -> None:
        d = bal.delta_bias_
        touched = np.flatnonzero((d != 0) | (bal.load_ > 0) | (bal.expected_ > 0) | (bal.window_delta_ > 0))
        if not len(touched):
            return
        dw = bal.window_delta_  # every selection of this call counts against the capacity window
        now = time.time()
        self.store.balance_apply([(router.rows[j]["id"], d[j], bal.load_[j], bal.expected_[j], int(dw[j]))
                                  for j in touched], float(self._settings["balance_max_bias"]),
                                 now - float(self._settings["capacity_window"]), now)

    def balance_stats(self) -> dict[str, Any]:
        """Load figures since the last reset: per expert ``{load, share, expected, bias}``, and ``cv``,
        ``max_over_mean`` of the load across routable experts."""
        self._refresh()
        rows = self.store.balance_rows()
        routable = [r for r in self._experts if r["size"] > 0]
        load = np.array([rows.get(r["id"], (0, 0))[1] for r in routable], dtype=np.float64)
        fig = load_figures(load)
        total = fig["total"] or 1.0
        fig["experts"] = {r["name"]: {"load": float(load[j]), "share": float(load[j] / total),
                                      "expected": float(rows.get(r["id"], (0, 0, 0))[2]),
                                      "bias": float(rows.get(r["id"], (0.0,))[0])}
                          for j, r in enumerate(routable)}
        return fig

    def reset_balance(self, biases: bool = True) -> None:
        """Zero the load counters (and the selection biases unless ``biases=False``)."""
        self.store.balance_reset(biases)

    def _log(self, results: list[RouteResult], Q: np.ndarray, log: Optional[bool]) -> None:
        enabled = log if log is not None else (
            self._log_override if self._log_override is not None else self._settings["log_queries"])
        if not enabled:
            return
        now = time.time()
        keep_vec = self._settings["log_vectors"]
        entries = [{
            "ts": now, "query": r.query, "query_vec": to_blob(Q[i]) if keep_vec else None,
            "abstained": r.abstained, "top_confidence": r.experts[0].confidence if r.experts else None,
            "latency_ms": r.latency_ms,
            "choices": [(self._by_name[e.name]["id"], rank, e.score, e.confidence) for rank, e in enumerate(r.experts)],
        } for i, r in enumerate(results)]
        for r, qid in zip(results, self.store.log_routes(entries)):
            r.query_id = qid

    def search(self, query: Union[str, np.ndarray], k: int = 10, experts: Optional[Sequence[str]] = None) -> list[Hit]:
        """Exhaustive search over every document (or only the named experts): the baseline."""
        self._refresh()
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInput(f"k must be an integer >= 1, got {k!r}")
        _, Q = self._query_vectors([query])
        rows = [self._require(n) for n in experts] if experts is not None else \
            [r for r in self._experts if r["size"] > 0]
        return self._hits(self._retrieve(Q[0], rows, k, exact=True))

    def query_log(self, query_id: int) -> dict[str, Any]:
        """One logged route (time, query, chosen experts with scores, latency)."""
        e = self.store.query_entry(int(query_id))
        if e is None:
            raise InvalidInput(f"unknown query id {query_id}")
        e.pop("query_vec", None)
        return e

    def info(self) -> dict[str, Any]:
        """Summary of the file: path, embedder, schema version, counts, settings."""
        self._refresh()
        return {"path": self.path, "embedder": self.store.get_meta("embedder"),
                "schema_version": self.store.schema_version(), "experts": len(self._experts),
                "documents": self.store.count_documents(), "queries_logged": self.store.query_log_count(),
                "settings": self.settings()}


def connect(path: str = "moedb.db", embedder: Any = None, *, log_queries: Optional[bool] = None,
            generator: Optional[dict] = None) -> Database:
    """Open (or create) a moedb file. ``":memory:"`` gives a private in-memory database.

    ``embedder``: ``None`` (the file's recorded embedder, else the bundled all-MiniLM-L6-v2),
    a sentence-transformers model name or path, or any object with
    ``embed(texts: list[str]) -> np.ndarray`` of shape ``(n, d)``.
    """
    return Database(path, embedder, log_queries=log_queries, generator=generator)
