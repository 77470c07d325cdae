"""Typed generator configurations: the fields every backend shares and the validation pass.

A backend's configuration is a frozen dataclass deriving from :class:`BaseConfig`. A field's type
annotation says what it holds (``str``, ``int``, ``float``, a ``Literal`` of choices, ``Optional``
of one of them) and its default is the value the backend uses when the field is not set. Extra
constraints go in the field's metadata, written with :func:`setting`: bounds for numbers
(``ge``, ``gt``, ``le``), ``required``, or a ``check(name, value, base_dir) -> value`` function for
values a type cannot describe (paths, URLs, adapter lists).

:func:`parse` validates a plain dict against a config class and returns the normalised dict with
only the fields that were given (configurations are stored sparse, as JSON); every problem raises
:class:`moedb.ConfigError` naming the field (``generator.max_tokens: must be >= 1, got 0``).
:meth:`BaseConfig.from_dict` builds the typed object from a validated dict (no checks, no file
access), with the defaults filled in.
"""
from __future__ import annotations

import functools
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal, NamedTuple, Optional

from ..errors import ConfigError

Check = Callable[[str, Any, Optional[str]], Any]
Mode = Literal["auto", "chat", "completion"]


def err(name: str, msg: str) -> ConfigError:
    """The error for a bad field: ``generator.<name>: <msg>``."""
    return ConfigError(f"generator.{name}: {msg}")


def setting(default: Any = None, *, ge: Optional[float] = None, gt: Optional[float] = None,
            le: Optional[float] = None, check: Optional[Check] = None, required: bool = False) -> Any:
    """A config field with its default and constraints (see the module docstring)."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "check": check, "required": required})


def resolve_path(name: str, value: Any, base_dir: Optional[str]) -> str:
    """An absolute path: ``~`` expanded, relative paths taken against ``base_dir`` (default: cwd)."""
    if not isinstance(value, str) or not value.strip():
        raise err(name, "must be a non-empty path")
    p = os.path.expanduser(value)
    if not os.path.isabs(p):
        p = os.path.join(base_dir or os.getcwd(), p)
    return os.path.abspath(p)


def stop_list(name: str, value: Any, base_dir: Optional[str]) -> list[str]:
    """A stop string or a list of them, stored as a list."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise err(name, "must be a string or a list of non-empty strings")
    return list(items)


@dataclass(frozen=True)
class BaseConfig:
    """The fields every backend accepts (and the only ones an overlay without ``backend`` may set)."""

    system_prompt: Optional[str] = None
    max_tokens: int = setting(256, ge=1)
    temperature: float = setting(0.0, ge=0)
    top_p: float = setting(1.0, gt=0, le=1)
    seed: int = 0
    stop: tuple[str, ...] = setting((), check=stop_list)
    timeout: float = setting(60.0, gt=0)
    retries: int = setting(0, ge=0)
    retry_backoff: float = setting(0.2, ge=0)
    max_context_chars: int = setting(2000, ge=0)

    @classmethod
    def from_dict(cls, cfg: dict) -> "BaseConfig":
        """The typed configuration of a validated dict; unset fields take their defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names and v is not None})

    def verify(self, expert: Optional[str] = None) -> None:
        """Checks that need the outside world (a server's adapters), run when the configuration is set:
        :class:`moedb.ConfigError` naming ``expert`` and the field. Most backends have none."""


class _Spec(NamedTuple):
    check: Check
    required: bool


def _typed_check(name: str, hint: Any, meta: Any) -> Check:
    """The check of a field from its annotation and bounds."""
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        said = ", ".join(map(str, choices[:-1])) + f" or {choices[-1]}" if len(choices) > 1 else str(choices[0])

        def choice(field_: str, value: Any, base_dir: Optional[str]) -> Any:
            if value not in choices:
                raise err(field_, f"must be {said}, got {value!r}")
            return value
        return choice
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if hint is str:
        def string(field_: str, value: Any, base_dir: Optional[str]) -> str:
            if not isinstance(value, str):
                raise err(field_, f"must be a string, got {type(value).__name__}")
            return value
        return string
    if hint is int:
        def integer(field_: str, value: Any, base_dir: Optional[str]) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise err(field_, f"must be an integer, got {value!r}")
            if ge is not None and value < ge:
                raise err(field_, f"must be >= {ge:g}, got {value}")
            return value
        return integer
    if hint is float:
        def number(field_: str, value: Any, base_dir: Optional[str]) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise err(field_, f"must be a number, got {value!r}")
            v = float(value)
            if gt is not None and le is not None and not (gt < v <= le):
                raise err(field_, f"must be in ({gt:g}, {le:g}], got {v}")
            if gt is not None and le is None and v <= gt:
                raise err(field_, f"must be > {gt:g}, got {v}")
            if ge is not None and v < ge:
                raise err(field_, f"must be >= {ge:g}, got {v}")
            return v
        return number
    raise TypeError(f"config field {name}: no check for type {hint!r} (give it setting(check=...))")


@functools.lru_cache(maxsize=None)
def specs(cls: type) -> dict[str, _Spec]:
    """Field name -> (check, required) of a config class, derived once from its dataclass fields."""
    hints = typing.get_type_hints(cls)
    out: dict[str, _Spec] = {}
    for f in fields(cls):
        meta = f.metadata or {}
        check = meta.get("check") or _typed_check(f.name, hints[f.name], meta)
        out[f.name] = _Spec(check, bool(meta.get("required")))
    return out


def parse(cls: type, cfg: dict, base_dir: Optional[str], backend: Optional[str]) -> dict:
    """``cfg`` validated against ``cls`` (``backend`` kept as given, ``None`` values dropped), or
    :class:`moedb.ConfigError` naming the first bad, unknown or missing field."""
    allowed = specs(cls)
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key == "backend":
            out[key] = value
            continue
        spec = allowed.get(key)
        if spec is None:
            where = f"the {backend} backend" if backend else "a generator without backend (an overlay)"
            raise err(str(key), f"unknown field for {where}")
        if value is not None:
            out[key] = spec.check(key, value, base_dir)
    for name, spec in allowed.items():
        if spec.required and name not in out:
            raise err(name, f"is required for the {backend} backend")
    return out
