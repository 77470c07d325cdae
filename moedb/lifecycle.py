"""Expert lifecycle and feedback (issue 4): feedback, ingestion jobs, retrain, split, merge, optimize, rename."""
from __future__ import annotations

import numpy as np


class LifecycleMixin:
    """Methods of :class:`moedb.Database` that change experts over time."""

    def _feedback_examples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feedback as training examples for the gate.

        Returns ``(vectors (m, d) float32, expert_ids (m,) int64, rewards (m,) float64)``;
        reward > 0 makes the query an example of that expert, < 0 a counter-example.
        """
        return (np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float64))
