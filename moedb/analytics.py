"""Offline analytics of expert load from the query log (issue 4)."""
from __future__ import annotations


class AnalyticsMixin:
    """Methods of :class:`moedb.Database` that summarise the query log."""
