"""Which files moedb reads, and reading them safely: the one place for file safety.

Only regular files inside the paths given are read. A folder is walked for ``.txt``, ``.md`` and
``.jsonl`` files (sorted) without following links to folders; a symbolic link to a file is followed only
when its target lies inside the root (the folder given, or the folder of a file given), so
``env.txt -> /proc/self/environ`` or ``users.md -> /etc/passwd`` is never read. FIFOs, devices, sockets
and anything under ``/proc``, ``/sys`` or ``/dev`` are refused. A file is read with ``O_NONBLOCK`` (a FIFO
swapped in after the check cannot hang the call) and only up to the size it had when opened. Empty files
and binary files (a NUL byte, or not UTF-8) are skipped.

A problem with a path given explicitly (empty or binary included) is a :class:`~moedb.errors.FileProblem`;
a file found in a folder that cannot be read is *skipped* and reported (:class:`Skipped`, and a :class:`~moedb.errors.SkippedFile`
warning from :func:`warn_skipped`).
"""
from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from ..errors import FileProblem, SkippedFile

SUFFIXES = (".txt", ".md", ".jsonl")
PSEUDO_ROOTS = ("/proc", "/sys", "/dev")   # files there are not documents (and /proc's say "size 0")


@dataclass(frozen=True)
class Skipped:
    """A file that was not read, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def to_dict(self) -> dict[str, str]:
        return {"file": self.path, "reason": self.reason}


@dataclass
class FileSet:
    """The files to read (sorted within each folder) and the ones skipped on the way."""

    files: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    explicit: set[str] = field(default_factory=set)   # files named as such (not found in a folder)


class NotText(FileProblem):
    """A file that holds no text to index (empty, or binary); the caller skips it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: cannot read it as text ({reason})")
        self.path, self.reason = path, reason


def _inside(path: str, root: str) -> bool:
    """Whether the resolved ``path`` is ``root`` or lies below it (both resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _pseudo(real: str) -> bool:
    return any(_inside(real, p) for p in PSEUDO_ROOTS)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _check_file(path: str, root: str) -> Optional[str]:
    """``None`` when ``path`` may be read (a regular file, or a link to one inside ``root``), else why not."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"cannot read ({e.strerror})"
    real = os.path.realpath(path)
    if stat.S_ISLNK(st.st_mode):
        if not _inside(real, root):
            return f"a symbolic link to {real}, outside {root}; not followed"
        try:
            st = os.stat(path)
        except OSError as e:
            return f"a broken symbolic link ({e.strerror})"
    elif not _inside(real, root):
        return f"outside {root}; not read"
    if _pseudo(real):
        return f"{real} is a system file, not a document"
    if not stat.S_ISREG(st.st_mode):
        return f"{_kind(st.st_mode)}, not a regular file"
    return None


def inside_folder(base: str, rel: str, what: str) -> str:
    """``rel`` joined to the folder ``base``; a :class:`FileProblem` naming ``what`` if ``rel`` is absolute
    or leads outside ``base`` (``../``, or a link that resolves outside it)."""
    if os.path.isabs(rel):
        raise FileProblem(f"{what}: {rel!r} is an absolute path; give a path inside {base}")
    joined = os.path.normpath(os.path.join(base, rel))
    if not _inside(os.path.realpath(joined), os.path.realpath(base)):
        raise FileProblem(f"{what}: {rel!r} leads outside {base}; give a path inside it")
    return joined


def collect(paths: Iterable[Any], root: Optional[str] = None) -> FileSet:
    """The files to read of ``paths`` (files or folders) and the ones skipped inside folders.

    ``root``: the folder every file must resolve inside (default: each folder given, or the folder of
    each file given). A path given explicitly that cannot be read is a :class:`FileProblem`.
    """
    out = FileSet()
    for p in paths:
        p = os.fspath(p)
        if not os.path.lexists(p):
            raise FileProblem(f"{p}: no such file or directory")
        if os.path.isdir(p):
            top = os.path.realpath(root if root is not None else p)
            if not _inside(os.path.realpath(p), top):
                raise FileProblem(f"{p}: a folder outside {top}; not read")
            before = len(out.skipped)
            found = _walk(p, top, out.skipped)
            if not found and len(out.skipped) == before:
                raise FileProblem(f"{p}: directory has no .txt, .md or .jsonl files")
            out.files += found
            continue
        top = os.path.realpath(root if root is not None else (os.path.dirname(p) or "."))
        why = _check_file(p, top)
        if why is not None:
            raise FileProblem(f"{p}: {why}")
        if not p.lower().endswith(SUFFIXES):
            raise FileProblem(f"{p}: unsupported file type (use .txt, .md or .jsonl)")
        out.files.append(p)
        out.explicit.add(p)
    return out


def _walk(folder: str, root: str, skipped: list[Skipped]) -> list[str]:
    """Readable files below ``folder`` with a supported suffix, sorted; the others with that suffix and
    links to folders go to ``skipped``."""
    found = []
    for here, dirs, names in os.walk(folder):
        dirs.sort()
        for d in list(dirs):
            if os.path.islink(os.path.join(here, d)):
                dirs.remove(d)
                skipped.append(Skipped(os.path.join(here, d), "a symbolic link to a folder; not followed"))
        for n in sorted(names):
            if not n.lower().endswith(SUFFIXES):
                continue
            f = os.path.join(here, n)
            why = _check_file(f, root)
            if why is None:
                found.append(f)
            else:
                skipped.append(Skipped(f, why))
    return found


def read_text(path: str) -> str:
    """The UTF-8 text of a file that :func:`collect` returned. :class:`NotText` when it is empty or binary;
    :class:`FileProblem` when it cannot be read or is no longer a regular file."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise FileProblem(f"{path}: cannot read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileProblem(f"{path}: {_kind(st.st_mode)}, not a regular file")
        chunks, left = [], st.st_size
        while left > 0:
            b = os.read(fd, min(left, 1 << 24))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
    except OSError as e:
        raise FileProblem(f"{path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if not data.strip():
        raise NotText(path, "empty file")
    if b"\x00" in data:
        raise NotText(path, "binary file (NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotText(path, f"not UTF-8 text (byte {e.start}); binary or another encoding") from None


def warn_skipped(skipped: Iterable[Skipped]) -> None:
    """One :class:`~moedb.errors.SkippedFile` warning per skipped file (the CLI prints them)."""
    for s in skipped:
        warnings.warn(SkippedFile(s.path, s.reason), stacklevel=3)
