"""The library object: :class:`Database` (experts, documents, routing, retrieval)."""
from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from . import db as _db
from .chunk import Passage, iter_files, read_passages
from .embed import SentenceTransformerEmbedder, VectorsOnly, resolve
from .errors import ConfigError, EmbedderMismatch, InvalidInput, UnknownExpert
from .routing.hierarchy import parent_centroids
from .routing.settings import check_routing_settings
from .analytics import AnalyticsMixin
from .ask import AskMixin
from .lifecycle import LifecycleMixin
from .routed import RoutingMixin
from .tune import TuneMixin
from .types import Expert
from .vectors import as_matrix, normalize

Document = Union[str, dict, Passage]
Progress = Optional[Callable[[int, int], None]]

DEFAULTS: dict[str, Any] = {
    "temperature": 0.05,      # kept for files written by the first router (the hybrid gate fits its own scale)
    "min_confidence": None,   # None = abstain on the scope rule below; a number = a rule on the top confidence
    "min_scope": None,        # None = the scope threshold calibrated on held-out documents; a number = that threshold
    "refuse_rate": 0.02,      # share of in-scope held-out documents the calibrated scope threshold refuses
                              # (0.02 keeps CLINC150 val accuracy >= 95% at the threshold; chosen on val)
    "min_heldout": 30,        # fewer held-out documents than this: no calibrated abstention
    "gate_C": 30.0,           # inverse ridge strength of the gate (as in scikit-learn); chosen on CLINC val
    "gate_folds": 3,          # cross-fitting folds for the mix weights and the threshold (< 2: no calibration)
    "gate_max_iter": 300,     # L-BFGS iterations of the gate fit
    "gate_max_docs": 20000,   # documents the gate is fitted on at most (sampled evenly across experts)
    "lexical": True,          # the n-gram naive-Bayes signal (documents, keywords, description) in the mix
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
    "recalibrate_after": 0.05,  # a lazy refit keeps the held-out calibration (mix, thresholds) of the last
                              # full fit until this share of the experts has changed since; 0 = always recalibrate
    "context_weight": 0.75,   # weight of the conversation in route(..., context=[...]); 0.5 let the n-gram
                              # gate send "and how do I rotate them?" after an AWS-keys exchange to car tires
    "log_queries": True,
    "log_vectors": True,
}


def _embedder_record(emb) -> dict[str, Any]:
    if isinstance(emb, VectorsOnly):
        kind, model = "vectors", None
    elif isinstance(emb, SentenceTransformerEmbedder):
        kind, model = "sentence-transformers", emb.model
    elif getattr(emb, "kind", None) in ("onnx-minilm", "onnx"):
        kind, model = "sentence-transformers", getattr(emb, "model_path", None)
    else:
        kind, model = "callable", None
    return {"name": emb.name, "dim": int(emb.dim), "kind": kind, "model": model}


def _own_centroid(row: dict[str, Any]) -> Optional[np.ndarray]:
    """Mean of an expert row's own documents ``(d,)`` float32, read-only (the cache and every Expert
    handed out share it); ``None`` without documents."""
    if not row["size"]:
        return None
    c = (row["vec_sum"] / row["size"]).astype(np.float32)
    c.flags.writeable = False
    return c


def _check_name(name: Any, what: str = "expert name") -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(f"{what} must be a non-empty string")
    if name != name.strip() or any(ord(c) < 32 for c in name):
        raise InvalidInput(f"{what} {name!r} has leading/trailing spaces or control characters")
    return name


def _check_refuse(refuse: Any, parent: Optional[str]) -> bool:
    if not isinstance(refuse, (bool, np.bool_)):
        raise InvalidInput(f"refuse must be True or False, got {refuse!r}")
    if refuse and parent is not None:
        raise InvalidInput("a refusal expert cannot have a parent (it is not part of the tree)")
    return bool(refuse)


