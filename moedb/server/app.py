"""The ASGI app of ``moedb serve``: :func:`create_app` wires the REST API (:mod:`.rest`), the OpenAI-compatible
endpoints (:mod:`.openai_compat`), the dashboard (``static/``), JSON errors (:mod:`.errors`), the bearer
key, the request size limit and a ``Server-Timing`` header.

>>> from moedb.server import create_app                                  # doctest: +SKIP
>>> app = create_app("experts.db", api_key=os.environ["MOEDB_API_KEY"])  # doctest: +SKIP
>>> # mount it in an existing ASGI stack, or: uvicorn.run(app, host="127.0.0.1", port=8000)
"""
from __future__ import annotations

import contextlib
import hmac
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

import moedb

from . import errors, openai_compat, rest
from .pool import DatabasePool

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 16 * 1024 * 1024  # bytes of one request body (documents in bulk: several requests)
# the dashboard's shell holds no data (it asks for the key itself when /dashboard.json says one is needed)
OPEN_PATHS = ("/", "/dashboard.json")
OPEN_PREFIXES = ("/static/",)


class BearerAuth:
    """Every request (but the dashboard's static shell) needs ``Authorization: Bearer <key>``; the key is
    compared in constant time (:func:`hmac.compare_digest`) and never logged or stored elsewhere."""

    def __init__(self, app: ASGIApp, key: str):
        self.app = app
        self._key = key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES) \
                or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
                break
        if not hmac.compare_digest(given, self._key):
            resp = errors.error_response(401, "unauthorized", "a valid API key is required "
                                         "(header Authorization: Bearer <key>)", {"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with ``413 request_too_large``: at once when its
    ``Content-Length`` says so, else as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.limit:
                    resp = errors.error_response(413, "request_too_large", self.message())
                    return await resp(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise StarletteHTTPException(413, self.message())
            return msg

        return await self.app(scope, counted, send)

    def message(self) -> str:
        return f"request body over {self.limit} bytes (send documents in several requests)"


class ServerTiming:
    """A ``Server-Timing: app;dur=<ms>`` header on every response: the time from the request reaching the
    app to its response starting, so a client can tell the service's time from the network's."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()

        async def timed(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                dur = (time.perf_counter() - t0) * 1000.0
                msg = {**msg, "headers": [*msg.get("headers", []), (b"server-timing", f"app;dur={dur:.3f}".encode())]}
            await send(msg)

        return await self.app(scope, receive, timed)


def create_app(db_path: str, *, api_key: Optional[str] = None, cors_origins: Sequence[str] = (),
               readers: int = 2, max_body: int = MAX_BODY, connect: Optional[Callable[[str], Any]] = None
               ) -> FastAPI:
    """The moedb service over the file ``db_path`` (opened now; an error names a bad file).

    ``api_key``: when given, every API request needs ``Authorization: Bearer <api_key>``.
    ``cors_origins``: origins allowed to call from a browser (none by default: CORS off).
    ``readers``: ``Database`` objects serving reads at once (see :class:`.pool.DatabasePool`).
    ``max_body``: the largest request body in bytes. ``connect``: how to open the file
    (default :func:`moedb.connect`).
    """
    if api_key is not None and not api_key:
        raise moedb.InvalidInput("api_key: an empty key would let anyone in")
    if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
        raise moedb.InvalidInput(f"max_body must be a positive integer, got {max_body!r}")
    pool = DatabasePool(db_path, readers, connect=connect)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pool.close()

    app = FastAPI(title="moedb", version=moedb.__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="An embedded mixture-of-experts retrieval engine over one SQLite file: REST under "
                              "/v1, OpenAI-compatible /v1/models, /v1/chat/completions, /v1/embeddings.")
    app.state.pool = pool
    errors.install(app)
    app.include_router(rest.router)
    app.include_router(openai_compat.router)

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/dashboard.json", include_in_schema=False)
    def dashboard_config() -> dict:
        return {"key_required": api_key is not None}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # the last added runs first: CORS (answers browsers' preflights), the key, the body's size, the app
    app.add_middleware(ServerTiming)
    app.add_middleware(BodyLimit, limit=max_body)
    if api_key is not None:
        app.add_middleware(BearerAuth, key=api_key)  # no endpoint runs before the key is checked
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    return app
