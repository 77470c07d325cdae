"""Lexical signal: a multinomial naive-Bayes model of each expert's word n-grams.

A text becomes a sparse vector ``x`` over word unigrams and bigrams (optionally also within-word
character n-grams, as a second block), each block weighted by sublinear tf * idf and unit-normalised.
Expert ``e`` keeps the summed vectors of its documents ``c[:, e]`` (its keywords and description count
as extra documents), smoothed into a distribution ``theta[f, e] = (c[f, e] + alpha) / (N_e + alpha V)``.
The signal is the log-likelihood ratio of the query's n-grams under the expert's model against a
uniform one:

    lexical_e(x) = sum_f x_f log(V theta[f, e])
                 = sum_f x_f log(1 + c[f, e] / alpha) + (sum_f x_f) * base_e,
    base_e = log(alpha V / (N_e + alpha V))

so a text with no known n-gram scores 0 everywhere. Only the non-zero ``log(1 + c / alpha)`` terms
are stored (CSR by n-gram). Character n-grams are off by default: on CLINC150 val they added nothing
once mixed into the gate (96.77% vs 96.73%) and made scoring about five times slower.
Fitting imports SciPy; scoring is Python + NumPy, and the state is plain arrays.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

import numpy as np

from ..text import STOPWORDS

_WORD = re.compile(r"(?u)\b\w\w+\b")
_FORMAT = 2



def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of two or more characters with a light plural strip ("tires" -> "tire",
    "batteries" -> "battery"): the word n-gram alphabet. The strip added 0.1 point on CLINC150 val."""
    out = []
    for t in _WORD.findall(text.lower()):
        if len(t) > 4 and t.endswith("ies"):
            t = t[:-3] + "y"
        elif len(t) > 3 and t.endswith("s") and not t.endswith("ss"):
            t = t[:-1]
        out.append(t)
    return out


def grams(text: str, chars: Optional[tuple[int, int]] = None) -> dict[str, int]:
    """N-gram counts of ``text``: ``"w:"`` word unigrams and bigrams and, if ``chars=(lo, hi)``,
    ``"c:"`` character n-grams of each whitespace-separated word padded with spaces."""
    out: dict[str, int] = {}
    toks = tokenize(text)
    for i, t in enumerate(toks):
        k = "w:" + t
        out[k] = out.get(k, 0) + 1
        if i:
            k = "w:" + toks[i - 1] + " " + t
            out[k] = out.get(k, 0) + 1
    if not chars:
        return out
    lo, hi = chars
    for w in text.lower().split():
        w = " " + w + " "
        for n in range(lo, hi + 1):
            if len(w) < n:
                break
            for s in range(len(w) - n + 1):
                k = "c:" + w[s:s + n]
                out[k] = out.get(k, 0) + 1
    return out


