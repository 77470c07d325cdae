"""Fine-tuning a sentence-transformers embedder as a classifier of the experts' documents (the numerics
behind :meth:`moedb.Database.tune_embedder`).

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

Training needs PyTorch and sentence-transformers, the optional extra ``tune`` (``pip install
"moedb[tune]"``); routing afterwards does not.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from ..errors import ConfigError

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
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ConfigError(f"tune: fine-tuning needs PyTorch and sentence-transformers ({e.name} is missing); "
                          'install them with pip install "moedb[tune]"') from None

    torch.manual_seed(seed)
    model = SentenceTransformer(base, device="cpu", local_files_only=True)
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
