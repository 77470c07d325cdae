"""Errors as JSON: every failure leaves the service as ``{"error": {"type": ..., "message": ...}}``.

:data:`STATUS` is the one table from moedb's exceptions (:mod:`moedb.errors`) to an HTTP status and a
stable ``error.type``; :func:`install` registers the handlers on an app. Nothing here ever puts a stack
trace or a raw SQLite message in a response: unknown exceptions become ``500 internal_error`` with a
fixed message (the traceback goes to the server's log only).
"""
from __future__ import annotations

import logging
from typing import Any

import apsw
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moedb import errors

from .jsonout import JSONOut

log = logging.getLogger("moedb.server")

# most specific first: the first class an exception is an instance of decides
STATUS: list[tuple[type, int, str]] = [
    (errors.UnknownExpert, 404, "unknown_expert"),
    (errors.DuplicateExpert, 409, "duplicate_expert"),
    (errors.DuplicateDocument, 409, "duplicate_document"),
    (errors.EmbedderMismatch, 409, "embedder_mismatch"),
    (errors.SchemaError, 409, "schema_error"),
    (errors.DimensionMismatch, 422, "invalid_input"),
    (errors.InvalidVector, 422, "invalid_input"),
    (errors.InvalidInput, 422, "invalid_input"),
    (errors.ConfigError, 422, "config_error"),
    (errors.FileProblem, 422, "file_problem"),
    (errors.MoedbError, 422, "moedb_error"),
]

# HTTP errors raised by the framework itself (unknown path, wrong method, ...)
HTTP_TYPES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
              415: "unsupported_media_type", 429: "too_many_requests"}


class ServiceError(Exception):
    """An error the service raises itself (request too large, unauthorized, ...)."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONOut:
    return JSONOut({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def classify(exc: BaseException) -> tuple[int, str, str, dict[str, str] | None]:
    """``(status, error.type, message, headers)`` for any exception an endpoint lets out."""
    if isinstance(exc, ServiceError):
        return exc.status, exc.type, exc.message, exc.headers
    # (before the table: DatabaseBusy is a MoedbError, and the store raises it for SQLite's busy errors)
    if isinstance(exc, (errors.DatabaseBusy, apsw.BusyError, apsw.LockedError)):
        return 503, "busy", "the database is busy; retry shortly", {"Retry-After": "1"}
    for cls, status, type_ in STATUS:
        if isinstance(exc, cls):
            return status, type_, str(exc), None
    log.error("internal error", exc_info=exc)
    return 500, "internal_error", "internal error (see the server's log)", None


def _validation_message(exc: RequestValidationError) -> str:
    """The first problems of a request body or query, each naming its field."""
    parts = []
    for e in exc.errors()[:5]:
        loc = [str(x) for x in e.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]  # where it came from; the rest names the field
        field = ".".join(loc) or "body"
        parts.append(f"{field}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    """Register the JSON error handlers on ``app``."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONOut:
        return error_response(422, "invalid_input", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONOut:
        type_ = HTTP_TYPES.get(exc.status_code, "http_error")
        msg = exc.detail if isinstance(exc.detail, str) else type_.replace("_", " ")
        return error_response(exc.status_code, type_, msg, getattr(exc, "headers", None))

    async def _known(request: Request, exc: Exception) -> JSONOut:
        status, type_, msg, headers = classify(exc)
        return error_response(status, type_, msg, headers)

    # moedb's own errors, SQLite's busy and the service's: answered here, not logged as crashes
    for cls in (errors.MoedbError, ServiceError, apsw.Error):
        app.add_exception_handler(cls, _known)
    # anything else is a bug: a fixed message to the client, the traceback to the server's log
    app.add_exception_handler(Exception, _known)


def as_dict(exc: BaseException) -> dict[str, Any]:
    """The ``error`` object of an exception (for errors inside a stream, sent as an event)."""
    _, type_, msg, _ = classify(exc)
    return {"type": type_, "message": msg}
