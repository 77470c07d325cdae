"""The file's embedder: which model a moedb file was embedded with, opening it, checking it, and
turning texts into validated unit vectors.

A file records its embedder (``meta.embedder``: name, dimension, kind, model folder, fingerprint for
tuned folders). :class:`FileEmbedder` opens that embedder (or checks the one the caller passed against
it), follows a switch another process made (``tune_embedder``), and embeds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..embed import SentenceTransformerEmbedder, VectorsOnly, cache_dir, model_fingerprint, resolve
from ..errors import ConfigError, EmbedderMismatch
from ..store import Store
from ..vectors import as_matrix, normalize

Progress = Optional[Callable[[int, int], None]]


def embedder_record(emb: Any) -> dict[str, Any]:
    """What a file records of an embedder: ``{"name", "dim", "kind", "model"}``."""
    if isinstance(emb, VectorsOnly):
        kind, model = "vectors", None
    elif isinstance(emb, SentenceTransformerEmbedder):
        kind, model = "sentence-transformers", emb.model
    elif getattr(emb, "kind", None) in ("onnx-minilm", "onnx"):
        kind, model = "sentence-transformers", getattr(emb, "model_path", None)
    else:
        kind, model = "callable", None
    return {"name": emb.name, "dim": int(emb.dim), "kind": kind, "model": model}


class FileEmbedder:
    """The embedder of one open file.

    ``store``: the file; ``abspath``: its absolute path (tuned model folders are recorded relative to
    it); ``embedder``: what the caller passed to :func:`moedb.connect` (``None``: the file's own).
    Attributes: ``embedder`` (the object that embeds), ``record`` (what the file records of it),
    ``pinned`` (the caller chose it: a switch by another process is then an error, not followed).
    """

    def __init__(self, store: Store, abspath: str, embedder: Any = None):
        self.store = store
        self.abspath = abspath
        self.pinned = embedder is not None
        self.embedder, self.record = self._open(embedder)

    @property
    def dim(self) -> int:
        return int(self.embedder.dim)

    @property
    def name(self) -> str:
        return self.embedder.name

    # ------------------------------------------------------------------ opening
    def _open(self, embedder: Any) -> tuple[Any, dict[str, Any]]:
        rec = self.store.get_meta("embedder")
        if embedder is None and rec is not None:
            if rec["kind"] == "vectors":
                emb = VectorsOnly(rec["dim"], rec["name"])
            elif rec["kind"] == "sentence-transformers":
                emb = resolve(self.checked_model(rec)) if rec["model"] else resolve(None)
            else:
                raise EmbedderMismatch(
                    f"{self.store.path!r} was built with the custom embedder {rec['name']!r} (dimension "
                    f"{rec['dim']}); pass the same embedder to connect(..., embedder=...)")
        else:
            emb = resolve(embedder)
        new = embedder_record(emb)
        if rec is None:
            self.store.set_meta("embedder", new)
        elif rec["name"] != new["name"] or rec["dim"] != new["dim"]:
            raise EmbedderMismatch(
                f"{self.store.path!r} was built with embedder {rec['name']!r} (dimension {rec['dim']}), "
                f"not {new['name']!r} (dimension {new['dim']})")
        self.store.expected_embedder = new["name"]
        return emb, (rec if rec is not None else new)

    def model_path(self, rec: dict[str, Any]) -> Path:
        """The model folder a record names (tuned folders are recorded relative to the file; when the
        file and its ``.embedders`` folder were renamed together, the folder is found there)."""
        p = Path(rec["model"])
        if not rec.get("relative_to_file"):
            return p
        here = Path(self.abspath).parent / p
        if not here.exists():
            moved = Path(self.abspath + ".embedders") / p.name
            if moved.exists():
                return moved
        return here

    def record_path(self, folder: Path) -> tuple[str, bool]:
        """A model folder as the file records it: relative to the file's directory when inside it (the
        file and its embedders can then move together), else absolute. ``(path, relative)``."""
        try:
            return str(folder.relative_to(Path(self.abspath).parent)), True
        except ValueError:
            return str(folder), False

    def checked_model(self, rec: dict[str, Any]) -> str:
        """The recorded model folder, checked against its fingerprint when the file has one (tuned models)."""
        folder = self.model_path(rec)
        if rec.get("fingerprint"):
            if not folder.is_dir():
                raise ConfigError(f"{self.store.path!r} was embedded with the tuned model {str(folder)!r}, which "
                                  "is missing; restore that folder (it travels with the file) or rebuild the file")
            if model_fingerprint(folder, cache_dir()) != rec["fingerprint"]:
                raise EmbedderMismatch(f"the tuned model {str(folder)!r} has changed since {self.store.path!r} "
                                       "was embedded with it")
        return str(folder)

    # ------------------------------------------------------------------ switching
    def switch(self, emb: Any, record: dict[str, Any]) -> None:
        """Embed with ``emb`` from now on (the file now records ``record``)."""
        self.embedder = emb
        self.record = record
        self.store.expected_embedder = record["name"]

    def follow(self) -> bool:
        """Check the file's record against ours; when another process re-embedded the file, switch to its
        embedder (or raise when this connection was given an explicit one). True when it switched."""
        rec = self.store.get_meta("embedder")
        if rec == self.record:
            return False
        if self.pinned:
            raise EmbedderMismatch(f"{self.store.path!r} was re-embedded with {rec.get('name')!r} by another "
                                   f"process; reconnect (this connection embeds with {self.embedder.name!r})")
        emb, _ = self._open(None)
        self.switch(emb, rec)
        return True

    # ------------------------------------------------------------------ embedding
    def embed(self, texts: list[str], embedder: Any = None) -> np.ndarray:
        """Validated unit vectors ``(n, dim)`` of ``texts`` from ``embedder`` (default: the file's)."""
        emb = self.embedder if embedder is None else embedder
        v = emb.embed(texts)
        if getattr(emb, "checks_output", False) and getattr(v, "shape", None) == (len(texts), self.dim):
            return v
        return normalize(as_matrix(v, self.dim, what=f"embedder {emb.name!r} output"))

    def embed_batches(self, texts: list[str], progress: Progress = None, batch: int = 256,
                      embedder: Any = None) -> np.ndarray:
        """:meth:`embed` in batches of ``batch`` texts, reporting ``progress(done, total)``; ``(n, dim)``."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(texts), batch):
            out[s:s + batch] = self.embed(texts[s:s + batch], embedder)
            if progress:
                progress(min(s + batch, len(texts)), len(texts))
        return out
