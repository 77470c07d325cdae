"""Experts and their documents: create, change, remove, add and list, each write one transaction.

Arguments are checked before the first write; documents are embedded before the transaction opens
(with the file's current embedder), so a failure leaves the file as it was.
"""
from __future__ import annotations

import copy
import hashlib
import os
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..errors import InvalidInput, UnknownExpert
from ..generate import validate_config
from ..ingest.chunk import Passage, read_passages
from ..ingest.files import NotText, Skipped, collect, warn_skipped
from ..ingest.passages import Sizes, sizes_for
from ..store import Store
from ..text import is_unicode
from ..types import Expert
from ..vectors import as_matrix, normalize
from .catalog import Catalog, own_centroid
from .embedding import FileEmbedder

Document = Union[str, dict, Passage]
Progress = Optional[Callable[[int, int], None]]


def check_name(name: Any, what: str = "expert name") -> str:
    """``name`` if it is a usable expert name; :class:`InvalidInput` naming ``what`` otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(f"{what} must be a non-empty string")
    if name != name.strip() or any(ord(c) < 32 for c in name):
        raise InvalidInput(f"{what} {name!r} has leading/trailing spaces or control characters")
    if not is_unicode(name):
        raise InvalidInput(f"{what} {name!r} is not valid Unicode (a lone surrogate)")
    return name


def check_refuse(refuse: Any, parent: Optional[str]) -> bool:
    """The refusal role as bool; a refusal expert has no parent."""
    if not isinstance(refuse, (bool, np.bool_)):
        raise InvalidInput(f"refuse must be True or False, got {refuse!r}")
    if refuse and parent is not None:
        raise InvalidInput("a refusal expert cannot have a parent (it is not part of the tree)")
    return bool(refuse)


def check_metadata(metadata: Any, what: str = "metadata") -> dict:
    """``metadata`` if the file can store it as JSON and give it back equal: a dict with string keys whose
    values are JSON types (str, finite numbers, bool, None, lists, dicts), UTF-8 encodable, not nested
    deeper than 32 levels. :class:`InvalidInput` naming ``what`` (and the offending key) otherwise."""
    def walk(v: Any, where: str, depth: int) -> None:
        if depth > 32:
            raise InvalidInput(f"{what}: nested deeper than 32 levels at {where}")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise InvalidInput(f"{what}: key {k!r} at {where} is not a string")
                walk(k, where, depth + 1)
                walk(x, f"{where}.{k}", depth + 1)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{where}[{i}]", depth + 1)
        elif isinstance(v, str):
            if not is_unicode(v):
                raise InvalidInput(f"{what}: {where} holds text that is not valid Unicode (a lone surrogate)")
        elif isinstance(v, float) and not np.isfinite(v):
            raise InvalidInput(f"{what}: {where} is {v!r}; JSON has no NaN or infinity")
        elif v is not None and not isinstance(v, (bool, int, float)):
            raise InvalidInput(f"{what}: {where} is a {type(v).__name__}, which JSON cannot store "
                               "(use a string, number, bool, null, list or mapping)")

    if not isinstance(metadata, dict):
        raise InvalidInput(f"{what} must be a dict (a JSON object), got {type(metadata).__name__}")
    walk(metadata, what, 0)
    return metadata


def check_document_fields(i: int, did: Any, source: Any, position: Any) -> None:
    """A document's ``id`` (a string or an integer), ``source`` (a string) and ``position`` (an integer), each
    optional; :class:`InvalidInput` naming the document and the field otherwise."""
    for field_, value, kinds, want in (("id", did, (str, int, np.integer), "a string or an integer"),
                                       ("source", source, (str,), "a string"),
                                       ("position", position, (int, np.integer), "an integer")):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise InvalidInput(f"document #{i}: {field_} must be {want}, got {type(value).__name__}")
        if isinstance(value, str) and not is_unicode(value):
            raise InvalidInput(f"document #{i}: {field_} is not valid Unicode (a lone surrogate)")
        if field_ == "position" and not -2**63 <= int(value) < 2**63:
            raise InvalidInput(f"document #{i}: position {value} is out of range")


def check_generator(generator: Any) -> dict:
    """A validated generator configuration (``ConfigError`` naming the bad field)."""
    return validate_config(generator)


def read_files(paths: Any, chunk_size: Union[int, Sizes],
               root: Optional[str] = None) -> tuple[list[Passage], list[Skipped]]:
    """``(passages, skipped files)`` of files or folders (one path or a list); which files may be read is
    :func:`moedb.ingest.files.collect` (``root``: the folder every file must resolve inside)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found = collect(list(paths), root)
    passages, skipped = [], list(found.skipped)
    for f in found.files:
        try:
            passages += read_passages(f, chunk_size)
        except NotText as e:
            if f in found.explicit:
                raise  # (a file named as such must be readable; one found in a folder is skipped)
            skipped.append(Skipped(e.path, e.reason))
    return passages, skipped


