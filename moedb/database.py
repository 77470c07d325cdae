"""The library object: :class:`Database`, a thin facade over the parts of one open moedb file.

``Database`` checks nothing itself that a part checks, holds no state of its own beyond the parts, and
wires them explicitly (each part receives what it needs in its constructor; see docs/architecture.md):

- ``store`` (:mod:`moedb.store`): the file; ``embedding`` (:class:`~moedb.engine.embedding.FileEmbedder`):
  the file's embedder; ``catalog`` (:class:`~moedb.engine.catalog.Catalog`): the experts as of now;
- ``editor`` (:class:`~moedb.engine.experts.ExpertEditor`): experts and documents;
- ``gate`` (:class:`~moedb.engine.gate.GateService`): the one place that fits, loads and refits the router;
- ``retrieval``, ``balancing``, ``router`` (:class:`~moedb.engine.route.RouteService`): routing and passages;
- ``feedback_service``, ``evolution``, ``tuner``, ``expert_files`` (:mod:`moedb.lifecycle`): experts over time;
- ``analytics`` (:mod:`moedb.analytics`) and ``generation`` (:mod:`moedb.ask`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .analytics.stats import Analytics
from .ask import Answer, Generation
from .engine.balancing import Balancing
from .engine.catalog import Catalog
from .engine.embedding import FileEmbedder
from .engine.evidence import EvidenceService
from .engine.experts import Document, ExpertEditor, check_generator
from .engine.gate import GateService
from .engine.retrieval import Retrieval
from .engine.route import RouteService
from .errors import InvalidInput
from .lifecycle.evolve import Evolution
from .lifecycle.expert_files import ExpertFiles
from .lifecycle.feedback import FeedbackService
from .lifecycle.finetune import BATCH, LR
from .lifecycle.tune import Tuner
from .settings import Settings
from .store import Store, open_store
from .types import Expert, Hit, RouteResult

Progress = Optional[Callable[[int, int], None]]


class Database:
    """An open moedb file. Create with :func:`moedb.connect`."""

    def __init__(self, path: str = "moedb.db", embedder: Any = None, *, log_queries: Optional[bool] = None,
                 generator: Optional[dict] = None):
        self.path = os.fspath(path)
        self.store: Store = open_store(self.path)
        try:
            # tuned-model paths resolve against the file's absolute path taken now, whatever the cwd later
            self.embedding = FileEmbedder(self.store, os.path.abspath(self.path), embedder)
        except BaseException:
            self.store.close()
            raise
        store, emb = self.store, self.embedding
        self.catalog = Catalog(store, emb)
        self.editor = ExpertEditor(store, self.catalog, emb)
        self.gate = GateService(store, self.catalog, emb)
        self.retrieval = Retrieval(store, self.catalog, emb)
        self.balancing = Balancing(store, self.catalog)
        self.evidence = EvidenceService(store, self.catalog, emb)
        self.router = RouteService(store, self.catalog, emb, self.gate, self.retrieval, self.balancing,
                                   log_queries=log_queries, evidence=self.evidence)
        self.feedback_service = FeedbackService(store, self.catalog, emb, self.gate, self.router)
        self.evolution = Evolution(store, self.catalog, self.gate, self.feedback_service)
        self.tuner = Tuner(store, self.catalog, emb)
        self.expert_files = ExpertFiles(store, self.catalog, self.editor)
        self.analytics = Analytics(store, self.catalog)
        self.generation = Generation(store, self.catalog, emb, self.router, self.retrieval)
        if generator is not None:
            self.set_default_generator(generator)

    # ------------------------------------------------------------------ the file
    @property
    def embedder(self) -> Any:
        """The object that embeds texts for this file."""
        return self.embedding.embedder

    @property
    def dim(self) -> int:
        return self.embedding.dim

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<moedb.Database {self.path!r} embedder={self.embedder.name!r} dim={self.dim}>"

    def info(self) -> dict[str, Any]:
        """Summary of the file: path, embedder, schema version, counts, settings."""
        self.catalog.refresh()
        return {"path": self.path, "embedder": self.store.get_meta("embedder"),
                "schema_version": self.store.schema_version(), "experts": len(self.catalog.rows),
                "documents": self.store.documents.count(), "queries_logged": self.store.log.count(),
                "settings": self.settings()}

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict[str, Any]:
        """Database-wide settings (defaults merged with what the file stores)."""
        return Settings.from_stored(self.store.get_meta("settings")).as_dict()

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change database-wide settings (e.g. ``min_confidence=0.3``); ``ConfigError`` names a bad one."""
        with self.store.atomic():
            stored = self.store.get_meta("settings", {}) or {}
            Settings.from_stored(stored).changed(**settings)  # validates every value
            self.store.set_meta("settings", {**stored, **settings})
        self.catalog.touch()
        return self.settings()

    # ------------------------------------------------------------------ experts and documents
    def experts(self) -> list[Expert]:
        """All experts, in creation order."""
        return self.editor.experts()

    def expert(self, name: str) -> Expert:
        """One expert by name; raises :class:`UnknownExpert`."""
        return self.editor.expert(name)

    def add_expert(self, name: str, documents: Optional[Sequence[Document]] = None, *, description: str = "",
                   keywords: Optional[Sequence[str]] = None, parent: Optional[str] = None,
                   metadata: Optional[dict] = None, vectors: Optional[np.ndarray] = None,
                   generator: Optional[dict] = None, progress: Progress = None, refuse: bool = False,
                   files: Optional[Sequence[str]] = None, chunk_size: Optional[int] = None,
                   chunk_tokens: Optional[int] = None, overlap: Optional[int] = None) -> Expert:
        """Create an expert, optionally with documents (texts, dicts, passages of ``files``), in one transaction.

        ``files`` become passages of at most ``chunk_tokens`` of the embedder's tokens (default
        ``min(256, its limit)``) with ``overlap`` tokens (default 32) where a paragraph is cut, titled by their
        markdown headings; ``chunk_size`` (characters) instead splits by characters as before.

        ``refuse=True`` makes a *refusal expert*: its documents are examples of queries that none of the
        experts should answer; a route whose best match it is abstains (``r.refused_by``).
        """
        return self.editor.add_expert(name, documents, description=description, keywords=keywords, parent=parent,
                                        metadata=metadata, vectors=vectors, generator=generator, progress=progress,
                                        refuse=refuse, files=files, chunk_size=chunk_size,
                                        chunk_tokens=chunk_tokens, overlap=overlap)

    def update_expert(self, name: str, *, description: Optional[str] = None, keywords: Optional[Sequence[str]] = None,
                      parent: Any = ..., metadata: Optional[dict] = None, refuse: Optional[bool] = None) -> Expert:
        """Change an expert's description, keywords, parent (``None`` detaches), metadata or refusal role."""
        return self.editor.update_expert(name, description=description, keywords=keywords, parent=parent,
                                           metadata=metadata, refuse=refuse)

    def remove_expert(self, name: str) -> None:
        """Delete an expert and its documents; its children become roots."""
        self.editor.remove_expert(name)

    def add_documents(self, name: str, documents: Optional[Sequence[Document]] = None,
                      vectors: Optional[np.ndarray] = None, *, on_conflict: str = "error",
                      progress: Progress = None) -> int:
        """Add documents to an expert in one transaction; returns how many were added.

        ``vectors`` ``(n, d)``: their embeddings (else they are embedded). With vectors, ``documents`` may be
        left out (or be dicts with only ``id`` / ``metadata``): documents without text, routed by their vector,
        returned by id and metadata."""
        return self.editor.add_documents(name, documents, vectors, on_conflict=on_conflict, progress=progress)

    def add_files(self, name: str, paths: Sequence[str], *, chunk_size: Optional[int] = None,
                  chunk_tokens: Optional[int] = None, overlap: Optional[int] = None, on_conflict: str = "error",
                  progress: Progress = None) -> int:
        """Split files (or directories of .txt/.md/.jsonl) into passages and add them in one transaction.

        Passages hold at most ``chunk_tokens`` of the embedder's tokens (default ``min(256, its limit)``),
        ``overlap`` (default 32) where a paragraph is cut; ``chunk_size`` (characters) instead splits by
        characters. Ids are ``source#position``: adding the same files again gives the same ids."""
        return self.editor.add_files(name, paths, chunk_size=chunk_size, chunk_tokens=chunk_tokens,
                                       overlap=overlap, on_conflict=on_conflict, progress=progress)

    def remove_documents(self, name: str, ids: Sequence[str]) -> int:
        """Remove documents by id; returns how many were removed."""
        return self.editor.remove_documents(name, ids)

    def documents(self, name: str, limit: int = -1, offset: int = 0) -> list[dict[str, Any]]:
        """An expert's documents (id, text, metadata, source, position)."""
        return self.editor.documents(name, limit, offset)

    def apply_dir(self, path: str, *, dry_run: bool = False) -> dict[str, Any]:
        """Create or update experts from a folder of YAML files (one expert per file), in one transaction."""
        return self.expert_files.apply_dir(path, dry_run=dry_run)

    # ------------------------------------------------------------------ routing and retrieval
    def route(self, query: Union[str, np.ndarray], top_k: int = 2, k: int = 5,
              min_confidence: Optional[float] = None, *, log: Optional[bool] = None, explain: bool = False,
              context: Optional[Sequence[str]] = None, retrieval: Optional[str] = None) -> RouteResult:
        """Route one query (text or vector of shape ``(d,)``) to experts and retrieve passages.

        ``min_confidence=None``: the database default (the calibrated scope rule unless configured);
        a number is a rule on the top confidence, ``0.0`` never abstains. ``explain=True`` fills the
        score components (of experts and of hits); ``context``: earlier turns of a conversation;
        ``retrieval``: ``"hybrid"`` (BM25 + dense, fused), ``"dense"`` or ``"lexical"`` (default: the setting).
        """
        return self.router.route(query, top_k, k, min_confidence, log=log, explain=explain, context=context,
                                 retrieval=retrieval)

    def route_many(self, queries: Sequence[Union[str, np.ndarray]], top_k: int = 2, k: int = 5,
                   min_confidence: Optional[float] = None, *, log: Optional[bool] = None, explain: bool = False,
                   context: Optional[Sequence[str]] = None, retrieval: Optional[str] = None) -> list[RouteResult]:
        """Route a batch of queries: one embedding call, vectorised gating, one log transaction."""
        return self.router.route_many(queries, top_k, k, min_confidence, log=log, explain=explain, context=context,
                                      retrieval=retrieval)

    def search(self, query: Union[str, np.ndarray], k: int = 10, experts: Optional[Sequence[str]] = None, *,
               retrieval: Optional[str] = None, explain: bool = False) -> list[Hit]:
        """Exhaustive search over every document (or only the named experts): the baseline.
        ``retrieval``: ``"hybrid"``, ``"dense"`` or ``"lexical"`` (default: the setting); ``explain``: each
        hit's components."""
        return self.retrieval.search(query, k, experts, retrieval=retrieval, explain=explain)

    def refit_router(self, recalibrate: bool = True) -> dict[str, Any]:
        """Refit the gate now (a full calibration unless ``recalibrate=False``), and the passage evidence that
        goes with it, so that the next route does not pay for it; returns the gate's figures."""
        return self._with_evidence(self.gate.refit(recalibrate))

    def warm_router(self) -> dict[str, Any]:
        """Do now what the next route would do (load the stored gate, or refit it after changes), so that
        route does not pay for it (the passage evidence too); returns the gate's figures."""
        return self._with_evidence(self.gate.figures())

    def _with_evidence(self, figures: dict[str, Any]) -> dict[str, Any]:
        """Fit (or load) the current gate's passage evidence; its figures join ``figures["evidence"]``."""
        ev = self.evidence.current(self.gate.current())
        if ev is not None:
            figures["evidence"] = {k: ev.figures_[k] for k in ("weight", "depth", "sample", "scope_threshold")
                                  if k in ev.figures_}
        return figures

    def router_figures(self) -> dict[str, Any]:
        """Figures of the current gate (fitting it first if the experts changed)."""
        return self.gate.figures()

    def balance_stats(self) -> dict[str, Any]:
        """Load per expert since the last reset (``load``, ``share``, ``expected``, ``bias``), ``cv``, ``max_over_mean``."""
        return self.balancing.stats()

    def reset_balance(self, biases: bool = True) -> None:
        """Zero the load counters (and the selection biases unless ``biases=False``)."""
        self.balancing.reset(biases)

    def query_log(self, query_id: int) -> dict[str, Any]:
        """One logged route (time, query, chosen experts with scores, latency)."""
        if isinstance(query_id, bool) or not isinstance(query_id, (int, np.integer)) or not 0 < query_id < 2**63:
            raise InvalidInput(f"query_id must be a positive integer, got {query_id!r}")
        e = self.store.log.entry(int(query_id))
        if e is None:
            raise InvalidInput(f"unknown query id {query_id}")
        e.pop("query_vec", None)
        return e

    # ------------------------------------------------------------------ feedback and the life of experts
    def feedback(self, query_id: Union[int, str], expert: str, reward: float = 1.0, *, id: Any = None,
                 time: Any = None) -> dict[str, Any]:
        """Record that routing a query (a logged query id or a text) to ``expert`` was good or bad."""
        return self.feedback_service.feedback(query_id, expert, reward, id=id, time=time)

    def ingest_feedback(self, path: Union[str, os.PathLike], *, progress: Progress = None, batch: int = 256,
                        chunk: int = 20_000) -> dict[str, Any]:
        """Ingest a JSONL file of feedback events, streaming; bad lines are reported and skipped."""
        return self.feedback_service.ingest_feedback(path, progress=progress, batch=batch, chunk=chunk)

    def retrain(self, holdout: float = 0.1, *, min_heldout: int = 10) -> dict[str, Any]:
        """Fold feedback into the gate; figures measured on held-out feedback before and after."""
        return self.feedback_service.retrain(holdout, min_heldout=min_heldout)

    def split_expert(self, name: str, n: Optional[int] = None, *, names: Optional[Sequence[str]] = None,
                     max_n: Optional[int] = None, seed: int = 0) -> dict[str, Any]:
        """Split an expert by k-means over its documents (``n=None``: k by silhouette)."""
        return self.evolution.split_expert(name, n, names=names, max_n=max_n, seed=seed)

    def merge_experts(self, names: Sequence[str], into: str, *, description: Optional[str] = None) -> dict[str, Any]:
        """Merge experts into ``into`` (an existing expert or a new one)."""
        return self.evolution.merge_experts(names, into, description=description)

    def rename_expert(self, old: str, new: str) -> dict[str, Any]:
        """Rename an expert; its documents, children, feedback and log references stay."""
        return self.evolution.rename_expert(old, new)

    def optimize(self, apply: bool = False, **thresholds: Any) -> dict[str, Any]:
        """Proposed merges, splits and a retrain with their evidence; ``apply=True`` carries them out.

        ``thresholds``: ``merge_similarity``, ``confusion_ratio``, ``confusion_rate``, ``min_confused``,
        ``incoherence``, ``overload``, ``min_load``, ``min_split_size``, ``min_silhouette``, ``seed``, with
        their defaults and meaning at :meth:`moedb.lifecycle.evolve.Evolution.optimize` (the one place)."""
        return self.evolution.optimize(apply, **thresholds)

    def stats(self, since: Any = None, until: Any = None, *, buckets: int = 24) -> dict[str, Any]:
        """Load analytics over the query log between ``since`` and ``until``."""
        return self.analytics.stats(since, until, buckets=buckets)

    def embedders_dir(self) -> Path:
        """Where tuned embedders of this file live by default: ``<file>.embedders/`` beside it."""
        return self.tuner.embedders_dir()

    def tune_embedder(self, out: Optional[str] = None, *, epochs: Optional[int] = None, lr: float = LR,
                      batch_size: int = BATCH, holdout: Optional[float] = None, seed: int = 0,
                      progress: Optional[Callable[[str, int, int], None]] = None) -> dict[str, Any]:
        """Fine-tune the file's embedder on its experts' documents and re-embed the file with it (extra ``tune``;
        see :meth:`moedb.lifecycle.tune.Tuner.tune_embedder`)."""
        return self.tuner.tune_embedder(out, epochs=epochs, lr=lr, batch_size=batch_size, holdout=holdout,
                                        seed=seed, progress=progress)

    # ------------------------------------------------------------------ generation
    def set_default_generator(self, generator: Optional[dict]) -> None:
        """The generator experts without their own use (``None`` clears it: the built-in extractive one)."""
        self.store.set_meta("generator", None if generator is None else check_generator(generator))

    def set_generator(self, name: str, generator: Optional[dict]) -> Optional[dict]:
        """Set (or with ``None`` clear) an expert's generator; validated now. Returns the stored config."""
        return self.generation.set_generator(name, generator)

    def set_synthesizer(self, generator: Optional[dict]) -> None:
        """The generator ``llm_merge`` uses to merge answers."""
        self.generation.set_synthesizer(generator)

    def set_fallback_generator(self, generator: Optional[dict]) -> None:
        """The generator that answers (without passages) when routing abstains."""
        self.generation.set_fallback_generator(generator)

    def set_ask_defaults(self, **defaults: Any) -> dict[str, Any]:
        """Database defaults of :meth:`ask`, validated now; returns the merged defaults."""
        return self.generation.set_ask_defaults(**defaults)

    def ask_defaults(self) -> dict[str, Any]:
        return self.generation.ask_defaults()

    def generator_config(self, name: Optional[str] = None) -> dict:
        """The effective generator of an expert (its own, its overlay on the default, or the default)."""
        return self.generation.generator_config(name)

    def ask(self, query: str, top_k: Optional[int] = None, strategy: Optional[str] = None,
            collaboration: Optional[str] = None, rounds: Optional[int] = None, *, k: Optional[int] = None,
            min_confidence: Optional[float] = None, options: Optional[dict] = None,
            synthesizer: Optional[dict] = None, fallback: Optional[dict] = None,
            stream: Optional[Callable[[str], None]] = None, context: Optional[Sequence[str]] = None) -> Answer:
        """Answer ``query`` with the routed experts' generators and a synthesizer strategy (see
        :meth:`moedb.ask.Generation.ask` and docs/generation.md); ``context``: earlier turns of the
        conversation."""
        return self.generation.ask(query, top_k, strategy, collaboration, rounds, k=k, min_confidence=min_confidence,
                                   options=options, synthesizer=synthesizer, fallback=fallback, stream=stream,
                                   context=context)


def connect(path: str = "moedb.db", embedder: Any = None, *, log_queries: Optional[bool] = None,
            generator: Optional[dict] = None) -> Database:
    """Open (or create) a moedb file. ``":memory:"`` gives a private in-memory database.

    ``embedder``: ``None`` (the file's recorded embedder, else the bundled all-MiniLM-L6-v2),
    a sentence-transformers model name or path, or any object with
    ``embed(texts: list[str]) -> np.ndarray`` of shape ``(n, d)``.
    """
    return Database(path, embedder, log_queries=log_queries, generator=generator)
