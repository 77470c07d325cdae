"""Tuning the file's embedder on its experts' documents (:meth:`moedb.Database.tune_embedder`): fine-tune
(:mod:`moedb.lifecycle.finetune`), save the model beside the file, re-embed every document and feedback
query in one transaction, and record the tuned folder as the file's embedder.

A share of every expert's documents (``holdout``) is kept out of the fine-tune; only those calibrate the
gate afterwards (``documents.tuned`` marks the others). One tune runs per file at a time (a lock file in
``<file>.embedders/``).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import filelock
import numpy as np

from ..embed import cache_dir, default_model_path, model_fingerprint, resolve
from ..engine.catalog import Catalog
from ..engine.embedding import FileEmbedder
from ..errors import ConfigError, FileProblem, InvalidInput
from ..store import Store
from ..vectors import F4
from .finetune import (BATCH, LR, Progress, auto_epochs, auto_holdout, centroid_accuracy, fine_tune,
                       split_holdout)


@contextlib.contextmanager
def only_tune(lock: Optional[Path], what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock`` for the whole tune, so that a second tune of the same file fails
    at once instead of training for minutes and then being refused (``None``: in memory, no lock)."""
    if lock is None:
        yield
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        held = filelock.FileLock(str(lock))
        held.acquire(timeout=0)
    except filelock.Timeout:
        raise FileProblem(f"tune: another tune-embedder is running on {what}; wait for it to finish") from None
    except OSError:  # a read-only folder: no lock (saving the model there fails with its own error)
        yield
        return
    try:
        yield
    finally:
        held.release()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "embedder"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` (and the directories) to disk before the file refers to it."""
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def _need_two_experts(n: int) -> None:
    if n < 2:
        raise InvalidInput("tune: needs at least two experts with documents (it learns what tells them apart)")


class Tuner:
    """:meth:`tune_embedder` for one file."""

    def __init__(self, store: Store, catalog: Catalog, embedding: FileEmbedder):
        self.store = store
        self.catalog = catalog
        self.embedding = embedding

    def embedders_dir(self) -> Path:
        """Where tuned embedders of this file live by default: ``<file>.embedders/`` beside it."""
        return Path(self.embedding.abspath + ".embedders")

    def tune_embedder(self, out: Optional[str] = None, *, epochs: Optional[int] = None, lr: float = LR,
                      batch_size: int = BATCH, holdout: Optional[float] = None, seed: int = 0,
                      progress: Progress = None) -> dict[str, Any]:
        """Fine-tune the file's embedder on its experts' documents and re-embed the file with it.

        ``out``: the folder for the tuned model (must not exist; default ``<file>.embedders/<name>``);
        ``epochs`` (``None``: 3, more for a small file, see :func:`auto_epochs`), ``lr``, ``batch_size``:
        the fine-tune; ``holdout``: share of every expert's documents
        kept out of it (they calibrate the gate and measure the gain; ``None``: 10%, more for a small
        file, see :func:`auto_holdout`); ``progress(stage, done, total)``.
        Retuning starts again from the original model, not from the previous tuned one.

        Returns figures: ``documents``, ``experts``, ``trained``, ``held_out``, ``holdout_accuracy_before``
        and ``holdout_accuracy_after`` (nearest centroid on the held-out documents, before and after),
        ``loss`` per epoch, ``seconds``, ``model`` (the folder), ``name`` and re-embedding counts.
        Nothing in the file changes unless the whole run succeeds. A second tune of the same file while
        one runs raises :class:`FileProblem` at once.
        """
        if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1):
            raise InvalidInput(f"epochs must be an integer >= 1, got {epochs!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 2:
            raise InvalidInput(f"batch_size must be an integer >= 2, got {batch_size!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr < 1):
            raise InvalidInput(f"lr must be a number in (0, 1), got {lr!r}")
        if holdout is not None and not (isinstance(holdout, (int, float)) and not isinstance(holdout, bool)
                                        and 0 <= holdout < 1):
            raise InvalidInput(f"holdout must be in [0, 1), got {holdout!r}")
        self._tunable_record()
        self.catalog.refresh()
        _need_two_experts(sum(1 for r in self.catalog.rows if r["size"]))
        if out is not None and os.path.exists(os.path.abspath(os.fspath(out))):
            raise InvalidInput(f"tune: {os.path.abspath(os.fspath(out))} already exists (give a new folder for "
                               "the tuned model)")
        # one tune per file at a time (the real path: two names of one file share the lock)
        lock = None if self.store.path in ("", ":memory:") else \
            Path(os.path.realpath(self.embedding.abspath) + ".embedders") / ".tune.lock"
        with only_tune(lock, repr(self.store.path)):
            return self._tune(out, epochs, lr, batch_size, holdout, seed, progress)

    def _tune(self, out, epochs, lr, batch_size, holdout, seed, progress) -> dict[str, Any]:

        rec = self._tunable_record()  # (read again under the lock)
        # retuning starts from the original model: {"model": ..., "relative_to_file": ...} of the base
        base_rec = rec.get("base") if rec.get("tuned") else {"model": rec.get("model"),
                                                             "relative_to_file": rec.get("relative_to_file", False)}
        base_rec = base_rec or {"model": None}
        if base_rec.get("model"):
            base_path = str(self.embedding.model_path(base_rec))
        else:
            base_path = default_model_path()
        base_name = rec.get("base_name") or rec.get("name") or os.path.basename(base_path)

        self.catalog.refresh()
        docs, fb = self.store.texts_to_embed()
        old_vecs = self.store.documents.vectors_by_rowid([rid for rid, _, _ in docs], self.embedding.dim)
        eids = sorted({e for _, e, _ in docs})
        _need_two_experts(len(eids))  # (again: another process may have removed some meanwhile)
        col = {e: j for j, e in enumerate(eids)}
        texts = [t for _, _, t in docs]
        labels = np.array([col[e] for _, e, _ in docs], dtype=np.int64)
        refuse = {r["id"] for r in self.catalog.rows if r.get("refuse")}
        answering = np.array([e not in refuse for _, e, _ in docs])
        min_heldout = int(self.catalog.settings.min_heldout)
        if holdout is None:
            holdout = auto_holdout(int(answering.sum()), min_heldout)
        held = split_holdout(labels, float(holdout), seed)
        warnings = []
        if int((held & answering).sum()) < min_heldout:
            warnings.append(f"only {int((held & answering).sum())} in-scope documents are held out (fewer than "
                            f"min_heldout={min_heldout}): the gate will not abstain on its scope until more "
                            "documents are added")

        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = _safe_name(f"{base_name}-tuned-{stamp}")
        if out is None and self.store.path in ("", ":memory:"):
            raise InvalidInput("tune: an in-memory database has no folder beside it; pass out=FOLDER")
        if out is None:
            folder = self.embedders_dir() / name
            k = 1
            while folder.exists():
                k += 1
                folder = self.embedders_dir() / f"{name}-{k}"
        else:
            folder = Path(os.path.abspath(os.fspath(out)))  # (checked not to exist before the lock)
        name = folder.name

        t0 = time.perf_counter()
        tr = ~held
        if epochs is None:
            epochs = auto_epochs(int(tr.sum()), batch_size)
        model, losses = fine_tune(base_path, [t for t, h in zip(texts, held) if not h], labels[tr], len(eids),
                                  epochs=epochs, lr=float(lr), batch_size=batch_size, seed=seed, progress=progress)
        train_seconds = time.perf_counter() - t0
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=folder.parent))
        placed = False
        try:
            model.save(str(partial))
            del model
            _fsync_tree(partial)
            if folder.exists():
                raise InvalidInput(f"tune: {folder} appeared while training (another tune?); nothing was changed")
            os.replace(partial, folder)
            placed = True
            _fsync_dir(folder.parent)
            emb = resolve(str(folder))
            V = self.embedding.embed_batches(texts + [q for _, q in fb], embedder=emb,
                                    progress=(lambda d, n: progress("re-embedding", d, n)) if progress else None)
            before = after = None
            if held.any():
                before = centroid_accuracy(old_vecs[tr], labels[tr], old_vecs[held], labels[held], len(eids))
                Vd = V[:len(texts)]
                after = centroid_accuracy(Vd[tr], labels[tr], Vd[held], labels[held], len(eids))
            rel, relative = self.embedding.record_path(folder)
            record = {"name": name, "dim": int(self.embedding.dim), "kind": "sentence-transformers", "model": rel,
                      "relative_to_file": relative, "fingerprint": model_fingerprint(folder, cache_dir()),
                      "base": base_rec, "base_name": base_name,
                      "tuned": {"at": time.time(), "epochs": epochs, "lr": float(lr), "batch_size": batch_size,
                                "holdout": float(holdout), "seed": seed, "experts": len(eids),
                                "trained": int(tr.sum()), "held_out": int(held.sum()),
                                "holdout_accuracy_before": before, "holdout_accuracy_after": after}}
            doc_vecs = {rid: (t, V[i].astype(F4).tobytes()) for i, (rid, _, t) in enumerate(docs)}
            fb_vecs = {fid: (q, V[len(texts) + i].astype(F4).tobytes()) for i, (fid, q) in enumerate(fb)}
            tuned_ids = {rid for (rid, _, _), h in zip(docs, held) if not h}
            counts = self.store.replace_embeddings(doc_vecs, tuned_ids, fb_vecs, record,
                                                   lambda ts: self.embedding.embed(ts, emb), expect=rec or None)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            if placed:  # our own folder, never committed: no file refers to it
                shutil.rmtree(folder, ignore_errors=True)
            raise
        self.embedding.switch(emb, record)
        self.catalog.stale()
        # a previous tuned folder stays: a copy of the file (a backup) may still refer to it
        return {**record["tuned"], "documents": len(docs), "loss": losses, "model": str(folder), "name": name,
                "warnings": warnings,
                "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - t0, 1),
                **{k: v for k, v in counts.items() if k != "documents"}}

    def _tunable_record(self) -> dict[str, Any]:
        """The file's embedder record; ConfigError unless it is a sentence-transformers model."""
        rec = self.store.get_meta("embedder") or {}
        if rec.get("kind") != "sentence-transformers":
            raise ConfigError(f"tune: this file's embedder {rec.get('name')!r} is not a sentence-transformers "
                              "model (vectors-only files and custom embedders cannot be tuned)")
        return rec
