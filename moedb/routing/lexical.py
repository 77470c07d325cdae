"""Lexical signal: a keyword/BM25-style index of experts (pure Python + NumPy, plain arrays).

Each expert is treated as a bag of its documents: for a term ``t`` and expert ``e`` the weight is
``idf(t) * f / (f + sat)`` where ``f`` is the fraction of ``e``'s documents containing ``t``
(keywords count as ``f = 1``, the description as ``f = 0.5``) and ``idf`` is the BM25 idf over
experts. A query scores ``sum_t weight[t, e]`` over its distinct terms.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
STOPWORDS = frozenset("""a an and are as at be been but by can could did do does doing for from had has have
how i if in into is it its me my of on or our please so than that the their them then there these they
this to was we were what when where which who whom why will with would you your yours am i'm i'd can't
""".split())


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens without stopwords, with a light plural/verb-suffix strip."""
    out = []
    for tok in _TOKEN.findall(text.lower()):
        if tok in STOPWORDS or len(tok) < 2:
            continue
        if tok.endswith("'s"):
            tok = tok[:-2]
        if len(tok) > 4 and tok.endswith("ies"):
            tok = tok[:-3] + "y"
        elif len(tok) > 3 and tok.endswith("s") and not tok.endswith("ss"):
            tok = tok[:-1]
        out.append(tok)
    return out


class LexicalIndex:
    """Sparse term -> expert weights (CSR by term).

    Learned state: ``vocab_`` (V,) str, ``indptr_`` (V+1,) int64, ``experts_`` (nnz,) int32,
    ``weights_`` (nnz,) float32, ``n_experts_``.
    """

    def __init__(self, saturation: float = 0.1, min_fraction: float = 0.0):
        self.saturation = saturation
        self.min_fraction = min_fraction

    def fit(self, expert_texts: Sequence[Sequence[str]], keywords: Sequence[Iterable[str]] = (),
            descriptions: Sequence[str] = ()) -> "LexicalIndex":
        """``expert_texts[e]``: the documents of expert ``e``; optional keywords/descriptions per expert."""
        E = len(expert_texts)
        frac: dict[str, dict[int, float]] = {}
        for e, docs in enumerate(expert_texts):
            counts: dict[str, int] = {}
            for d in docs:
                for t in set(tokenize(d)):
                    counts[t] = counts.get(t, 0) + 1
            n = max(len(docs), 1)
            for t, c in counts.items():
                frac.setdefault(t, {})[e] = c / n
        for e, desc in enumerate(descriptions):
            for t in set(tokenize(desc or "")):
                cur = frac.setdefault(t, {})
                cur[e] = max(cur.get(e, 0.0), 0.5)
        for e, kws in enumerate(keywords):
            for kw in kws or ():
                for t in set(tokenize(kw)):
                    frac.setdefault(t, {})[e] = 1.0
        vocab = sorted(frac)
        indptr = np.zeros(len(vocab) + 1, dtype=np.int64)
        ex: list[int] = []
        w: list[float] = []
        for i, t in enumerate(vocab):
            post = frac[t]
            n_t = len(post)
            idf = np.log(1.0 + (E - n_t + 0.5) / (n_t + 0.5))
            for e, f in sorted(post.items()):
                if f < self.min_fraction:
                    continue
                ex.append(e)
                w.append(idf * f / (f + self.saturation))
            indptr[i + 1] = len(ex)
        self.vocab_ = np.array(vocab, dtype=str) if vocab else np.zeros(0, dtype="<U1")
        self.indptr_ = indptr
        self.experts_ = np.asarray(ex, dtype=np.int32)
        self.weights_ = np.asarray(w, dtype=np.float32)
        self.n_experts_ = E
        self._lookup = None
        return self

    def _ids(self, text: str) -> list[int]:
        if getattr(self, "_lookup", None) is None:
            self._lookup = {t: i for i, t in enumerate(self.vocab_.tolist())}
        return sorted({self._lookup[t] for t in tokenize(text) if t in self._lookup})

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Scores ``(n, E)`` float32 for ``texts`` (a text of ``"<vector>"`` or unknown words scores 0)."""
        out = np.zeros((len(texts), self.n_experts_), dtype=np.float32)
        for i, text in enumerate(texts):
            for t in self._ids(text or ""):
                a, b = self.indptr_[t], self.indptr_[t + 1]
                np.add.at(out[i], self.experts_[a:b], self.weights_[a:b])
        return out

    def top_terms(self, text: str, expert: int, n: int = 5) -> list[tuple[str, float]]:
        """The query's terms that contribute most to ``expert``'s score, for explanations."""
        found = []
        for t in self._ids(text or ""):
            a, b = self.indptr_[t], self.indptr_[t + 1]
            hit = np.flatnonzero(self.experts_[a:b] == expert)
            if hit.size:
                found.append((str(self.vocab_[t]), float(self.weights_[a + hit[0]])))
        return sorted(found, key=lambda x: -x[1])[:n]

    # ---------------------------------------------------------------- persistence (plain arrays)
    def to_arrays(self, prefix: str = "lex_") -> dict[str, np.ndarray]:
        return {prefix + "vocab": self.vocab_, prefix + "indptr": self.indptr_, prefix + "experts": self.experts_,
                prefix + "weights": self.weights_, prefix + "n": np.array([self.n_experts_], dtype=np.int64),
                prefix + "params": np.array([self.saturation, self.min_fraction])}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray], prefix: str = "lex_") -> "LexicalIndex":
        p = a[prefix + "params"]
        self = cls(float(p[0]), float(p[1]))
        self.vocab_ = a[prefix + "vocab"]
        self.indptr_ = a[prefix + "indptr"]
        self.experts_ = a[prefix + "experts"]
        self.weights_ = a[prefix + "weights"]
        self.n_experts_ = int(a[prefix + "n"][0])
        self._lookup = None
        return self
