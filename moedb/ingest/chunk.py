"""Reading files into passages.

``.txt`` and ``.md`` files are split by the embedder's tokens (:mod:`.passages`: paragraphs, sentences,
markdown headings as titles, overlap), or, given ``chunk_size``, paragraph-aware into passages of at most
``chunk_size`` characters (paragraphs are packed together; an overlong paragraph is
split at sentence ends, then hard-split; a passage over the embedder's limit is then cut by tokens).
``.jsonl`` files give one document per line
(``text`` field required, optional ``id`` and ``metadata``); a line whose text is over the embedder's limit
(``Sizes.max_tokens``) would be cut short when embedded, so it becomes parts cut by tokens like a ``.txt``
file's text: ids ``ID#1``, ``ID#2``... (a line without an id: ``FILE#LINE#1``...) and metadata ``part_of`` (the line's id, or ``None``), ``part`` and
``parts``. Which files are read, and how safely, is :mod:`.files`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from ..errors import FileProblem, InvalidInput
from .files import collect, read_text
from .passages import Chunk, Sizes, split_passages, within_limit

_SENT_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class Passage:
    text: str
    source: str
    position: int
    id: Optional[str] = None
    metadata: dict[str, Any] = field(default_factory=dict)


def split_text(text: str, chunk_size: int = 1000) -> list[str]:
    """Split ``text`` into passages of at most ``chunk_size`` characters, on paragraph bounds first."""
    if chunk_size < 50:
        raise InvalidInput("chunk_size must be at least 50 characters")
    paras = [p.strip() for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if p.strip()]
    pieces: list[str] = []
    for p in paras:
        p = re.sub(r"[ \t]*\n[ \t]*", " ", p) if not p.lstrip().startswith(("```", "|", "-", "*")) else p
        if len(p) <= chunk_size:
            pieces.append(p)
            continue
        buf = ""
        for s in _SENT_END.split(p):
            while len(s) > chunk_size:  # a single huge "sentence": hard split on a space if possible
                cut = s.rfind(" ", 0, chunk_size)
                cut = cut if cut > chunk_size // 2 else chunk_size
                if buf:
                    pieces.append(buf)
                    buf = ""
                pieces.append(s[:cut].strip())
                s = s[cut:].strip()
            if buf and len(buf) + 1 + len(s) > chunk_size:
                pieces.append(buf)
                buf = s
            else:
                buf = f"{buf} {s}".strip()
        if buf:
            pieces.append(buf)
    # pack small consecutive paragraphs together
    out: list[str] = []
    for piece in pieces:
        if out and len(out[-1]) + 2 + len(piece) <= chunk_size:
            out[-1] = out[-1] + "\n\n" + piece
        else:
            out.append(piece)
    return [o for o in out if o.strip()]


def iter_files(paths: list[str]) -> list[str]:
    """The files to read of files and folders (:func:`.files.collect`; skipped files are left out)."""
    return collect(paths).files


def read_passages(path: str, chunk_size: Union[int, Sizes] = 1000) -> Iterator[Passage]:
    """Passages of one file (``chunk_size``: characters, or :class:`.passages.Sizes`); raises
    :class:`FileProblem` if it cannot be read or parsed."""
    content = read_text(path)  # (:class:`.files.NotText` for an empty or binary file)
    if path.lower().endswith(".jsonl"):
        for lineno, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FileProblem(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise FileProblem(f"{path}:{lineno}: each line needs a non-empty \"text\" field")
            md = obj.get("metadata") or {}
            if not isinstance(md, dict):
                raise FileProblem(f"{path}:{lineno}: \"metadata\" must be an object")
            doc_id = str(obj["id"]) if obj.get("id") is not None else None
            yield from _record(obj["text"], path, lineno - 1, doc_id, md, chunk_size)
    else:
        sizes = chunk_size if isinstance(chunk_size, Sizes) else Sizes(chunk_size=chunk_size)
        for i, piece in enumerate(_pieces(content, sizes, markdown=path.lower().endswith(".md"))):
            yield Passage(text=piece.text, source=path, position=i, metadata=piece.metadata())


def _pieces(text: str, sizes: Sizes, markdown: bool = False) -> list[Chunk]:
    """``text`` cut by tokens, or by ``sizes.chunk_size`` characters and then within the token limit."""
    if sizes.chunk_size is None:
        return split_passages(text, sizes, markdown=markdown)
    return [Chunk(t, 0, 0, 0) for t in within_limit(split_text(text, sizes.chunk_size), sizes)]


def _record(text: str, path: str, position: int, doc_id: Optional[str], md: dict[str, Any],
            sizes: Union[int, Sizes]) -> Iterator[Passage]:
    """One ``.jsonl`` line: one passage, or its parts when its text is over the embedder's limit."""
    s = sizes if isinstance(sizes, Sizes) else None
    if s is None or s.count is None or s.max_tokens is None or s.count([text])[0] <= s.max_tokens:
        yield Passage(text=text, source=path, position=position, id=doc_id, metadata=md)
        return
    parts = [c.text for c in _pieces(text, s)]
    base = doc_id if doc_id is not None else f"{path}#{position}"  # (the id a line without one gets)
    for k, part in enumerate(parts, 1):
        yield Passage(text=part, source=path, position=position, id=f"{base}#{k}",
                      metadata={**md, "part_of": doc_id, "part": k, "parts": len(parts)})
