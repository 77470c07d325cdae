"""Reading files into passages.

``.txt`` and ``.md`` files are split paragraph-aware into passages of at most
``chunk_size`` characters (paragraphs are packed together; an overlong paragraph is
split at sentence ends, then hard-split). ``.jsonl`` files give one document per line
(``text`` field required, optional ``id`` and ``metadata``). A directory is walked
recursively for those suffixes, in sorted order.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from ..errors import FileProblem, InvalidInput

SUFFIXES = (".txt", ".md", ".jsonl")
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
    """Expand files and directories into the sorted list of readable files."""
    files: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = []
            for root, dirs, names in os.walk(p):
                dirs.sort()
                found += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(SUFFIXES)]
            if not found:
                raise FileProblem(f"{p}: directory has no .txt, .md or .jsonl files")
            files += found
        elif os.path.exists(p):
            if not p.lower().endswith(SUFFIXES):
                raise FileProblem(f"{p}: unsupported file type (use .txt, .md or .jsonl)")
            files.append(p)
        else:
            raise FileProblem(f"{p}: no such file or directory")
    return files


def read_passages(path: str, chunk_size: int = 1000) -> Iterator[Passage]:
    """Passages of one file; raises :class:`FileProblem` if it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FileProblem(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
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
            yield Passage(text=obj["text"], source=path, position=lineno - 1,
                          id=str(obj["id"]) if obj.get("id") is not None else None, metadata=md)
    else:
        for i, piece in enumerate(split_text(content, chunk_size)):
            yield Passage(text=piece, source=path, position=i)
