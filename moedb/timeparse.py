"""Times as callers give them (epoch seconds, as numbers or as text, ``datetime``, ISO-8601 strings) turned into
epoch seconds."""
from __future__ import annotations

import datetime as _dt
import math
from typing import Any, Optional

import numpy as np

from .errors import InvalidInput


def parse_time(value: Any, what: str = "time") -> Optional[float]:
    """Epoch seconds from a number (or its text, as a command line or a query string gives it), a ``datetime``
    or an ISO-8601 string (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidInput(f"{what}: expected epoch seconds or an ISO-8601 date, got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            raise InvalidInput(f"{what}: not a finite number")
        return v
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    if isinstance(value, _dt.date):
        return _dt.datetime(value.year, value.month, value.day).timestamp()
    if isinstance(value, str):
        try:
            return parse_time(float(value), what)
        except ValueError:
            pass
        try:
            return _dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise InvalidInput(f"{what}: expected epoch seconds or an ISO-8601 date, got {value!r}")