def passages_of(paths: Any, chunk_size: Union[int, Sizes]) -> list[Passage]:
    """The passages of files or folders (one path or a list); each skipped file is a
    :class:`~moedb.errors.SkippedFile` warning; an error naming them when no passage is left."""
    passages, skipped = read_files(paths, chunk_size)
    if not passages:
        given = ", ".join(map(str, [paths] if isinstance(paths, (str, os.PathLike)) else paths))
        raise InvalidInput(f"no passages found in {given}" + (
            " (skipped: " + "; ".join(map(str, skipped)) + ")" if skipped else ""))
    warn_skipped(skipped)
    return passages


def to_expert(row: dict[str, Any]) -> Expert:
    """The public :class:`Expert` of a catalog row (metadata and generator are copies)."""
    return Expert(name=row["name"], description=row["description"], keywords=list(row["keywords"]),
                  parent=row["parent"], size=row["size"], metadata=copy.deepcopy(row["metadata"]),
                  generator=copy.deepcopy(row["generator"]), created_at=row["created_at"],
                  updated_at=row["updated_at"], centroid=row.get("centroid"), refuse=bool(row.get("refuse")))


class ExpertEditor:
    """The experts of one file and their documents."""

    def __init__(self, store: Store, catalog: Catalog, embedding: FileEmbedder):
        self.store = store
        self.catalog = catalog
        self.embedding = embedding

    def experts(self) -> list[Expert]:
        """All experts, in creation order."""
        self.catalog.refresh()
        return [to_expert(r) for r in self.catalog.rows]

    def expert(self, name: str) -> Expert:
        """One expert by name; raises :class:`UnknownExpert`."""
        return to_expert(self.catalog.require(name))

    def check_parent(self, parent: Optional[str], child: Optional[str] = None) -> Optional[int]:
        """The id of ``parent`` if it can be the parent (of ``child``: no cycle); ``None`` for no parent."""
        if parent is None:
            return None
        check_name(parent, "parent name")
        self.catalog.refresh()
        if parent not in self.catalog.by_name:
            raise UnknownExpert(parent, role="parent expert")
        if self.catalog.by_name[parent].get("refuse"):
            raise InvalidInput(f"{parent!r} is a refusal expert and cannot be a parent")
        if child is not None:
            node: Optional[str] = parent
            while node is not None:
                if node == child:
                    raise InvalidInput(f"setting {parent!r} as parent of {child!r} would create a cycle")
                node = self.catalog.by_name[node]["parent"]
        return self.catalog.by_name[parent]["id"]

    def add_expert(self, name: str, documents: Optional[Sequence[Document]] = None, *, description: str = "",
                   keywords: Optional[Sequence[str]] = None, parent: Optional[str] = None,
                   metadata: Optional[dict] = None, vectors: Optional[np.ndarray] = None,
                   generator: Optional[dict] = None, progress: Progress = None, refuse: bool = False,
                   files: Optional[Sequence[str]] = None, chunk_size: Optional[int] = None,
                   chunk_tokens: Optional[int] = None, overlap: Optional[int] = None) -> Expert:
        """Create an expert, optionally with documents, in one transaction.

        ``files``: files or folders (.txt/.md split into passages of at most ``chunk_tokens`` of the
        embedder's tokens with ``overlap``, or of ``chunk_size`` characters: :meth:`sizes`; .jsonl one
        document per line) whose passages join ``documents``.

        ``refuse=True`` makes a *refusal expert*: its documents are examples of queries that none of the
        experts should answer. It joins the gate as one more class but is never selected; a route whose
        best match it is abstains (``r.refused_by``), and it sharpens the scope rule for everything else.
        """
        check_name(name)
        refuse = check_refuse(refuse, parent)
        kw = [str(k) for k in (keywords or [])]
        if metadata is not None:
            check_metadata(metadata)
        gen = check_generator(generator) if generator is not None else None
        parent_id = self.check_parent(parent)
        if files:
            documents = list(documents or []) + passages_of(files, self.sizes(chunk_size, chunk_tokens, overlap))
        self.catalog.refresh()  # embed with the file's current embedder (another process may have tuned it)
        prepared = self.prepare(documents or None, vectors, progress) if documents or vectors is not None else None
        with self.store.atomic():
            eid = self.store.experts.insert(name, description or "", kw, parent_id, metadata or {}, gen, refuse)
            if prepared:
                self.store.documents.insert(eid, *prepared)
            # the new row alone (the next call refreshes the rest): adding thousands of experts stays linear
            row = self.store.experts.row(name)
        self.catalog.touch()
        row["centroid"] = own_centroid(row)
        return to_expert(row)

    def update_expert(self, name: str, *, description: Optional[str] = None, keywords: Optional[Sequence[str]] = None,
                      parent: Any = ..., metadata: Optional[dict] = None, refuse: Optional[bool] = None) -> Expert:
        """Change an expert's description, keywords, parent (``None`` detaches), metadata or refusal role."""
        row = self.catalog.require(name)
        fields: dict[str, Any] = {}
        if refuse is not None or parent is not ...:  # the role and the parent as they will be
            will_refuse = check_refuse(row["refuse"] if refuse is None else refuse,
                                        row["parent"] if parent is ... else parent)
        if refuse is not None:
            fields["refuse"] = int(will_refuse)
            if will_refuse and self.store.experts.children(row["id"]):
                raise InvalidInput(f"{name!r} has children: a refusal expert cannot be a parent")
        if description is not None:
            fields["description"] = description
        if keywords is not None:
            fields["keywords"] = [str(k) for k in keywords]
        if metadata is not None:
            fields["metadata"] = check_metadata(metadata)
        if parent is not ...:
            fields["parent_id"] = self.check_parent(parent, child=name)
        self.store.experts.update(row["id"], **fields)
        self.catalog.touch()
        return self.expert(name)

    def remove_expert(self, name: str) -> None:
        """Delete an expert and its documents; its children become roots."""
        row = self.catalog.require(name)
        self.store.experts.delete(row["id"])
        self.catalog.touch()

    def prepare(self, documents: Sequence[Document], vectors: Optional[np.ndarray], progress: Progress,
                 batch: int = 256) -> tuple[list[tuple], np.ndarray]:
        """Normalise documents to rows and compute/validate their vectors (before any write).

        With ``vectors`` ``(n, d)`` the documents may be ``None`` (or dicts without ``text``): such documents
        have no text (stored as ``""``: routing uses their vectors, retrieval returns their id and metadata);
        their id is the given one, else a hash of the vector.
        """
        V = as_matrix(vectors, self.embedding.dim, what="vectors") if vectors is not None else None
        if documents is None and V is not None:
            documents = [{} for _ in range(len(V))]
        if documents is None:
            raise InvalidInput("documents: give documents (texts or dicts with 'text'), or vectors= for documents "
                               "without text")
        if isinstance(documents, (str, dict, Passage)):
            documents = [documents]
        elif not isinstance(documents, (list, tuple)):
            try:
                documents = list(documents)
            except TypeError:
                raise InvalidInput(f"documents must be a list of texts or dicts with 'text', got "
                                   f"{type(documents).__name__}") from None
        rows = []
        for i, d in enumerate(documents):
            if isinstance(d, Passage):
                text, did, md, src, pos = d.text, d.id, d.metadata, d.source, d.position
            elif isinstance(d, str):
                text, did, md, src, pos = d, None, {}, None, None
            elif isinstance(d, dict):
                text, did = d.get("text"), d.get("id")
                md, src, pos = d.get("metadata") or {}, d.get("source"), d.get("position")
            else:
                raise InvalidInput(f"document #{i}: expected str or dict with 'text', got {type(d).__name__}")
            check_metadata(md, f"document #{i}: metadata")
            check_document_fields(i, did, src, pos)
            if text is None and V is not None:
                text = ""  # a document known by its vector only
                if did is None:
                    did = hashlib.sha1(V[i].tobytes()).hexdigest()[:16] if i < len(V) else None
            elif not isinstance(text, str) or not text.strip():
                raise InvalidInput(f"document #{i}: empty text" + ("" if vectors is not None else
                                   " (documents without text need vectors=)"))
            if not is_unicode(text):
                raise InvalidInput(f"document #{i}: text is not valid Unicode (a lone surrogate)")
            if did is None:
                did = f"{src}#{pos}" if src is not None and pos is not None else \
                    hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
            rows.append((str(did), text, md, src, pos))
        ids = [r[0] for r in rows]
        if len(set(ids)) != len(ids):
            dup = next(x for x in ids if ids.count(x) > 1)
            raise InvalidInput(f"document id {dup!r} appears twice in this call")
        if V is not None:
            if V.shape[0] != len(rows):
                raise InvalidInput(f"{V.shape[0]} vectors given for {len(rows)} documents")
            return rows, normalize(V)
        return rows, self.embedding.embed_batches([r[1] for r in rows], progress, batch)

    def add_documents(self, name: str, documents: Optional[Sequence[Document]] = None,
                      vectors: Optional[np.ndarray] = None, *, on_conflict: str = "error",
                      progress: Progress = None) -> int:
        """Add documents to an expert in one transaction; returns how many were added (see :meth:`prepare`
        for documents given by their vectors only)."""
        if on_conflict not in ("error", "skip", "replace"):
            raise InvalidInput(f"on_conflict must be error, skip or replace, not {on_conflict!r}")
        row = self.catalog.require(name)
        prepared = self.prepare(documents, vectors, progress)
        n = self.store.documents.insert(row["id"], *prepared, on_conflict=on_conflict)
        self.catalog.touch()
        return n

    def add_files(self, name: str, paths: Sequence[str], *, chunk_size: Optional[int] = None,
                  chunk_tokens: Optional[int] = None, overlap: Optional[int] = None, on_conflict: str = "error",
                  progress: Progress = None) -> int:
        """Split files (or directories of .txt/.md/.jsonl) into passages (:meth:`sizes`) and add them in one
        transaction."""
        self.catalog.require(name)
        return self.add_documents(name, passages_of(paths, self.sizes(chunk_size, chunk_tokens, overlap)),
                                  on_conflict=on_conflict, progress=progress)

    def sizes(self, chunk_size: Optional[int] = None, chunk_tokens: Optional[int] = None,
              overlap: Optional[int] = None) -> Sizes:
        """How files become passages with the file's embedder: by its tokens (``chunk_tokens``, default
        ``min(256, its limit)``; ``overlap``, default 32), or by ``chunk_size`` characters when given
        (:func:`moedb.ingest.passages.sizes_for`)."""
        emb = self.embedding.embedder
        return sizes_for(emb.count_tokens, emb.max_tokens, chunk_size=chunk_size, chunk_tokens=chunk_tokens,
                         overlap=overlap)

    def remove_documents(self, name: str, ids: Sequence[str]) -> int:
        """Remove documents by id; returns how many were removed."""
        row = self.catalog.require(name)
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple, set, frozenset)):
            raise InvalidInput(f"ids must be a list of document ids, got {type(ids).__name__}")
        for j, x in enumerate(ids):
            check_document_fields(j, x, None, None)
        n = self.store.documents.delete(row["id"], [str(i) for i in ids])
        self.catalog.touch()
        return n

    def documents(self, name: str, limit: int = -1, offset: int = 0) -> list[dict[str, Any]]:
        """An expert's documents (id, text, metadata, source, position); ``limit`` -1 = all."""
        for arg, value in (("limit", limit), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (-1 if arg == "limit" else 0):
                raise InvalidInput(f"{arg} must be an integer >= {-1 if arg == 'limit' else 0}, got {value!r}")
        row = self.catalog.require(name)
        return [{k: v for k, v in d.items() if k != "rowid"} for d in self.store.documents.list(row["id"], limit, offset)]
