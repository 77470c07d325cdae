"""Passages sized for the embedder: text split by the embedder's own token count.

A passage never holds more than ``chunk_tokens`` tokens as the embedder counts them (``count``: texts ->
tokens of each, special tokens included; :meth:`moedb.embed.OnnxMiniLMEmbedder.count_tokens`), so nothing
is cut off when it is embedded. The text is cut where it reads best:

1. blocks: paragraphs (blank lines), and in markdown also headings and fenced code blocks (kept whole
   when they fit, blank lines inside included);
2. a block over the limit is cut at sentence ends, then line ends, then spaces, and a single word over the
   limit is cut where the limit falls; the pieces are packed back together as long as they fit;
3. a paragraph is a passage of its own (one topic, one passage): only a passage under
   ``chunk_tokens // 8`` tokens (a heading, a one-line lead-in) takes in the paragraphs after it, and a
   short last paragraph of a section joins the passage before it. Passages never cross a markdown heading;
   a heading with nothing under it before the next heading joins the section that follows.

A passage that continues a paragraph cut in two starts with up to ``overlap`` tokens of the passage before
it, from a sentence start (else a word start); pieces of a cut paragraph leave room for it. Passages do not
overlap across paragraphs. Every passage is a slice of the text (``\\r\\n`` read as ``\\n``): without
overlap the passages, in order, are the text up to the whitespace between them.

In markdown, the heading path (``"Install > Linux"``) is the passage's ``title`` (stored as
``metadata.title``, which the full-text index searches too).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..errors import InvalidInput

Count = Callable[[list[str]], list[int]]   # texts (n,) -> tokens of each (n,), special tokens included

DEFAULT_TOKENS = 256   # chunk_tokens when not given (capped by the embedder's limit)
DEFAULT_OVERLAP = 32   # overlap when not given (at most chunk_tokens // 8)
MIN_TOKENS = 16        # the smallest chunk_tokens
SHORT_SHARE = 8        # a passage under chunk_tokens // SHORT_SHARE tokens takes in the next paragraph
OVERLAP_CHARS = 16     # the overlap is looked for in the last overlap * 16 characters of a passage

_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r" {0,3}(=+|-{2,})[ \t]*$")
_LISTY = re.compile(r"\s*(?:[-*+>|]|\d+[.)])(?:\s|$)")
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s)"
                           r"|[\u3002\uff01\uff1f]+[\"'\u201d\u2019\u300d\u300f)\]]*")
_NEWLINE = re.compile(r"\n")
_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Sizes:
    """How a file becomes passages; make one with :func:`sizes_for`.

    ``count``: the embedder's token counter; ``chunk_tokens``: most tokens per passage; ``overlap``: tokens
    a passage that continues a cut paragraph repeats; ``chunk_size``: characters per passage instead (the
    character splitter of :func:`moedb.ingest.chunk.split_text`), passages over ``max_tokens`` (the
    embedder's limit, when known) then cut again by tokens.
    """

    count: Optional[Count] = None
    chunk_tokens: int = DEFAULT_TOKENS
    overlap: int = DEFAULT_OVERLAP
    chunk_size: Optional[int] = None
    max_tokens: Optional[int] = None


def _whole(value: Any, name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an integer, got {value!r}")
    return int(value)


def sizes_for(count: Optional[Count], max_tokens: Optional[int] = None, *, chunk_size: Optional[int] = None,
              chunk_tokens: Optional[int] = None, overlap: Optional[int] = None) -> Sizes:
    """Checked :class:`Sizes` for an embedder that counts with ``count`` and embeds at most ``max_tokens``
    tokens (``None``: no known limit).

    By tokens unless ``chunk_size`` (characters) is given: ``chunk_tokens`` defaults to
    ``min(256, max_tokens)`` and may not exceed ``max_tokens``; ``overlap`` defaults to
    ``min(32, chunk_tokens // 8)`` and may be at most half of ``chunk_tokens``. :class:`InvalidInput`
    names the field at fault.
    """
    chunk_size, chunk_tokens, overlap = (_whole(chunk_size, "chunk_size"), _whole(chunk_tokens, "chunk_tokens"),
                                         _whole(overlap, "overlap"))
    limit = _whole(max_tokens, "max_tokens")
    if chunk_size is not None:
        if chunk_tokens is not None or overlap is not None:
            raise InvalidInput("chunk_size: give chunk_size (characters) or chunk_tokens/overlap (the embedder's "
                               "tokens), not both")
        if chunk_size < 50:
            raise InvalidInput(f"chunk_size must be at least 50 characters, got {chunk_size}")
        return Sizes(count=count, chunk_size=chunk_size, overlap=0, max_tokens=limit)
    if count is None:
        raise InvalidInput("chunk_tokens: this embedder cannot count tokens; give chunk_size (characters)")
    if chunk_tokens is None:
        chunk_tokens = DEFAULT_TOKENS if limit is None else min(DEFAULT_TOKENS, limit)
    if chunk_tokens < MIN_TOKENS or (limit is not None and chunk_tokens > limit):
        bound = f"between {MIN_TOKENS} and {limit} (the embedder's limit)" if limit else f"at least {MIN_TOKENS}"
        raise InvalidInput(f"chunk_tokens must be {bound}, got {chunk_tokens}")
    if overlap is None:
        overlap = min(DEFAULT_OVERLAP, chunk_tokens // 8)
    if not 0 <= overlap <= chunk_tokens // 2:
        raise InvalidInput(f"overlap must be between 0 and {chunk_tokens // 2} (half of chunk_tokens), got {overlap}")
    return Sizes(count=count, chunk_tokens=chunk_tokens, overlap=overlap, max_tokens=limit)


@dataclass(frozen=True)
class Chunk:
    """One passage: ``text`` (the slice ``start:end`` of the text), its ``title`` (heading path or None)
    and ``body`` (where the text after the overlap starts; ``start`` when there is none)."""

    text: str
    start: int
    end: int
    body: int
    title: Optional[str] = None

    def metadata(self) -> dict[str, Any]:
        return {} if self.title is None else {"title": self.title}


@dataclass
class _Block:
    start: int
    end: int
    kind: str            # heading | code | lines | prose
    level: int = 0       # of a heading
    heading: str = ""    # the heading's text


@dataclass
class _Unit:
    start: int
    end: int
    n: int               # its tokens
    cont: bool = False   # continues a paragraph cut before it: gets the overlap, leaves room for it
    heading: bool = False  # ends with a heading: takes in what follows


Span = tuple[int, int, int]   # (start, end, tokens)


# ---------------------------------------------------------------------- blocks and sections
def _trim(text: str, a: int, z: int) -> tuple[int, int]:
    while a < z and text[a].isspace():
        a += 1
    while z > a and text[z - 1].isspace():
        z -= 1
    return a, z


def _blocks(text: str, markdown: bool) -> list[_Block]:
    """Paragraphs (and in markdown headings and fenced code) of ``text``, in order, trimmed."""
    out: list[_Block] = []
    start: Optional[int] = None   # of the open paragraph
    lines = 0
    fence: Optional[str] = None   # the open code fence
    pos = 0

    def close(end: int, kind: str = "prose", level: int = 0, heading: str = "") -> None:
        nonlocal start, lines
        if start is not None:
            a, z = _trim(text, start, end)
            if a < z:
                if kind == "prose":
                    rows = text[a:z].split("\n")
                    if len(rows) > 1 and 2 * sum(bool(_LISTY.match(r)) for r in rows) >= len(rows):
                        kind = "lines"
                out.append(_Block(a, z, kind, level, heading))
        start, lines = None, 0

    for line in text.split("\n"):
        end = pos + len(line)
        if fence is not None:
            if re.match(r" {0,3}" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$", line):
                close(end, "code")
                fence = None
        elif markdown and _FENCE.match(line):
            close(pos)
            fence = _FENCE.match(line).group(1)
            start = pos
        elif not line.strip():
            close(pos)
        elif markdown and _ATX.match(line):
            close(pos)
            m = _ATX.match(line)
            start = pos
            close(end, "heading", len(m.group(1)), (m.group(2) or "").strip())
        elif markdown and lines == 1 and start is not None and _SETEXT.match(line) \
                and not _LISTY.match(text[start:pos]):
            heading = text[start:pos].strip()
            close(end, "heading", 1 if line.strip()[0] == "=" else 2, heading)
        else:
            if start is None:
                start = pos
            lines += 1
        pos = end + 1
    close(len(text), "code" if fence is not None else "prose")
    return out


def _sections(blocks: list[_Block]) -> list[tuple[Optional[str], list[_Block]]]:
    """``(heading path or None, blocks)`` per section; headings with nothing under them join the next."""
    out: list[tuple[Optional[str], list[_Block]]] = []
    path: list[str] = []
    title: Optional[str] = None
    current: list[_Block] = []
    for b in blocks:
        if b.kind == "heading":
            if any(x.kind != "heading" for x in current):
                out.append((title, current))
                current = []
            path = (path + [""] * b.level)[:b.level - 1] + [b.heading]
            title = " > ".join(p for p in path if p) or None
        current.append(b)
    if current:
        out.append((title, current))
    return out


# ---------------------------------------------------------------------- cutting and packing
class _Cutter:
    """Cuts spans of one text into pieces of at most a budget of tokens, counting with ``count``.

    Spans are ``(start, end, tokens)``. Joined spans are planned by adding up their counts (exact for
    tokenizers that split at whitespace, as WordPiece does: each text has ``special`` tokens more) and then
    counted; when a count does not add up, candidates are counted one by one.
    """

    LEVELS = {"prose": ("sentence", "line", "word"), "lines": ("line", "sentence", "word"),
              "code": ("line", "sentence", "word"), "heading": ("sentence", "word")}

    def __init__(self, text: str, count: Count):
        self.text = text
        self.count = count
        self.special = int(count([""])[0])   # tokens every text has ([CLS] and [SEP])

    def n(self, a: int, z: int) -> int:
        return int(self.count([self.text[a:z]])[0])

    def counted(self, spans: Sequence[tuple[int, int]]) -> list[Span]:
        ns = self.count([self.text[a:z] for a, z in spans]) if spans else []
        return [(a, z, int(n)) for (a, z), n in zip(spans, ns)]

    def segments(self, a: int, z: int, level: str) -> list[tuple[int, int]]:
        """The sentences, lines or words of ``a:z``, trimmed, in order."""
        if level == "word":
            return [m.span() for m in _WORD.finditer(self.text, a, z)]
        pattern = _SENTENCE_END if level == "sentence" else _NEWLINE
        cuts = [m.end() for m in pattern.finditer(self.text, a, z)]
        out, s = [], a
        for c in cuts + [z]:
            x, y = _trim(self.text, s, c)
            if x < y:
                out.append((x, y))
            s = c
        return out

    def cut(self, a: int, z: int, levels: Sequence[str], budget: int) -> list[Span]:
        """``a:z`` (over ``budget``) as pieces of at most ``budget`` tokens, cut at the first of ``levels``
        that applies (a word over the budget is cut where the budget falls)."""
        if not levels:
            return self.hard(a, z, budget)
        spans = self.segments(a, z, levels[0])
        if len(spans) <= 1:
            return self.cut(a, z, levels[1:], budget)
        parts: list[Span] = []
        for s, e, n in self.counted(spans):
            parts += [(s, e, n)] if n <= budget else self.cut(s, e, levels[1:], budget)
        return self.pack(parts, budget)

    def longest(self, fits: Callable[[int], bool], lo: int, last: int) -> int:
        """The largest ``j`` in ``lo..last`` with ``fits(j)``, given ``fits(lo)`` (galloping, then bisecting)."""
        step, hi = 1, None
        while lo < last:
            j = min(lo + step, last)
            if fits(j):
                lo, step = j, step * 2
            else:
                hi = j
                break
        while hi is not None and hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def pack(self, parts: list[Span], budget: int) -> list[Span]:
        """Consecutive pieces (each within ``budget``) joined greedily while they fit."""
        plan, i = [], 0
        while i < len(parts):
            total, j = parts[i][2], i
            while j + 1 < len(parts) and total + parts[j + 1][2] - self.special <= budget:
                j += 1
                total += parts[j][2] - self.special
            plan.append((i, j))
            i = j + 1
        joined = self.counted([(parts[i][0], parts[j][1]) for i, j in plan])
        if all(n <= budget for _, _, n in joined):
            return joined
        out, i = [], 0
        while i < len(parts):
            start = parts[i][0]
            j = self.longest(lambda k: self.n(start, parts[k][1]) <= budget, i, len(parts) - 1)
            out.append((start, parts[j][1], self.n(start, parts[j][1])))
            i = j + 1
        return out

    def hard(self, a: int, z: int, budget: int) -> list[Span]:
        """A word cut into pieces of at most ``budget`` tokens (at least one character each)."""
        out = []
        while a < z:
            start = a
            end = start + self.longest(lambda k: self.n(start, start + k) <= budget, 1, z - start)
            out.append((start, end, self.n(start, end)))
            a = end
        return out

    def overlap_start(self, a: int, z: int, overlap: int) -> int:
        """Where the last at most ``overlap`` tokens of ``a:z`` start: a sentence start, else a word start
        (``z``: none fit)."""
        w = max(a, z - OVERLAP_CHARS * overlap)   # the tail to look in (a cut inside it is no boundary)
        for level in ("sentence", "word"):
            spans = self.segments(w, z, level)[-(overlap + 1):]   # each holds a token at least
            spans = self.counted(spans[1:] if spans and w > a and spans[0][0] == w else spans)
            k, total = len(spans), self.special
            while k > 0 and total + spans[k - 1][2] - self.special <= overlap:  # the tail's count, added up
                k -= 1
                total += spans[k][2] - self.special
            while k < len(spans) and self.n(spans[k][0], z) > overlap:   # counted (counts need not add up)
                k += 1
            if k < len(spans):
                return spans[k][0]
        return z


def _units(cutter: _Cutter, blocks: list[_Block], counts: list[int], s: Sizes) -> list[_Unit]:
    """The blocks of one section as units within the budget (cut blocks leave room for the overlap)."""
    units: list[_Unit] = []
    for b, n in zip(blocks, counts):
        if n <= s.chunk_tokens:
            units.append(_Unit(b.start, b.end, n, heading=b.kind == "heading"))
        else:
            pieces = cutter.cut(b.start, b.end, _Cutter.LEVELS[b.kind], s.chunk_tokens - s.overlap)
            units += [_Unit(x, y, m, cont=i > 0) for i, (x, y, m) in enumerate(pieces)]
    return units


def _join_short(cutter: _Cutter, units: list[_Unit], s: Sizes) -> list[_Unit]:
    """A unit under ``chunk_tokens // 8`` tokens, or ending with a heading, takes in the next paragraph while
    they fit; a short last unit joins the one before it."""
    short = s.chunk_tokens // SHORT_SHARE

    def joined(a: _Unit, b: _Unit) -> Optional[_Unit]:
        room = s.chunk_tokens - (s.overlap if a.cont else 0)
        if a.n + b.n - cutter.special > room:   # (counted only when the added-up count fits)
            return None
        n = cutter.n(a.start, b.end)
        return _Unit(a.start, b.end, n, a.cont, b.heading) if n <= room else None

    out: list[_Unit] = []
    for u in units:
        both = joined(out[-1], u) if out and not u.cont and (out[-1].n < short or out[-1].heading) else None
        if both is not None:
            out[-1] = both
        else:
            out.append(u)
    if len(out) > 1 and out[-1].n < short:
        both = joined(out[-2], out[-1])
        if both is not None:
            out[-2:] = [both]
    return out


def split_passages(text: str, s: Sizes, markdown: bool = False) -> list[Chunk]:
    """The passages of ``text`` by tokens (``s.count``, at most ``s.chunk_tokens`` each, ``s.overlap`` for
    cut paragraphs); ``markdown``: headings, their path as ``title``, and fenced code blocks."""
    if s.count is None:
        raise InvalidInput("chunk_tokens: token chunking needs the embedder's token counter")
    text = text.replace("\r\n", "\n")
    cutter = _Cutter(text, s.count)
    blocks = _blocks(text, markdown)
    counts = list(s.count([text[b.start:b.end] for b in blocks])) if blocks else []
    out: list[Chunk] = []
    i = 0
    for title, section in _sections(blocks):
        units = _join_short(cutter, _units(cutter, section, counts[i:i + len(section)], s), s)
        i += len(section)
        starts = []   # of each passage: its body, or the overlap taken from the unit before it
        for k, u in enumerate(units):
            start = u.start
            if u.cont and k and s.overlap:
                prev = units[k - 1]
                start = cutter.overlap_start(prev.start, prev.end, s.overlap)
                start = start if start < prev.end else u.start
            starts.append(start)
        with_overlap = [k for k, u in enumerate(units) if starts[k] < u.start]
        ns = s.count([text[starts[k]:units[k].end] for k in with_overlap]) if with_overlap else []
        for k, n in zip(with_overlap, ns):
            u, start = units[k], starts[k]
            while start < u.start and n > s.chunk_tokens:  # counts need not add up: a shorter overlap
                nxt = _SPACE.search(text, start, u.start)
                start = _trim(text, nxt.end(), u.start)[0] if nxt else u.start
                n = cutter.n(start, u.end)
            starts[k] = start
        out += [Chunk(text[a:u.end], a, u.end, u.start, title) for a, u in zip(starts, units)]
    return out


def within_limit(pieces: list[str], s: Sizes) -> list[str]:
    """``pieces`` (of the character splitter) with each one over ``s.max_tokens`` cut by tokens
    (unchanged when the embedder's limit or counter is unknown)."""
    if s.count is None or s.max_tokens is None or not pieces:
        return pieces
    out: list[str] = []
    for piece, n in zip(pieces, s.count(pieces)):
        if n <= s.max_tokens:
            out.append(piece)
            continue
        cutter = _Cutter(piece, s.count)
        a, z = _trim(piece, 0, len(piece))
        out += [piece[x:y] for x, y, _ in cutter.cut(a, z, _Cutter.LEVELS["prose"], s.max_tokens)]
    return out
