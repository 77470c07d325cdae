"""Tuning the file's embedder on its experts' documents (:meth:`Database.tune_embedder`).

A general-purpose sentence encoder places "book a flight" and "cancel my flight" close together;
the experts' documents say which distinctions matter here. Tuning fine-tunes the embedder (a
sentence-transformers model: the bundled all-MiniLM-L6-v2 by default) as an expert classifier: a
cosine-softmax head whose rows start at the experts' centroids, label smoothing, AdamW with a linear
warm-up and decay. The tuned model is saved as an ordinary sentence-transformers folder beside the
file, every document (and feedback query) is re-embedded with it, and the file records it as its
embedder, so later routes, ``moedb route`` (through the ONNX runtime) and new documents use it.

A share of every expert's documents (``holdout``) is kept out of the fine-tune. The embedder has
seen the rest, so they sit closer to their expert than unseen queries will; only the held-out ones
calibrate the gate (its mix, the abstention thresholds and the held-out figures), and
``holdout_accuracy_before`` / ``_after`` are measured on them.

Training imports PyTorch and sentence-transformers (dependencies of moedb); routing afterwards
does not.
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
from typing import Any, Callable, Optional

import numpy as np

from .errors import ConfigError, FileProblem, InvalidInput

Progress = Optional[Callable[[str, int, int], None]]

#: Defaults chosen on CLINC150 *val* (see benches/bench_routing.py --tune): 3 epochs, lr 5e-5.
EPOCHS = 3
MIN_STEPS = 300         # a small file gets more epochs: at least this many optimizer steps (epochs=None)
MAX_EPOCHS = 50
LR = 5e-5
BATCH = 32
HOLDOUT = 0.1
SCALE = 20.0            # cosine-softmax temperature of the training head
LABEL_SMOOTHING = 0.1
HEAD_LR_FACTOR = 20.0   # the head moves faster than the encoder
WARMUP = 0.06           # share of the steps with a rising learning rate


def split_holdout(labels: np.ndarray, holdout: float, seed: int) -> np.ndarray:
    """Boolean mask ``(n,)``: True for the documents kept out of the fine-tune.

    Per expert, ``floor(holdout * n + 0.5)`` documents chosen at random, at most ``n - 1`` (every
    expert keeps at least one training document); reproducible for a given ``seed``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for e in np.unique(labels):
        idx = np.flatnonzero(labels == e)
        n_hold = min(int(math.floor(holdout * len(idx) + 0.5)), len(idx) - 1)
        if n_hold > 0:
            held[rng.choice(idx, size=n_hold, replace=False)] = True
    return held


def auto_holdout(n_answering: int, min_heldout: int) -> float:
    """``holdout`` for ``holdout=None``: ``HOLDOUT``, or more for a small file (at most half), so that
    about ``min_heldout + 10`` in-scope documents are held out and the gate can still calibrate its
    abstention threshold (it does not abstain with fewer than ``min_heldout``)."""
    if n_answering <= 0:
        return HOLDOUT
    return float(max(HOLDOUT, min(0.5, (min_heldout + 10) / n_answering)))


def auto_epochs(n_train: int, batch_size: int) -> int:
    """Epochs for ``epochs=None``: ``EPOCHS``, or more for a small file, so that there are at least
    ``MIN_STEPS`` optimizer steps (at most ``MAX_EPOCHS`` epochs)."""
    per_epoch = max(1, math.ceil(n_train / batch_size))
    return int(min(MAX_EPOCHS, max(EPOCHS, math.ceil(MIN_STEPS / per_epoch))))


def centroid_accuracy(X_tr: np.ndarray, y_tr: np.ndarray, X_te: np.ndarray, y_te: np.ndarray, E: int) -> Optional[float]:
    """Nearest-centroid accuracy of ``X_te`` ``(m, d)`` with centroids from ``X_tr`` ``(n, d)``; None if m == 0."""
    if not len(y_te):
        return None
    C = np.zeros((E, X_tr.shape[1]))
    np.add.at(C, y_tr, X_tr)
    C /= np.maximum(np.linalg.norm(C, axis=1, keepdims=True), 1e-12)
    return float(((X_te @ C.T).argmax(axis=1) == y_te).mean())


