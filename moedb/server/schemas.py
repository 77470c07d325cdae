"""Request bodies of the service (pydantic): field names and defaults are those of the library calls and the
CLI's options (``top_k``, ``k``, ``min_confidence``, ``context``, ``explain``, ...).

The bounds here are request-size limits (how many documents, events or passages one request may ask
for); whether a value makes sense is checked by the library, whose error names the field.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_DOCUMENTS = 10_000     # documents in one request
MAX_EVENTS = 100_000       # feedback events in one request
MAX_TEXT = 1_000_000       # characters of one text
MAX_K = 1_000              # passages / experts one request may ask for
MAX_BATCH = 2_048          # texts of one embeddings request

class Strict(BaseModel):
    """Unknown fields are refused (a misspelt option is an error naming it, not silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class DocumentIn(Strict):
    text: str = Field(max_length=MAX_TEXT)
    id: Optional[str] = Field(None, max_length=1000)
    metadata: Optional[dict[str, Any]] = None
    source: Optional[str] = Field(None, max_length=4096)
    position: Optional[int] = None


Document = Union[str, DocumentIn]


class ExpertIn(Strict):
    """``POST /v1/experts``: ``moedb add-expert`` with inline documents."""

    name: str = Field(max_length=1000)
    documents: list[Document] = Field(default_factory=list, max_length=MAX_DOCUMENTS)
    description: str = Field("", max_length=MAX_TEXT)
    keywords: list[str] = Field(default_factory=list, max_length=1000)
    parent: Optional[str] = Field(None, max_length=1000)
    metadata: Optional[dict[str, Any]] = None
    refuse: bool = False


class DocumentsIn(Strict):
    """``POST /v1/experts/{name}/documents``: ``moedb add-docs`` with inline documents."""

    documents: list[Document] = Field(max_length=MAX_DOCUMENTS)
    on_conflict: Literal["error", "skip", "replace"] = "error"


class RouteIn(Strict):
    """``POST /v1/route``: ``moedb route``."""

    query: str = Field(max_length=MAX_TEXT)
    top_k: int = Field(2, le=MAX_K)
    k: int = Field(5, le=MAX_K)
    min_confidence: Optional[float] = Field(None, allow_inf_nan=False)
    context: Optional[list[str]] = Field(None, max_length=100)
    explain: bool = False


class SearchIn(Strict):
    """``POST /v1/search``: ``moedb search`` (``experts``: only these)."""

    query: str = Field(max_length=MAX_TEXT)
    k: int = Field(10, le=MAX_K)
    experts: Optional[list[str]] = Field(None, max_length=MAX_K)


class FeedbackIn(Strict):
    """One feedback event: ``query_id`` (a logged route) or ``query`` (a text), ``expert``, ``reward``."""

    expert: str = Field(max_length=1000)
    query_id: Optional[int] = None
    query: Optional[str] = Field(None, max_length=MAX_TEXT)
    reward: float = Field(1.0, allow_inf_nan=False)
    id: Optional[Union[str, int]] = None
    time: Optional[Union[float, str]] = None


class FeedbackBatchIn(Strict):
    """Many events at once, as the lines of ``moedb ingest-feedback`` (bad events are reported and skipped)."""

    events: list[dict[str, Any]] = Field(max_length=MAX_EVENTS)


class AskIn(Strict):
    """``POST /v1/ask``: ``moedb ask`` (``None``: the database's default)."""

    query: str = Field(max_length=MAX_TEXT)
    top_k: Optional[int] = Field(None, le=MAX_K)
    strategy: Optional[str] = None
    collaboration: Optional[str] = None
    rounds: Optional[int] = Field(None, le=100)
    k: Optional[int] = Field(None, le=MAX_K)
    min_confidence: Optional[float] = Field(None, allow_inf_nan=False)
    options: Optional[dict[str, Any]] = None


class ChatMessage(BaseModel):
    """An OpenAI chat message; ``content`` as text or a list of ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None


class ChatIn(BaseModel):
    """``POST /v1/chat/completions``. OpenAI's sampling fields are accepted and ignored (the experts'
    generators have their own); ``top_k``, ``k`` and ``min_confidence`` (via ``extra_body``) steer moedb."""

    model_config = ConfigDict(extra="allow")
    model: str = Field("moedb", max_length=1000)
    messages: list[ChatMessage] = Field(max_length=1000)
    stream: bool = False
    top_k: Optional[int] = Field(None, le=MAX_K)
    k: Optional[int] = Field(None, le=MAX_K)
    min_confidence: Optional[float] = Field(None, allow_inf_nan=False)


class EmbeddingsIn(BaseModel):
    """``POST /v1/embeddings`` with the file's embedder."""

    model_config = ConfigDict(extra="allow")
    input: Union[str, list[str]]
    model: str = Field("moedb", max_length=1000)
    encoding_format: Literal["float", "base64"] = "float"
