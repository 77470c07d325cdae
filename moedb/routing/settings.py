"""Validation of the routing settings accepted by :meth:`moedb.Database.configure`."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import ConfigError


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)


_ROUTING_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "min_confidence": (lambda v: v is None or (_is_num(v) and 0 <= v <= 1), "None or a number in [0, 1]"),
    "min_scope": (lambda v: v is None or _is_num(v), "None or a number"),
    "refuse_rate": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "min_heldout": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "gate_C": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "gate_folds": (lambda v: isinstance(v, int) and 0 <= v <= 20, "an integer in [0, 20]"),
    "gate_max_iter": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "gate_max_docs": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 100, "an integer >= 100"),
    "lexical": (lambda v: isinstance(v, bool), "true or false"),
    "balance": (lambda v: isinstance(v, bool), "true or false"),
    "balance_rate": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "balance_max_bias": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "balance_margin": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "balance_similarity": (lambda v: _is_num(v) and -1 <= v <= 1, "a cosine in [-1, 1]"),
    "capacity": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                 "None or an integer >= 1"),
    "capacity_window": (lambda v: _is_num(v) and v > 0, "a number of seconds > 0"),
    "beam": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
             "None (auto), 0 (flat) or a beam width >= 1"),
    "ann_min_centroids": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "ann_candidates": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "ann_min_docs": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "ann_ef": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "context_weight": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "recalibrate_after": (lambda v: _is_num(v) and 0 <= v <= 1, "a share of the experts in [0, 1]"),
}


def check_routing_settings(settings: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the first routing setting whose value is out of range."""
    for key, value in settings.items():
        check = _ROUTING_CHECKS.get(key)
        if check is not None and not check[0](value):
            raise ConfigError(f"setting {key} must be {check[1]}, got {value!r}")
