"""The database-wide settings: one frozen :class:`Settings` holds every default, validates every value
and says which settings a fitted gate depends on (:data:`FIT_SETTINGS`).

A file stores only the settings changed with :meth:`moedb.Database.configure`; :meth:`Settings.from_stored`
merges them over the defaults (and ignores settings earlier versions stored that no longer exist).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from .errors import ConfigError

# settings earlier versions wrote to files and that no longer have an effect (read and ignored)
RETIRED = frozenset({"temperature"})

# what a fitted gate depends on besides the experts: its stored key and its calibration hash these
# (in this order; a file's stored gate is refitted when one of them changes)
FIT_SETTINGS = ("gate_C", "gate_folds", "gate_max_iter", "refuse_rate", "lexical", "min_heldout", "gate_max_docs",
                "small_heldout")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _rule(check: Callable[[Any], bool], says: str) -> dict[str, Any]:
    return {"check": check, "says": says}


@dataclass(frozen=True)
class Settings:
    """Every database-wide setting with its default; ``Settings(**values)`` validates (``ConfigError``
    naming the setting). The defaults were chosen on CLINC150 train/val (see the comments)."""

    min_confidence: Optional[float] = dataclasses.field(default=None, metadata=_rule(
        lambda v: v is None or (_num(v) and 0 <= v <= 1), "None or a number in [0, 1]"))
    """None = abstain on the calibrated scope rule; a number = a rule on the top confidence (0 never abstains)."""
    min_scope: Optional[float] = dataclasses.field(default=None, metadata=_rule(
        lambda v: v is None or _num(v), "None or a number"))
    """None = the scope threshold calibrated on held-out documents; a number = that threshold."""
    refuse_rate: float = dataclasses.field(default=0.02, metadata=_rule(
        lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"))
    """Share of in-scope held-out documents the calibrated scope threshold refuses (0.02 keeps CLINC150
    val accuracy >= 95% at the threshold)."""
    min_heldout: int = dataclasses.field(default=30, metadata=_rule(
        lambda v: _int(v) and v >= 0, "an integer >= 0"))
    """Fewer held-out documents than this: no quantile rule (the small-collection rule still applies)."""
    small_heldout: int = dataclasses.field(default=200, metadata=_rule(
        lambda v: _int(v) and v >= 0, "an integer >= 0"))
    """Fewer held-out documents than this: a small collection, whose scope threshold also sits halfway from how
    its documents score to how they score against the other experts (0 = the quantile rule only). From about
    100 held-out documents (5 experts x 20) the quantile rule did as well on CLINC150 val (benches/bench_small.py)."""
    min_relative_confidence: float = dataclasses.field(default=0.05, metadata=_rule(
        lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"))
    """An expert after the best one is dropped (with its passages) when its confidence is below this share of the
    best one's: ``top_k`` is a maximum (0 = keep every expert above the confidence floor)."""
    gate_C: float = dataclasses.field(default=30.0, metadata=_rule(lambda v: _num(v) and v > 0, "a number > 0"))
    """Inverse ridge strength of the gate (as in scikit-learn); chosen on CLINC val."""
    gate_folds: int = dataclasses.field(default=3, metadata=_rule(
        lambda v: _int(v) and 0 <= v <= 20, "an integer in [0, 20]"))
    """Cross-fitting folds for the mix weights and the thresholds (< 2: no calibration)."""
    gate_max_iter: int = dataclasses.field(default=300, metadata=_rule(lambda v: _int(v) and v >= 1, "an integer >= 1"))
    """L-BFGS iterations of the gate fit."""
    gate_max_docs: int = dataclasses.field(default=20000, metadata=_rule(
        lambda v: _int(v) and v >= 100, "an integer >= 100"))
    """Documents the gate is fitted on at most (sampled evenly across experts)."""
    lexical: bool = dataclasses.field(default=True, metadata=_rule(lambda v: isinstance(v, bool), "true or false"))
    """The n-gram naive-Bayes signal (documents, keywords, description) in the mix."""
    balance: bool = dataclasses.field(default=True, metadata=_rule(lambda v: isinstance(v, bool), "true or false"))
    """Load balancing among near-equivalent experts."""
    balance_rate: float = dataclasses.field(default=0.01, metadata=_rule(lambda v: _num(v) and v >= 0, "a number >= 0"))
    """Bias step per routed query (logit units)."""
    balance_max_bias: float = dataclasses.field(default=1.0, metadata=_rule(
        lambda v: _num(v) and v >= 0, "a number >= 0"))
    """Bound on |bias| (logit units)."""
    balance_margin: float = dataclasses.field(default=2.0, metadata=_rule(lambda v: _num(v) and v >= 0, "a number >= 0"))
    """Experts within this logit margin of the best are near-equivalent ..."""
    balance_similarity: float = dataclasses.field(default=0.95, metadata=_rule(
        lambda v: _num(v) and -1 <= v <= 1, "a cosine in [-1, 1]"))
    """... and within this cosine of the best one's mean direction (0 = any); chosen on CLINC val replicas."""
    capacity: Optional[int] = dataclasses.field(default=None, metadata=_rule(
        lambda v: v is None or (_int(v) and v >= 1), "None or an integer >= 1"))
    """Max selections per expert per window (None = unlimited)."""
    capacity_window: float = dataclasses.field(default=3600.0, metadata=_rule(
        lambda v: _num(v) and v > 0, "a number of seconds > 0"))
    beam: Optional[int] = dataclasses.field(default=None, metadata=_rule(
        lambda v: v is None or (_int(v) and v >= 0), "None (auto), 0 (flat) or a beam width >= 1"))
    """None = auto (width 3 on a tree with >= 1000 experts), 0 = flat, n = width."""
    ann_min_centroids: int = dataclasses.field(default=4000, metadata=_rule(
        lambda v: _int(v) and v >= 1, "an integer >= 1"))
    """hnswlib over the centroids from this many."""
    ann_candidates: int = dataclasses.field(default=64, metadata=_rule(lambda v: _int(v) and v >= 1, "an integer >= 1"))
    """Centroids fetched by hnswlib per query."""
    ann_min_docs: int = dataclasses.field(default=20000, metadata=_rule(lambda v: _int(v) and v >= 1, "an integer >= 1"))
    """hnswlib inside experts with at least this many documents."""
    retrieval: str = dataclasses.field(default="hybrid", metadata=_rule(
        lambda v: v in ("hybrid", "dense", "lexical"), "hybrid, dense or lexical"))
    """How passages are ranked inside the routed experts and by search: BM25 and dense fused by reciprocal
    rank (hybrid; MTRAG nDCG@10 0.821 vs dense 0.778), cosine only, or BM25 only."""
    passage_evidence: bool = dataclasses.field(default=True, metadata=_rule(
        lambda v: isinstance(v, bool), "true or false"))
    """Routes add the evidence of the query's nearest passages to the gate, with the weight fitted per
    file on pseudo-queries (0 where the gate alone classifies them best)."""
    evidence_sample: int = dataclasses.field(default=20000, metadata=_rule(
        lambda v: _int(v) and v >= 1, "an integer >= 1"))
    """Passages sampled for that evidence, in all (spread over the experts, at least 8 each)."""
    vector_cache_mb: float = dataclasses.field(default=256, metadata=_rule(
        lambda v: _num(v) and v >= 0, "a number of megabytes >= 0"))
    """Hot experts' vectors kept in memory for exact NumPy retrieval (others are searched in SQL)."""
    ann_ef: int = dataclasses.field(default=128, metadata=_rule(lambda v: _int(v) and v >= 1, "an integer >= 1"))
    """hnswlib search breadth (persisted with each index)."""
    recalibrate_after: float = dataclasses.field(default=0.05, metadata=_rule(
        lambda v: _num(v) and 0 <= v <= 1, "a share of the experts in [0, 1]"))
    """A lazy refit keeps the held-out calibration of the last full fit until this share of the experts has
    changed since; 0 = always recalibrate."""
    context_weight: float = dataclasses.field(default=0.75, metadata=_rule(lambda v: _num(v) and v >= 0, "a number >= 0"))
    """Weight of the conversation in ``route(..., context=[...])`` (0.5 let the n-gram gate send "and how do I
    rotate them?" after an AWS-keys exchange to car tires)."""
    log_queries: bool = dataclasses.field(default=True, metadata=_rule(lambda v: isinstance(v, bool), "true or false"))
    log_vectors: bool = dataclasses.field(default=True, metadata=_rule(lambda v: isinstance(v, bool), "true or false"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.metadata["check"](value):
                raise ConfigError(f"setting {f.name} must be {f.metadata['says']}, got {value!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_stored(cls, stored: Optional[dict[str, Any]]) -> "Settings":
        """The settings a file stores merged over the defaults (retired and unknown keys are ignored)."""
        known = set(cls.names())
        return cls(**{k: v for k, v in (stored or {}).items() if k in known})

    def changed(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied; ``ConfigError`` for an unknown setting or a bad value."""
        unknown = set(changes) - set(self.names())
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fit_key(self) -> str:
        """The settings a fitted gate depends on, as one string (``k=v;`` in :data:`FIT_SETTINGS` order)."""
        return ";".join(f"{k}={getattr(self, k)!r}" for k in FIT_SETTINGS)


DEFAULTS = Settings()
