"""Plain result types returned by the library (no behaviour, JSON-friendly)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np


@dataclass
class Expert:
    """An expert as stored in the file.

    ``centroid`` is the mean of the current member vectors, shape ``(d,)`` float32,
    or ``None`` for an expert without documents.
    """

    name: str
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    parent: Optional[str] = None
    size: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    generator: Optional[dict[str, Any]] = None
    created_at: float = 0.0
    updated_at: float = 0.0
    centroid: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    refuse: bool = False  # a refusal expert: examples of queries none of the experts should answer

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("centroid", None)
        return d


@dataclass
class ExpertScore:
    """One expert's routing outcome. ``score`` is the raw gate score, ``confidence`` a probability."""

    name: str
    score: float
    confidence: float
    components: Optional[dict[str, float]] = None

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "score": self.score, "confidence": self.confidence}
        if self.components is not None:
            d["components"] = dict(self.components)
        return d


@dataclass
class Hit:
    """One retrieved passage; ``score`` is what ranked it: the cosine similarity to the query (dense), the
    BM25 score (lexical) or the reciprocal-rank fusion of both (hybrid); ``components`` (with ``explain``):
    ``dense`` / ``lexical`` scores and their ranks, and ``fused``."""

    expert: str
    id: str
    text: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    source: Optional[str] = None
    components: Optional[dict[str, float]] = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["components"] is None:
            del d["components"]
        return d


@dataclass
class RouteResult:
    """The outcome of :meth:`moedb.Database.route`."""

    query: str
    experts: list[ExpertScore]
    hits: list[Hit]
    query_id: Optional[int] = None
    latency_ms: float = 0.0
    abstained: bool = False
    path: list[str] = field(default_factory=list)
    explanation: Optional[dict[str, Any]] = None
    scope: Optional[float] = None  # how much the query looks like the experts' documents (standardised)
    refused_by: Optional[str] = None  # the refusal expert that matched best, when that made the route abstain

    def to_dict(self) -> dict[str, Any]:
        d = {
            "query": self.query,
            "query_id": self.query_id,
            "abstained": self.abstained,
            "experts": [e.to_dict() for e in self.experts],
            "hits": [h.to_dict() for h in self.hits],
            "latency_ms": self.latency_ms,
            "path": list(self.path),
            "scope": self.scope,
            "refused_by": self.refused_by,
        }
        if self.explanation is not None:
            d["explanation"] = self.explanation
        return d


def json_default(o: Any) -> Any:
    """A NumPy scalar or array as the plain value JSON can carry (``json.dumps(..., default=json_default)``:
    results and figures may hold them)."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
