"""The REST API under ``/v1``: one library call per endpoint, answering with the fields of the CLI's ``--json``.

| endpoint | library call | same JSON as |
| --- | --- | --- |
| ``GET /v1/info`` | ``Database.info`` | ``moedb init --json`` |
| ``GET /v1/experts`` | ``experts`` | ``moedb list --json`` |
| ``GET /v1/experts/{name}`` | ``expert`` + ``documents`` | ``moedb show --json`` |
| ``GET /v1/experts/{name}/documents`` | ``documents`` | (``limit``, ``offset``) |
| ``POST /v1/experts`` | ``add_expert`` | ``moedb add-expert --json`` |
| ``POST /v1/experts/{name}/documents`` | ``add_documents`` | ``moedb add-docs --json`` |
| ``DELETE /v1/experts/{name}`` | ``remove_expert`` | ``{"expert", "removed"}`` |
| ``POST /v1/route`` | ``route`` | ``moedb route --json`` |
| ``POST /v1/search`` | ``search`` | ``moedb search --json`` |
| ``POST /v1/feedback`` | ``feedback`` / ``ingest_feedback`` | ``moedb feedback --json`` / ``ingest-feedback --json`` |
| ``POST /v1/ask`` | ``ask`` | ``moedb ask --json`` |
| ``GET /v1/stats`` | ``stats`` | ``moedb stats --json`` |
| ``GET /v1/recent`` | (this process's routes) | for the dashboard |

Sync endpoints: FastAPI runs them in its thread pool, each with a ``Database`` of its own from the pool.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Optional, Union

from fastapi import APIRouter, Query, Request

from .jsonout import JSONOut, encode
from .pool import DatabasePool
from .schemas import (MAX_K, AskIn, DocumentsIn, ExpertIn, FeedbackBatchIn, FeedbackIn, RouteIn, SearchIn)

router = APIRouter(prefix="/v1", default_response_class=JSONOut)


def pool_of(request: Request) -> DatabasePool:
    return request.app.state.pool


def docs_of(items: list) -> list:
    """Request documents as the library takes them: strings, or dicts without the fields left unset."""
    return [d if isinstance(d, str) else d.model_dump(exclude_none=True) for d in items]


def remember_route(pool: DatabasePool, r: Any, via: str) -> None:
    """Keep a route (a ``RouteResult`` or an ``Answer``) for the dashboard's list of recent routes."""
    experts = [e if isinstance(e, dict) else e.to_dict() for e in r.experts]
    pool.remember({"time": time.time(), "via": via, "query": r.query[:300], "query_id": r.query_id,
                   "abstained": r.abstained, "refused_by": getattr(r, "refused_by", None),
                   "experts": [{"name": e["name"], "confidence": e["confidence"]} for e in experts],
                   "latency_ms": getattr(r, "latency_ms", None)})


@router.get("/health", summary="Liveness: the service answers and its file is open")
async def health(request: Request) -> JSONOut:  # no blocking work: answered on the event loop
    return JSONOut({"status": "ok", "readers": pool_of(request).size})


@router.get("/info", summary="The file: path, embedder, schema version, counts, settings")
def info(request: Request) -> JSONOut:
    with pool_of(request).read() as db:
        return JSONOut(db.info())


@router.get("/experts", summary="All experts (as `moedb list --json`)")
def list_experts(request: Request) -> JSONOut:
    with pool_of(request).read() as db:
        return JSONOut([e.to_dict() for e in db.experts()])


@router.post("/experts", status_code=201, summary="Create an expert with documents (as `moedb add-expert --json`)")
def create_expert(request: Request, body: ExpertIn) -> JSONOut:
    e = pool_of(request).change_experts(lambda db: db.add_expert(
        body.name, docs_of(body.documents), description=body.description, keywords=body.keywords,
        parent=body.parent, metadata=body.metadata, refuse=body.refuse))
    return JSONOut(e.to_dict(), status_code=201)


@router.get("/experts/{name:path}/documents", summary="An expert's documents, `limit` from `offset`")
def list_documents(request: Request, name: str, limit: int = Query(100, ge=-1, le=100_000),
                   offset: int = Query(0, ge=0, le=2**62)) -> JSONOut:
    with pool_of(request).read() as db:
        return JSONOut(db.documents(name, limit=limit, offset=offset))


