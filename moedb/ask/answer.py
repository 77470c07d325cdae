"""What :meth:`moedb.Database.ask` returns: the :class:`Answer`, its :class:`Citation` s, token usage, and
the grounding score of candidate answers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .synth import Contribution


__all__ = ["Answer", "Citation", "Contribution", "answer_scores", "token_usage"]


@dataclass
class Citation:
    """A passage behind the answer: its expert, document id, source and retrieval score."""

    expert: str
    id: str
    source: Optional[str]
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"expert": self.expert, "id": self.id, "source": self.source, "score": self.score}


@dataclass
class Answer:
    """The outcome of :meth:`moedb.Database.ask`.

    ``contributions``: one :class:`Contribution` per generation (expert, answer, confidence,
    tokens, time, error). ``usage``: token and call counts. ``latency``: milliseconds per stage
    (``route_ms`` routing + retrieval, ``retrieval_ms`` extra per-expert retrieval,
    ``generation_ms``, ``synthesis_ms``, ``total_ms``). ``extra``: strategy details (tally,
    scores, rounds, synthesizer, ...).
    """

    text: str
    contributions: list[Contribution]
    citations: list[Citation]
    usage: dict[str, int]
    latency: dict[str, float]
    query: str = ""
    strategy: str = "weighted"
    collaboration: str = "parallel"
    abstained: bool = False
    experts: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    query_id: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "text": self.text, "strategy": self.strategy,
                "collaboration": self.collaboration, "abstained": self.abstained, "query_id": self.query_id,
                "experts": self.experts, "contributions": [c.to_dict() for c in self.contributions],
                "citations": [c.to_dict() for c in self.citations], "usage": dict(self.usage),
                "latency": dict(self.latency), "extra": self.extra}


def answer_scores(embed: Callable[[list[str]], np.ndarray], query: str, answers: Sequence[str],
                  passages: Sequence[Sequence[Any]]) -> list[float]:
    """Score answers by grounding: ``0.5 * cos(answer, query) + 0.5 * max_j cos(answer, passage_j)``.

    ``embed(texts) -> (n, d)`` unit vectors; ``passages[i]`` are answer ``i``'s passages (``Hit``);
    without passages the score is ``cos(answer, query)``. Returns one float in [-1, 1] per answer.
    """
    ptexts: list[str] = []
    index: dict[str, int] = {}
    for ps in passages:
        for h in ps:
            if h.text not in index:
                index[h.text] = len(ptexts)
                ptexts.append(h.text)
    V = embed([query] + list(answers) + ptexts)
    q, A, P = V[0], V[1:1 + len(answers)], V[1 + len(answers):]
    out = []
    for i, a in enumerate(A):
        rel = float(a @ q)
        idx = [index[h.text] for h in passages[i]]
        out.append(0.5 * rel + 0.5 * float(np.max(P[idx] @ a)) if idx else rel)
    return out


def token_usage(contributions: list[Contribution], synth: Optional[dict]) -> dict[str, int]:
    cs = [c.to_dict() for c in contributions] + ([synth] if synth else [])
    pt = sum(int(c["prompt_tokens"]) for c in cs)
    ct = sum(int(c["tokens"]) for c in cs)
    return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct, "generations": len(cs),
            "failures": sum(1 for c in cs if not c["ok"])}