def fine_tune(base: str, texts: list[str], labels: np.ndarray, n_classes: int, *, epochs: int = EPOCHS,
              lr: float = LR, batch_size: int = BATCH, seed: int = 0, progress: Progress = None):
    """Fine-tune the sentence-transformers model at ``base`` to classify ``texts`` into ``labels`` ``(n,)``.

    Returns the tuned ``SentenceTransformer`` (on the CPU, in eval mode) and the mean training loss of
    each epoch.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(seed)
    model = SentenceTransformer(base, device="cpu")
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    with torch.no_grad():
        X0 = model.encode(texts, batch_size=128, convert_to_tensor=True, normalize_embeddings=True,
                          show_progress_bar=False)
    W0 = torch.zeros(n_classes, X0.shape[1])
    W0.index_add_(0, y, X0.float())
    head = torch.nn.Parameter(torch.nn.functional.normalize(W0, dim=1))
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "lr": lr},
                             {"params": [head], "lr": lr * HEAD_LR_FACTOR}], weight_decay=0.01)
    per_epoch = math.ceil(len(texts) / batch_size)
    steps = max(1, epochs * per_epoch)
    warm = max(1, int(WARMUP * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / max(1, steps - warm)))
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    rng = np.random.default_rng(seed)
    losses = []
    model.train()
    for ep in range(epochs):
        perm = rng.permutation(len(texts))
        total = 0.0
        for b, s in enumerate(range(0, len(perm), batch_size)):
            idx = perm[s:s + batch_size]
            feats = tokenize([texts[i] for i in idx])
            out = torch.nn.functional.normalize(model(feats)["sentence_embedding"], dim=1)
            logits = SCALE * out @ torch.nn.functional.normalize(head, dim=1).T
            loss = torch.nn.functional.cross_entropy(logits, y[idx], label_smoothing=LABEL_SMOOTHING)
            if not bool(torch.isfinite(loss.detach())):
                raise ConfigError(f"tune: the training loss became {float(loss.detach())} at epoch {ep + 1}; "
                                  "try a lower learning rate")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            if progress:
                progress(f"epoch {ep + 1}/{epochs}", b + 1, per_epoch)
        losses.append(total / len(texts))
    model.eval()
    return model, losses


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


@contextlib.contextmanager
def _only_tune(lock: Optional[Path], what: str):
    """Hold an exclusive advisory lock on ``lock`` for the whole tune, so that a second tune of the same
    file fails at once instead of training for minutes and then being refused (``None``: in memory)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the switch transaction still refuses the later of two tunes
        fcntl = None
    if lock is None or fcntl is None:
        yield
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(lock), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only folder: no lock (saving the model there fails with its own error)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileProblem(f"tune: another tune-embedder is running on {what}; wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # releases the lock


class TuneMixin:
    """:meth:`tune_embedder` for :class:`moedb.Database`."""

    def embedders_dir(self) -> Path:
        """Where tuned embedders of this file live by default: ``<file>.embedders/`` beside it."""
        return Path(self._abspath + ".embedders")

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
        self._refresh()
        _need_two_experts(sum(1 for r in self._experts if r["size"]))
        if out is not None and os.path.exists(os.path.abspath(os.fspath(out))):
            raise InvalidInput(f"tune: {os.path.abspath(os.fspath(out))} already exists (give a new folder for "
                               "the tuned model)")
        # one tune per file at a time (the real path: two names of one file share the lock)
        lock = None if self.path in ("", ":memory:") else \
            Path(os.path.realpath(self._abspath) + ".embedders") / ".tune.lock"
        with _only_tune(lock, repr(self.path)):
            return self._tune(out, epochs, lr, batch_size, holdout, seed, progress)

    def _tune(self, out, epochs, lr, batch_size, holdout, seed, progress) -> dict[str, Any]:
        from .embed import resolve
        from .embed_onnx import cache_dir, model_fingerprint

        rec = self._tunable_record()  # (read again under the lock)
        # retuning starts from the original model: {"model": ..., "relative_to_file": ...} of the base
        base_rec = rec.get("base") if rec.get("tuned") else {"model": rec.get("model"),
                                                             "relative_to_file": rec.get("relative_to_file", False)}
        base_rec = base_rec or {"model": None}
        if base_rec.get("model"):
            base_path = str(self._model_path(base_rec))
        else:
            from .embed import default_model_path

            base_path = default_model_path()
        base_name = rec.get("base_name") or rec.get("name") or os.path.basename(base_path)

        self._refresh()
        docs, fb = self.store.texts_to_embed()
        old_vecs = self.store.document_vectors([rid for rid, _, _ in docs], self.dim)
        eids = sorted({e for _, e, _ in docs})
        _need_two_experts(len(eids))  # (again: another process may have removed some meanwhile)
        col = {e: j for j, e in enumerate(eids)}
        texts = [t for _, _, t in docs]
        labels = np.array([col[e] for _, e, _ in docs], dtype=np.int64)
        refuse = {r["id"] for r in self._experts if r.get("refuse")}
        answering = np.array([e not in refuse for _, e, _ in docs])
        min_heldout = int(self._settings.get("min_heldout", 30))
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
        if out is None and self.path in ("", ":memory:"):
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
            V = self._embed_batches(texts + [q for _, q in fb], embedder=emb,
                                    progress=(lambda d, n: progress("re-embedding", d, n)) if progress else None)
            before = after = None
            if held.any():
                before = centroid_accuracy(old_vecs[tr], labels[tr], old_vecs[held], labels[held], len(eids))
                Vd = V[:len(texts)]
                after = centroid_accuracy(Vd[tr], labels[tr], Vd[held], labels[held], len(eids))
            rel, relative = self._record_path(folder)
            record = {"name": name, "dim": int(self.dim), "kind": "sentence-transformers", "model": rel,
                      "relative_to_file": relative, "fingerprint": model_fingerprint(folder, cache_dir()),
                      "base": base_rec, "base_name": base_name,
                      "tuned": {"at": time.time(), "epochs": epochs, "lr": float(lr), "batch_size": batch_size,
                                "holdout": float(holdout), "seed": seed, "experts": len(eids),
                                "trained": int(tr.sum()), "held_out": int(held.sum()),
                                "holdout_accuracy_before": before, "holdout_accuracy_after": after}}
            F4 = np.dtype("<f4")
            doc_vecs = {rid: (t, V[i].astype(F4).tobytes()) for i, (rid, _, t) in enumerate(docs)}
            fb_vecs = {fid: (q, V[len(texts) + i].astype(F4).tobytes()) for i, (fid, q) in enumerate(fb)}
            tuned_ids = {rid for (rid, _, _), h in zip(docs, held) if not h}
            counts = self.store.replace_embeddings(doc_vecs, tuned_ids, fb_vecs, record,
                                                   lambda ts: self._embed(ts, emb), expect=rec or None)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            if placed:  # our own folder, never committed: no file refers to it
                shutil.rmtree(folder, ignore_errors=True)
            raise
        self._switch_embedder(emb, record)
        # a previous tuned folder stays: a copy of the file (a backup) may still refer to it
        return {**record["tuned"], "documents": len(docs), "loss": losses, "model": str(folder), "name": name,
                "warnings": warnings,
                "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - t0, 1),
                **{k: v for k, v in counts.items() if k != "documents"}}

    # ------------------------------------------------------------------ helpers
    def _tunable_record(self) -> dict[str, Any]:
        """The file's embedder record; ConfigError unless it is a sentence-transformers model."""
        rec = self.store.get_meta("embedder") or {}
        if rec.get("kind") != "sentence-transformers":
            raise ConfigError(f"tune: this file's embedder {rec.get('name')!r} is not a sentence-transformers "
                              "model (vectors-only files and custom embedders cannot be tuned)")
        return rec

    def _record_path(self, folder: Path) -> tuple[str, bool]:
        """The model folder as the file records it: relative to the file's directory when inside it
        (the file and its embedders can then move together), else absolute."""
        base = Path(self._abspath).parent
        try:
            return str(folder.relative_to(base)), True
        except ValueError:
            return str(folder), False
