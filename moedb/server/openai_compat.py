"""OpenAI-compatible endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (plain and streamed as
server-sent events) and ``POST /v1/embeddings``, so a chat UI or an SDK that speaks the OpenAI API can
use a moedb file.

Models: ``moedb`` answers with the database's default strategy, ``moedb/<strategy>`` with that one
(``moedb/weighted``, ``moedb/voting``, ... one per entry of :data:`moedb.ask.synth.STRATEGIES`).
A chat completion is :meth:`moedb.Database.ask` on the last user message; the response's ``model``
says which strategy and experts answered (``moedb/weighted:billing+security``, ``...:abstained``) and
the extra field ``moedb`` carries the rest of ``moedb ask --json`` (experts with confidences,
abstention, citations, contributions, latency, query id).
"""
from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any, AsyncIterator, Optional

import numpy as np
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from moedb import InvalidInput
from moedb.ask.synth import STRATEGIES
from moedb.text import is_unicode

from .errors import ServiceError, as_dict
from .jsonout import JSONOut, encode
from .pool import DatabasePool
from .rest import pool_of, remember_route
from .schemas import MAX_BATCH, ChatIn, EmbeddingsIn

router = APIRouter(prefix="/v1", default_response_class=JSONOut)

MODEL = "moedb"


def model_ids() -> list[str]:
    """``moedb`` (the database's default strategy) and ``moedb/<strategy>`` for each strategy."""
    return [MODEL] + [f"{MODEL}/{s}" for s in STRATEGIES]


def strategy_of(model: str) -> Optional[str]:
    """The strategy a model id asks for (``None``: the database's default); unknown ids are a 404."""
    if model == MODEL:
        return None
    if model.startswith(MODEL + "/") and model[len(MODEL) + 1:] in STRATEGIES:
        return model[len(MODEL) + 1:]
    raise ServiceError(404, "model_not_found", f"model: unknown model {model!r} (choose from "
                       f"{', '.join(model_ids())})")


def text_of(content: Any) -> str:
    """A message's text: a string, or the ``text`` of its ``{"type": "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(p.get("text", "")) for p in content if p.get("type") == "text")


def query_of(body: ChatIn) -> str:
    """The query: the text of the last user message."""
    users = [text_of(m.content) for m in body.messages if m.role == "user"]
    if not users:
        raise InvalidInput("messages: no message with role \"user\" (its text is the query)")
    return users[-1]


def context_of(body: ChatIn) -> list[str]:
    """The conversation before the last user message: its user turns, oldest first (routing context)."""
    users = [text_of(m.content) for m in body.messages if m.role == "user"]
    return [u for u in users[:-1] if u.strip()]


def answered_by(answer: dict[str, Any], default: str) -> str:
    """The response's ``model``: strategy and experts, e.g. ``moedb/weighted:billing+security``."""
    who = "abstained" if answer["abstained"] or not answer["experts"] else \
        "+".join(e["name"] for e in answer["experts"])
    return f"{MODEL}/{answer.get('strategy') or default}:{who}"


def moedb_field(answer: dict[str, Any]) -> dict[str, Any]:
    """The extra ``moedb`` field: ``moedb ask --json`` without the text (which is the message)."""
    return {k: v for k, v in answer.items() if k != "text"}


@router.get("/models", summary="OpenAI: the models (one per synthesis strategy)")
def models() -> JSONOut:
    return JSONOut({"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "moedb"}
                                                for m in model_ids()]})


def _ask(pool: DatabasePool, body: ChatIn, query: str, strategy: Optional[str], stream=None) -> dict[str, Any]:
    with pool.read() as db:
        a = db.ask(query, top_k=body.top_k, strategy=strategy, k=body.k, min_confidence=body.min_confidence,
                   stream=stream, context=context_of(body) or None)
    remember_route(pool, a, "chat")
    return a.to_dict()


@router.post("/chat/completions", summary="OpenAI: answer the last user message (`stream: true` for "
             "server-sent events)")
async def chat_completions(request: Request, body: ChatIn) -> Any:
    strategy = strategy_of(body.model)
    query = query_of(body)
    pool = pool_of(request)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        a = await run_in_threadpool(_ask, pool, body, query, strategy)
        u = a["usage"]
        return JSONOut({"id": cid, "object": "chat.completion", "created": created,
                        "model": answered_by(a, strategy or "default"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": a["text"]},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                                  "total_tokens": u["total_tokens"]},
                        "moedb": moedb_field(a)})
    return await _stream(pool, body, query, strategy, cid, created)


async def _stream(pool: DatabasePool, body: ChatIn, query: str, strategy: Optional[str],
                  cid: str, created: int) -> StreamingResponse:
    """Run ``ask`` in a worker thread and relay its tokens as ``chat.completion.chunk`` events. An error
    before the first token is an ordinary JSON error response; after it, an ``error`` event."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def put(kind: str, value: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    def work() -> None:
        try:
            put("done", _ask(pool, body, query, strategy, stream=lambda piece: put("token", piece)))
        except BaseException as e:  # reaches the client as JSON (see errors.classify)
            put("error", e)

    loop.run_in_executor(None, work)
    first = await events.get()
    if first[0] == "error":
        raise first[1]
    model = f"{MODEL}/{strategy or 'default'}"

    def chunk(delta: dict, finish: Optional[str] = None, **extra: Any) -> bytes:
        c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": extra.pop("model", model),
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return b"data: " + encode(c) + b"\n\n"

    async def sse() -> AsyncIterator[bytes]:
        yield chunk({"role": "assistant", "content": ""})
        item = first
        while True:
            kind, value = item
            if kind == "token":
                if value:
                    yield chunk({"content": value})
            elif kind == "done":
                u = value["usage"]
                yield chunk({}, "stop", model=answered_by(value, strategy or "default"),
                            usage={"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                                   "total_tokens": u["total_tokens"]},
                            moedb=moedb_field(value))
                break
            else:
                yield b"data: " + encode({"error": as_dict(value)}) + b"\n\n"
                break
            item = await events.get()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/embeddings", summary="OpenAI: embeddings with the file's embedder")
def embeddings(request: Request, body: EmbeddingsIn) -> JSONOut:
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or len(texts) > MAX_BATCH:
        raise InvalidInput(f"input: give 1 to {MAX_BATCH} texts, got {len(texts)}")
    for i, t in enumerate(texts):
        if not t.strip() or not is_unicode(t):
            raise InvalidInput(f"input[{i}]: an empty text or one with a lone surrogate")
    with pool_of(request).read() as db:
        V = np.asarray(db.embedder.embed(texts), dtype="<f4")
    if body.encoding_format == "base64":
        rows: list[Any] = [base64.b64encode(v.tobytes()).decode("ascii") for v in V]
    else:
        rows = V.tolist()
    return JSONOut({"object": "list", "model": body.model,
                    "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(rows)],
                    "usage": {"prompt_tokens": 0, "total_tokens": 0}})
