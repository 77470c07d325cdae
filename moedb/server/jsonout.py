"""JSON as the CLI writes it: the library's dicts (which may hold NumPy scalars or arrays) as UTF-8 JSON.

:func:`dumps` is what every response and server-sent event goes through, so the service's fields and
numbers are exactly those of ``moedb ... --json``.
"""
from __future__ import annotations

import json
import math
from typing import Any

from starlette.responses import JSONResponse

from ..types import json_default


def finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities (which JSON cannot carry) as ``None``, NumPy values as plain ones."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if type(obj).__module__ == "numpy":
        obj = json_default(obj)
        return finite(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, ascii: bool = False) -> str:
    """One line of valid JSON (non-ASCII kept unless ``ascii``; NumPy values as plain numbers and lists;
    NaN and infinities, say an explanation's ``-inf`` of an expert no word matched, as ``null``)."""
    try:
        return json.dumps(obj, ensure_ascii=ascii, separators=(",", ":"), default=json_default, allow_nan=False)
    except ValueError:
        return json.dumps(finite(obj), ensure_ascii=ascii, separators=(",", ":"), allow_nan=False)


def encode(obj: Any) -> bytes:
    """:func:`dumps` as UTF-8; text that UTF-8 cannot carry (a lone surrogate) is sent as a ``\\u`` escape."""
    try:
        return dumps(obj).encode("utf-8")
    except UnicodeEncodeError:
        return dumps(obj, ascii=True).encode("ascii")


class JSONOut(JSONResponse):
    """A JSON response rendered with :func:`dumps`."""

    def render(self, content: Any) -> bytes:
        return encode(content)