class LexicalIndex:
    """Per-expert n-gram naive Bayes (see the module docstring).

    Learned state: ``vocab_`` (V,) n-gram strings, ``idf_`` (V,) float32, ``char_`` (V,) bool (character
    block), ``indptr_`` (V+1,) int64, ``experts_`` (nnz,) int32, ``weights_`` (nnz,) float32 =
    ``log(1 + c / alpha)``, ``base_`` (E,) float32, ``n_experts_``.
    """

    def __init__(self, alpha: float = 0.1, char_min_df: int = 2, chars: Optional[tuple[int, int]] = None):
        self.alpha = alpha
        self.char_min_df = char_min_df
        self.chars = chars

    # ------------------------------------------------------------------ fitting
    def fit(self, expert_texts: Sequence[Sequence[str]], keywords: Sequence[Iterable[str]] = (),
            descriptions: Sequence[str] = (), cache: Optional[dict] = None) -> "LexicalIndex":
        """``expert_texts[e]``: the documents of expert ``e``; optional keywords/descriptions per expert.

        ``cache``: a dict ``text -> n-gram counts`` shared between fits of the same texts (cross-fitting).
        """
        from scipy.sparse import coo_matrix

        E = len(expert_texts)
        cache = {} if cache is None else cache

        def g(t: str) -> dict[str, int]:
            r = cache.get(t)
            if r is None:
                r = cache[t] = grams(t, self.chars)
            return r

        docs: list[dict[str, int]] = []
        owner: list[int] = []
        weight: list[float] = []
        for e, ts in enumerate(expert_texts):
            for t in ts:
                docs.append(g(t or ""))
                owner.append(e)
                weight.append(1.0)
        n_real = len(docs)
        sizes = np.bincount(np.asarray(owner, dtype=np.int64), minlength=E) if owner else np.zeros(E, np.int64)
        # keywords and the description are extra documents, a keyword worth at least a twentieth of the expert
        for e, kws in enumerate(keywords):
            for kw in kws or ():
                if kw and kw.strip():
                    docs.append(g(kw))
                    owner.append(e)
                    weight.append(max(1.0, sizes[e] / 20.0))
        for e, desc in enumerate(descriptions):
            if desc and desc.strip():
                docs.append(g(desc))
                owner.append(e)
                weight.append(1.0)
        df: dict[str, int] = {}
        for d in docs[:n_real]:
            for k in d:
                df[k] = df.get(k, 0) + 1
        for d in docs[n_real:]:  # keyword/description n-grams are known even when rare
            for k in d:
                df.setdefault(k, 1)
        vocab = sorted(k for k, c in df.items() if c >= (self.char_min_df if k.startswith("c:") else 1))
        ids = {k: i for i, k in enumerate(vocab)}
        V = len(vocab)
        n_docs = max(n_real, 1)
        idf = np.array([np.log((1.0 + n_docs) / (1.0 + df[k])) + 1.0 for k in vocab], dtype=np.float64)
        is_char = np.array([k.startswith("c:") for k in vocab], dtype=bool)
        rows, cols, vals = [], [], []
        for d, e, w in zip(docs, owner, weight):
            fi = [ids[k] for k in d if k in ids]
            if not fi:
                continue
            fi_a = np.asarray(fi, dtype=np.int64)
            x = (1.0 + np.log(np.array([d[vocab[i]] for i in fi], dtype=np.float64))) * idf[fi_a]
            x = _block_normalise(x, is_char[fi_a])
            rows.append(fi_a)
            cols.append(np.full(len(fi), e, dtype=np.int64))
            vals.append(x * w)
        if rows:
            c = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(V, E)).tocsr()
            c.sum_duplicates()
            c.sort_indices()
            total = np.asarray(c.sum(axis=0)).ravel()
            indptr, experts, data = c.indptr.astype(np.int64), c.indices.astype(np.int32), c.data
        else:
            total = np.zeros(E)
            indptr, experts, data = np.zeros(V + 1, np.int64), np.zeros(0, np.int32), np.zeros(0)
        a = float(self.alpha)
        self.vocab_ = np.array(vocab, dtype=object)
        self.idf_ = idf.astype(np.float32)
        self.char_ = is_char
        self.indptr_ = indptr
        self.experts_ = experts
        self.weights_ = np.log1p(data / a).astype(np.float32)
        self.base_ = (np.log(a * max(V, 1)) - np.log(total + a * max(V, 1))).astype(np.float32)
        self.n_experts_ = E
        self._lookup = None
        return self

    # ------------------------------------------------------------------ scoring
    def _vector(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Known n-gram ids ``(m,)`` and their tf-idf weights ``(m,)`` for one text."""
        counts = grams(text or "", self.chars)
        if not counts:  # (a vector query: no need to build the vocabulary's lookup table)
            return np.zeros(0, np.int64), np.zeros(0)
        lk = getattr(self, "_lookup", None)
        if lk is None:
            lk = self._lookup = {k: i for i, k in enumerate(self.vocab_.tolist())}
        fi, cnt = [], []
        for k, c in counts.items():
            i = lk.get(k)
            if i is not None:
                fi.append(i)
                cnt.append(c)
        if not fi:
            return np.zeros(0, np.int64), np.zeros(0)
        fi_a = np.array(fi, dtype=np.int64)
        x = self.idf_[fi_a] * (1.0 + np.log(np.array(cnt, dtype=np.float32)))
        return fi_a, _block_normalise(x, self.char_[fi_a])

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Scores ``(n, E)`` float32 (0 for a text with no known n-gram, such as ``"<vector>"``)."""
        E = self.n_experts_
        out = np.zeros((len(texts), E), dtype=np.float32)
        ip, ex, wt = self.indptr_, self.experts_, self.weights_
        for i, text in enumerate(texts):
            fi, x = self._vector(text)
            if not len(fi):
                continue
            starts = ip[fi]
            lens = ip[fi + 1] - starts
            total = int(lens.sum())
            if total:
                # positions of every stored (n-gram, expert) entry of the query's n-grams, in one gather
                idx = np.arange(total) + np.repeat(starts - (np.cumsum(lens) - lens), lens)
                out[i] = np.bincount(ex[idx], weights=wt[idx] * np.repeat(x, lens), minlength=E)
            out[i] += x.sum() * self.base_
        return out

    def top_terms(self, text: str, expert: int, n: int = 5) -> list[tuple[str, float]]:
        """The query's words and word pairs that weigh most for ``expert``, for explanations (as the query
        wrote them: "does", not the n-gram "doe" its plural strip made)."""
        fi, x = self._vector(text)
        written: dict[str, str] = {}
        for w in _WORD.findall(text.lower()):
            written.setdefault(tokenize(w)[0], w)
        found = []
        for f, xf in zip(fi.tolist(), x.tolist()):
            term = str(self.vocab_[f])
            if not term.startswith("w:") or all(w in STOPWORDS for w in term[2:].split()):
                continue
            a, b = self.indptr_[f], self.indptr_[f + 1]
            hit = np.flatnonzero(self.experts_[a:b] == expert)
            if hit.size:
                shown = " ".join(written.get(p, p) for p in term[2:].split())
                found.append((shown, float(xf * self.weights_[a + hit[0]])))
        return sorted(found, key=lambda t: -t[1])[:n]

    # ---------------------------------------------------------------- persistence (plain arrays)
    def to_arrays(self, prefix: str = "lex_") -> dict[str, np.ndarray]:
        blob = "\n".join(self.vocab_.tolist()).encode("utf-8")
        return {prefix + "vocab": np.frombuffer(blob, dtype=np.uint8), prefix + "idf": self.idf_,
                prefix + "char": self.char_, prefix + "indptr": self.indptr_, prefix + "experts": self.experts_,
                prefix + "weights": self.weights_, prefix + "base": self.base_,
                prefix + "n": np.array([self.n_experts_, _FORMAT], dtype=np.int64),
                prefix + "params": np.array([self.alpha, self.char_min_df, *(self.chars or (0, 0))])}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray], prefix: str = "lex_") -> "LexicalIndex":
        n = a[prefix + "n"]
        if len(n) < 2 or int(n[1]) != _FORMAT:
            raise ValueError("unsupported lexical index format")
        p = a[prefix + "params"]
        self = cls(float(p[0]), int(p[1]), (int(p[2]), int(p[3])) if p[3] > 0 else None)
        raw = a[prefix + "vocab"].tobytes().decode("utf-8")
        self.vocab_ = np.array(raw.split("\n") if raw else [], dtype=object)
        self.idf_ = a[prefix + "idf"]
        self.char_ = a[prefix + "char"]
        self.indptr_ = a[prefix + "indptr"]
        self.experts_ = a[prefix + "experts"]
        self.weights_ = a[prefix + "weights"]
        self.base_ = a[prefix + "base"]
        self.n_experts_ = int(n[0])
        self._lookup = None
        return self


def _block_normalise(x: np.ndarray, is_char: np.ndarray) -> np.ndarray:
    """Unit-normalise the word block and the character block of one tf-idf vector separately."""
    sq = x * x
    nc = float(sq[is_char].sum())
    nw = float(sq.sum()) - nc
    return x / np.where(is_char, max(nc, 1e-24) ** 0.5, max(nw, 1e-24) ** 0.5)