class Database(RoutingMixin, LifecycleMixin, AnalyticsMixin, AskMixin, TuneMixin):
    """An open moedb file. Create with :func:`moedb.connect`."""

    def __init__(self, path: str = "moedb.db", embedder: Any = None, *, log_queries: Optional[bool] = None,
                 generator: Optional[dict] = None):
        self.path = os.fspath(path)
        self._abspath = os.path.abspath(self.path)  # tuned-model paths resolve against it, whatever the cwd later
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
        self._embedder_given = embedder is not None
        if embedder is None and rec is not None:
            if rec["kind"] == "vectors":
                emb = VectorsOnly(rec["dim"], rec["name"])
            elif rec["kind"] == "sentence-transformers":
                emb = resolve(self._checked_model(rec)) if rec["model"] else resolve(None)
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
        self._embedder_meta = rec if rec is not None else new
        self.store.expected_embedder = new["name"]
        return emb

    def _model_path(self, rec: dict[str, Any]) -> Path:
        """The model folder a record names (tuned folders are recorded relative to the file; when the
        file and its ``.embedders`` folder were renamed together, the folder is found there)."""
        p = Path(rec["model"])
        if not rec.get("relative_to_file"):
            return p
        here = Path(self._abspath).parent / p
        if not here.exists():
            moved = Path(self._abspath + ".embedders") / p.name
            if moved.exists():
                return moved
        return here

    def _checked_model(self, rec: dict[str, Any]) -> str:
        """The recorded model folder, checked against its fingerprint when the file has one (tuned models)."""
        folder = self._model_path(rec)
        if rec.get("fingerprint"):
            from .embed_onnx import cache_dir, model_fingerprint

            if not folder.is_dir():
                raise ConfigError(f"{self.path!r} was embedded with the tuned model {str(folder)!r}, which is "
                                  "missing; restore that folder (it travels with the file) or rebuild the file")
            if model_fingerprint(folder, cache_dir()) != rec["fingerprint"]:
                raise EmbedderMismatch(f"the tuned model {str(folder)!r} has changed since {self.path!r} was "
                                       "embedded with it")
        return str(folder)

    def _switch_embedder(self, emb: Any, record: dict[str, Any]) -> None:
        """Use ``emb`` from now on (the file now records ``record``); every cached vector is stale."""
        self.embedder = emb
        self._embedder_meta = record
        self.store.expected_embedder = record["name"]
        self._doc_cache = {}
        self._all_cache = None
        self._router_cache = None
        self._ann_docs = {}
        self._dirty = True

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
        if self.store.rolled_back:  # rows read inside a transaction that rolled back may never have existed
            self.store.rolled_back = False
            self._experts, self._doc_cache, self._dirty = [], {}, True
        if not self._dirty and dv == self._dv:
            return
        if dv != self._dv:
            rec = self.store.get_meta("embedder")
            if rec != self._embedder_meta:  # another process re-embedded the file (tune_embedder)
                if self._embedder_given:
                    raise EmbedderMismatch(f"{self.path!r} was re-embedded with {rec.get('name')!r} by another "
                                           f"process; reconnect (this connection embeds with {self.embedder.name!r})")
                self._switch_embedder(self._open_embedder(None), rec)
        with self.store.snapshot():  # the stamps and the changed rows from one state of the file
            rows = self._reload_rows()
        parent_centroids(rows)
        self._experts = rows
        self._by_name = {r["name"]: r for r in rows}
        live = {r["id"]: r["version"] for r in rows}
        self._doc_cache = {i: c for i, c in self._doc_cache.items() if live.get(i) == c[0]}
        self._settings = self.settings()
        self._dv = dv
        self._dirty = False

    def _reload_rows(self) -> list[dict[str, Any]]:
        """Expert rows as the file has them now. Only new or changed rows are read and decoded (a file of
        thousands of experts stays cheap to refresh after each write); unchanged ones are the same dicts
        (a Database is not shared between threads; the router keeps its own arrays, not these)."""
        old = {r["id"]: r for r in self._experts}
        stamps = self.store.expert_stamps()
        changed = [i for i, v, u, _ in stamps
                   if i not in old or old[i]["version"] != v or old[i]["updated_at"] != u]
        fresh = {r["id"]: r for r in self.store.expert_rows(changed)} if changed else {}
        rows = []
        for i, _, _, parent_id in stamps:
            r = fresh.get(i)
            if r is None:
                r = old[i]
                r["parent_id"] = parent_id  # (deleting its parent sets it NULL without a version bump)
            else:
                r["own_centroid"] = _own_centroid(r)
            r["centroid"] = r["own_centroid"]  # (parent_centroids gives pure parents their subtree's)
            rows.append(r)
        names = {r["id"]: r["name"] for r in rows}
        for r in rows:
            r["parent"] = names.get(r["parent_id"])
        return rows

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
                      parent=row["parent"], size=row["size"], metadata=copy.deepcopy(row["metadata"]),
                      generator=copy.deepcopy(row["generator"]), created_at=row["created_at"], updated_at=row["updated_at"],
                      centroid=row.get("centroid"), refuse=bool(row.get("refuse")))

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
        if self._by_name[parent].get("refuse"):
            raise InvalidInput(f"{parent!r} is a refusal expert and cannot be a parent")
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
                   generator: Optional[dict] = None, progress: Progress = None, refuse: bool = False) -> Expert:
        """Create an expert, optionally with documents, in one transaction.

        ``refuse=True`` makes a *refusal expert*: its documents are examples of queries that none of the
        experts should answer. It joins the gate as one more class but is never selected; a route whose
        best match it is abstains (``r.refused_by``), and it sharpens the scope rule for everything else.
        """
        _check_name(name)
        refuse = _check_refuse(refuse, parent)
        kw = [str(k) for k in (keywords or [])]
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidInput("metadata must be a dict")
        gen = self._check_generator(generator) if generator is not None else None
        parent_id = self._check_parent(parent)
        self._refresh()  # embed with the file's current embedder (another process may have tuned it)
        prepared = self._prepare(documents or [], vectors, progress) if documents or vectors is not None else None
        with self.store.atomic():
            eid = self.store.insert_expert(name, description or "", kw, parent_id, metadata or {}, gen, refuse)
            if prepared:
                self.store.insert_documents(eid, *prepared)
            # the new row alone (the next call refreshes the rest): adding thousands of experts stays linear
            row = self.store.expert_row(name)
        self._touch()
        row["centroid"] = _own_centroid(row)
        return self._to_expert(row)

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
                      parent: Any = ..., metadata: Optional[dict] = None, refuse: Optional[bool] = None) -> Expert:
        """Change an expert's description, keywords, parent (``None`` detaches), metadata or refusal role."""
        row = self._require(name)
        fields: dict[str, Any] = {}
        if refuse is not None or parent is not ...:  # the role and the parent as they will be
            will_refuse = _check_refuse(row["refuse"] if refuse is None else refuse,
                                        row["parent"] if parent is ... else parent)
        if refuse is not None:
            fields["refuse"] = int(will_refuse)
            if will_refuse and self.store.children(row["id"]):
                raise InvalidInput(f"{name!r} has children: a refusal expert cannot be a parent")
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
        return rows, self._embed_batches([r[1] for r in rows], progress, batch)

    def _embed_batches(self, texts: list[str], progress: Progress = None, batch: int = 256,
                       embedder: Any = None) -> np.ndarray:
        """:meth:`_embed` in batches of ``batch`` texts, reporting ``progress(done, total)``; ``(n, dim)``."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(texts), batch):
            out[s:s + batch] = self._embed(texts[s:s + batch], embedder)
            if progress:
                progress(min(s + batch, len(texts)), len(texts))
        return out

    def _embed(self, texts: list[str], embedder: Any = None) -> np.ndarray:
        """Validated unit vectors ``(n, dim)`` of ``texts`` from ``embedder`` (default: the file's)."""
        emb = self.embedder if embedder is None else embedder
        v = emb.embed(texts)
        if getattr(emb, "checks_output", False) and getattr(v, "shape", None) == (len(texts), self.dim):
            return v
        return normalize(as_matrix(v, self.dim, what=f"embedder {emb.name!r} output"))

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
