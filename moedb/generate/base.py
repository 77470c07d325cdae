"""What every generation backend shares: requests, results, prompts, retries.

A backend turns a :class:`GenRequest` (the question, the expert's own passages, earlier
answers, an instruction) into a :class:`Generation`. The prompt is built here, the same way
for every backend, so that switching an expert from one backend to another changes the model
and nothing else.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..errors import MoedbError
from .schema import BaseConfig

OnToken = Optional[Callable[[str], None]]

DEFAULT_SYSTEM = ("You are the {expert} expert. Answer the question using the context passages; "
                  "cite them as [1], [2]. Say so when the context does not contain the answer.")
SYNTH_SYSTEM = ("You merge the answers of several experts into one answer. Keep what they agree on, "
                "resolve or point out disagreements, and keep the citations.")


class GenerationError(MoedbError):
    """A generator failed at run time (server down, timeout, model error).

    Inside :meth:`moedb.Database.ask` it is recorded in the expert's contribution and does
    not fail the answer.
    """

    def __init__(self, message: str, *, timed_out: bool = False, retryable: bool = True):
        super().__init__(message)
        self.timed_out = timed_out
        self.retryable = retryable
        self.seconds = 0.0
        self.attempts = 1


@dataclass
class GenRequest:
    """One question to one generator.

    ``passages``: the expert's own retrieved passages (:class:`moedb.Hit`), best first.
    ``history``: earlier answers as ``(expert, answer)`` pairs (sequential collaboration, debate,
    merging). ``instruction``: an extra line after the question (e.g. "revise your answer").
    ``seed_offset`` is added to the configured seed (best_of_n draws several samples).
    """

    query: str
    expert: str = ""
    passages: Sequence[Any] = ()
    history: Sequence[tuple[str, str]] = ()
    instruction: Optional[str] = None
    role: str = "expert"
    seed_offset: int = 0


@dataclass
class Generation:
    """A generator's output: the text, token counts, the time it took and how many attempts."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    seconds: float = 0.0
    attempts: int = 1
    citations: list = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def format_passages(passages: Sequence[Any], max_chars: int) -> str:
    """Numbered passages ``[n] (expert: source) text`` within ``max_chars`` characters in total."""
    out, used = [], 0
    for i, h in enumerate(passages, 1):
        src = getattr(h, "source", None) or getattr(h, "id", "")
        head = f"[{i}] ({getattr(h, 'expert', '')}: {src}) "
        room = max_chars - used - len(head)
        if room <= 20:
            break
        text = " ".join(str(getattr(h, "text", h)).split())
        if len(text) > room:
            text = text[:room - 3].rstrip() + "..."
        out.append(head + text)
        used += len(head) + len(text) + 1
    return "\n".join(out)


def build_messages(req: GenRequest, config: BaseConfig) -> list[dict[str, str]]:
    """Chat messages ``[{"role": "system"|"user", "content": str}]`` for a request."""
    default = SYNTH_SYSTEM if req.role == "synthesizer" else DEFAULT_SYSTEM
    system = (config.system_prompt or default).replace("{expert}", req.expert or "general")
    parts = []
    ctx = format_passages(req.passages, config.max_context_chars)
    if ctx:
        parts.append("Context:\n" + ctx)
    if req.history:
        label = "Answers to merge" if req.role == "synthesizer" else "Answers so far"
        parts.append(label + ":\n" + "\n".join(f"- {who}: {' '.join(ans.split())}" for who, ans in req.history))
    parts.append("Question: " + req.query)
    if req.instruction:
        parts.append(req.instruction)
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def messages_to_prompt(messages: list[dict[str, str]]) -> str:
    """A plain-text completion prompt for models without a chat template."""
    sys_ = "\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = "\n\n".join(m["content"] for m in messages if m["role"] != "system")
    return (sys_ + "\n\n" if sys_ else "") + rest + "\nAnswer:"


class Generator:
    """Base class of the backends. Subclasses implement :meth:`_generate` (one attempt).

    ``config`` is the backend's typed configuration (a :class:`~moedb.generate.schema.BaseConfig`
    subclass, defaults filled in); build generators with :func:`moedb.generate.make_generator`.

    ``group_key()``: requests with equal keys share one local model and run one after the
    other in a single worker; ``adapter_key()`` orders them inside the group so an adapter
    is loaded/activated once per group instead of being swapped back and forth.
    """

    backend = "base"

    def __init__(self, config: BaseConfig):
        self.config = config

    def group_key(self) -> tuple:
        return ("independent", id(self))

    def adapter_key(self) -> str:
        return ""

    def _generate(self, req: GenRequest, on_token: OnToken, deadline: float) -> Generation:
        raise NotImplementedError

    def generate(self, req: GenRequest, on_token: OnToken = None) -> Generation:
        """Generate with the configured timeout and retries; raises :class:`GenerationError`."""
        retries, timeout, backoff = self.config.retries, self.config.timeout, self.config.retry_backoff
        t0 = time.perf_counter()
        last: Optional[GenerationError] = None
        for attempt in range(1, retries + 2):
            try:
                g = self._generate(req, on_token, time.perf_counter() + timeout)
            except GenerationError as e:
                last = e
                if not e.retryable or attempt > retries:
                    break
                time.sleep(backoff * (2 ** (attempt - 1)))
                continue
            g.seconds = time.perf_counter() - t0
            g.attempts = attempt
            return g
        assert last is not None
        n = attempt
        err = GenerationError(f"{self.describe()}: {last} ({n} attempt{'s' if n != 1 else ''})",
                              timed_out=last.timed_out, retryable=False)
        err.seconds, err.attempts = time.perf_counter() - t0, n
        raise err

    def describe(self) -> str:
        return self.backend
