"""Expert lifecycle and feedback (issue 4): feedback, ingestion jobs, retrain, split, merge, optimize, rename."""
from __future__ import annotations


class LifecycleMixin:
    """Methods of :class:`moedb.Database` that change experts over time."""