@router.post("/experts/{name:path}/documents", summary="Add documents to an expert (as `moedb add-docs --json`)")
def add_documents(request: Request, name: str, body: DocumentsIn) -> JSONOut:
    def add(db):
        n = db.add_documents(name, docs_of(body.documents), on_conflict=body.on_conflict)
        return {"expert": name, "added": n, "size": db.expert(name).size}

    return JSONOut(pool_of(request).change_experts(add))


@router.get("/experts/{name:path}", summary="One expert and its first documents (as `moedb show --json`)")
def show_expert(request: Request, name: str, docs: int = Query(5, ge=0, le=100_000)) -> JSONOut:
    with pool_of(request).read() as db:
        e = db.expert(name)
        return JSONOut({**e.to_dict(), "documents": db.documents(name, limit=docs)})


@router.delete("/experts/{name:path}", summary="Delete an expert and its documents")
def remove_expert(request: Request, name: str) -> JSONOut:
    pool_of(request).change_experts(lambda db: db.remove_expert(name))
    return JSONOut({"expert": name, "removed": True})


@router.post("/route", summary="Route a query to experts and retrieve passages (as `moedb route --json`)")
def route(request: Request, body: RouteIn) -> JSONOut:
    pool = pool_of(request)
    with pool.read() as db:
        r = db.route(body.query, top_k=body.top_k, k=body.k, min_confidence=body.min_confidence,
                     explain=body.explain, context=body.context)
    remember_route(pool, r, "route")
    return JSONOut(r.to_dict())


@router.post("/search", summary="Exhaustive search over every document (as `moedb search --json`)")
def search(request: Request, body: SearchIn) -> JSONOut:
    with pool_of(request).read() as db:
        return JSONOut([h.to_dict() for h in db.search(body.query, k=body.k, experts=body.experts)])


@router.post("/feedback", summary="Feedback on routes: one event, or `{\"events\": [...]}` (as `moedb "
             "feedback --json` / `moedb ingest-feedback --json`)")
def feedback(request: Request, body: Union[FeedbackIn, FeedbackBatchIn]) -> JSONOut:
    pool = pool_of(request)
    if isinstance(body, FeedbackBatchIn):
        return JSONOut(_ingest(pool, body.events))
    if (body.query is None) == (body.query_id is None):
        from moedb import InvalidInput

        raise InvalidInput("give exactly one of \"query\" and \"query_id\"")
    with pool.write() as db:
        return JSONOut(db.feedback(body.query_id if body.query is None else body.query, body.expert, body.reward,
                                   id=body.id, time=body.time))


def _ingest(pool: DatabasePool, events: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch through the library's JSONL ingestion (one event per line: line N is event N)."""
    fd, path = tempfile.mkstemp(prefix="moedb-feedback-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as f:
            for ev in events:
                f.write(encode(ev) + b"\n")
        with pool.write() as db:
            out = db.ingest_feedback(path)
        return {**out, "file": None}  # the events came in the request, not from a file of the caller's
    finally:
        os.remove(path)


@router.post("/ask", summary="Answer with the routed experts' generators (as `moedb ask --json`)")
def ask(request: Request, body: AskIn) -> JSONOut:
    pool = pool_of(request)
    with pool.read() as db:
        a = db.ask(body.query, top_k=body.top_k, strategy=body.strategy, collaboration=body.collaboration,
                   rounds=body.rounds, k=body.k, min_confidence=body.min_confidence, options=body.options)
    remember_route(pool, a, "ask")
    return JSONOut(a.to_dict())


@router.get("/stats", summary="Load analytics from the query log (as `moedb stats --json`)")
def stats(request: Request, since: Optional[str] = Query(None, max_length=100),
          until: Optional[str] = Query(None, max_length=100), buckets: int = Query(24, le=10_000)) -> JSONOut:
    with pool_of(request).read() as db:
        return JSONOut(db.stats(since=since, until=until, buckets=buckets))


@router.get("/recent", summary="Routes served by this process, newest first (for the dashboard)")
def recent(request: Request, limit: int = Query(50, ge=1, le=MAX_K)) -> JSONOut:
    return JSONOut(pool_of(request).recent(limit))
