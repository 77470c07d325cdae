"""Answering: generation experts and the synthesizer strategies that combine them."""
from .answer import Answer, Citation, answer_scores
from .service import ABSTAIN_TEXT, BUILTIN_ASK, Generation

__all__ = ["Answer", "Citation", "answer_scores", "Generation", "ABSTAIN_TEXT", "BUILTIN_ASK"]
