"""The passage evidence of one file's router: fitted once per gate, stored beside it, reused by every process.

:class:`EvidenceService` samples each routed expert's passages (at most ``evidence_sample`` in all, spread
over the experts), makes pseudo-queries of the first words of some of them, and fits a
:class:`~moedb.routing.evidence.PassageEvidence` whose weight says how much the route should trust the
nearest passages over the gate on this file (see that module). The fit is keyed by the gate's key, so it
follows every refit (and a change of :data:`RULE` or of ``evidence_sample``); it is stored as the artefact
``evidence``.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..errors import MoedbError
from ..routing.evidence import PassageEvidence
from ..store import Store
from .catalog import Catalog
from .embedding import FileEmbedder

PSEUDO_WORDS = 12  # a pseudo-query is a passage's first words, about a question's length
PSEUDO_QUERIES = 400  # pseudo-queries in all, spread over the experts (at least 2 each)
RULE = 4  # the version of the fitting rule: a stored fit of an older rule (or another sample size) is refitted
COPY_SHARE = 0.5  # a pseudo-query holding at least this share of its passage's words is a copy of it


class EvidenceService:
    """Passage evidence for the router of ``store``'s file."""

    def __init__(self, store: Store, catalog: Catalog, embedding: FileEmbedder):
        self.store = store
        self.catalog = catalog
        self.embedding = embedding
        self._current: Optional[tuple[str, PassageEvidence]] = None

    def current(self, router) -> Optional[PassageEvidence]:
        """The evidence fitted for ``router`` (loaded or fitted and stored), ``None`` when it is turned off."""
        if router is None or not self.catalog.settings.passage_evidence:
            return None
        key = f"{router.key};evidence-rule={RULE};sample={int(self.catalog.settings.evidence_sample)}"
        if self._current is not None and self._current[0] == key:
            return self._current[1]
        stored = self.store.artefacts.get("evidence")
        ev = None
        if stored is not None and stored[0] == key:
            try:
                ev = PassageEvidence.from_bytes(stored[1])
            except (ValueError, KeyError, OSError):
                ev = None
        if ev is None or len(ev.scale_) != len(router.rows):
            ev = self._fit(router)
            self.store.artefacts.put("evidence", key, ev.to_bytes(), ev.figures_)
        self._current = (key, ev)
        return ev

    def _fit(self, router) -> PassageEvidence:
        """Sample, make pseudo-queries, fit.

        A pseudo-query stands for a question whose answer is its passage. Its passage is drawn from the whole
        expert, so it is in the evidence sample as often as a real question's answer is (the sample's share of
        the expert), and then stays in it: a real question's answer is in the store too. A pseudo-query that
        is (most of) its passage is a copy (short documents that are query examples, like intent utterances):
        its passage is left out, as a new query is not in the store.
        """
        rows = router.rows
        E = len(rows)
        per = max(8, int(self.catalog.settings.evidence_sample) // max(E, 1))
        per_q = max(1, PSEUDO_QUERIES // max(E, 1))
        every = max(1, E // PSEUDO_QUERIES)  # beyond PSEUDO_QUERIES experts: pseudo-queries of every n-th one
        X, cols, scale, texts, copy, yq, qvec, row_of = [], [], np.zeros(E), [], [], [], [], []
        start = 0
        for j, row in enumerate(rows):
            asks = min(per_q, int(row["size"])) if j % every == 0 else 0
            inside = min(asks, int(round(asks * min(1.0, per / max(int(row["size"]), 1)))))
            # the first `per` rows of the expert's fixed random order are its sample; pseudo-queries are drawn
            # from it in proportion, and from the rows after it for the rest
            _, t, v = self.store.documents.sample(row["id"], per + asks - inside)
            if not len(t):
                continue
            n = min(per, len(t))
            X.append(v[:n])
            cols += [j] * n
            scale[j] = row["size"] / n
            for i in list(range(inside)) + list(range(n, len(t))):
                words = t[i].split()
                if not words:
                    continue
                texts.append(" ".join(words[:PSEUDO_WORDS]))
                copy.append(min(PSEUDO_WORDS, len(words)) >= COPY_SHARE * len(words))
                row_of.append(start + i if i < n else -1)  # (-1: not in the sample)
                qvec.append(v[i])
                yq.append(j)
            start += n
        Xs = np.concatenate(X) if X else np.zeros((0, self.embedding.dim), np.float32)
        in_sample = np.asarray(row_of, np.int64)
        src = np.where(np.asarray(copy, dtype=bool), in_sample, -1)
        try:
            Vq = self.embedding.embed(texts) if texts else np.zeros((0, self.embedding.dim), np.float32)
            qtexts: Any = texts
        except MoedbError:  # an embedder of vectors only: the passages stand for the questions (copies: left out)
            Vq, qtexts, src = np.asarray(qvec, np.float32).reshape(-1, Xs.shape[1]), None, in_sample
        scored = router.score(Vq, qtexts, None) if len(yq) else None
        Zq = scored[1] if scored is not None else np.zeros((0, E))
        st = self.catalog.settings
        return PassageEvidence().fit(Xs, np.asarray(cols, np.int64), scale, Zq, Vq, np.asarray(yq, np.int64), src,
                                     scope=scored[4] if scored is not None else None,
                                     refuse_rate=float(st.refuse_rate), min_count=int(st.min_heldout))
