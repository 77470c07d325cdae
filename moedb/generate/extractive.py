"""The ``extractive`` backend: no model, answers with the best routed passages, quoted and cited.

It is the default, so ``moedb ask`` works on any machine. The answer is the best passages,
quoted, one per line (most similar first), each followed by its citation ``[expert: source]``
(the document id when it has no source); the citations are also returned as data. Asked to merge other answers (the ``llm_merge`` synthesizer role) it quotes the
answers it was given, in order.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import GenerationError, Generation, GenRequest, Generator, OnToken
from .schema import BaseConfig, setting


@dataclass(frozen=True)
class ExtractiveConfig(BaseConfig):
    """``max_passages``: how many passages are quoted; ``max_chars``: the length of each quote."""

    max_passages: int = setting(2, ge=1)
    max_chars: int = setting(600, ge=1)


class ExtractiveGenerator(Generator):
    """Quote the ``max_passages`` best passages (default 2), at most ``max_chars`` characters each."""

    backend = "extractive"
    config: ExtractiveConfig

    def group_key(self) -> tuple:
        return ("extractive",)

    def _generate(self, req: GenRequest, on_token: OnToken, deadline: float) -> Generation:
        n, max_chars = self.config.max_passages, self.config.max_chars
        if req.role == "synthesizer":
            pieces = [" ".join(a.split()) for _, a in req.history if a.strip()]
            if not pieces:
                raise GenerationError("nothing to merge", retryable=False)
            text = "\n".join(pieces)
            cites = []
        else:
            hits = list(req.passages)[:n]
            if not hits:
                raise GenerationError("no passages were retrieved for this expert", retryable=False)
            lines = []
            for h in hits:
                t = " ".join(h.text.split())
                t = t if len(t) <= max_chars else t[:max_chars - 3].rstrip() + "..."
                lines.append(f'"{t}" [{h.expert}: {h.source or h.id}]')
            text = "\n".join(lines)
            cites = hits
        if on_token is not None:
            on_token(text)
        info = {"top_passage_score": float(req.passages[0].score)} if req.passages and req.role != "synthesizer" \
            else {}
        return Generation(text=text, prompt_tokens=0, completion_tokens=0, finish_reason="stop",
                          citations=cites, info=info)
