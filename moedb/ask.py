"""Asking: routed context to generation experts and a synthesizer (issue 5)."""
from __future__ import annotations


class AskMixin:
    """Methods of :class:`moedb.Database` that generate answers."""
