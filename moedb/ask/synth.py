"""The synthesizer: eight strategies that turn several experts' answers into one.

Each strategy is a function ``strategy(session) -> Synthesis``. The :class:`Session` (built by
:meth:`moedb.Database.ask`) knows the query, the chosen experts (routing order, each with its
own passages and generator) and how to ask them: all at once (``collaboration="parallel"``,
concurrent, grouped per model/adapter) or in turn, each seeing the earlier answers
(``"sequential"``). A failing or timing-out expert becomes a failed :class:`Contribution`; no
strategy lets it fail the answer.

=============  ==========================================================================
strategy       when to use it
=============  ==========================================================================
concatenate    You want every expert's view, side by side, with attribution.
weighted       Default. Several experts may be relevant; show the most trusted first,
               with weights proportional to routing confidence.
best_only      Latency/cost matter and the router is reliable: ask one expert only.
llm_merge      Answers overlap or conflict and you have a model to write one coherent
               answer from them (the *synthesizer* generator).
debate         Hard questions where experts benefit from seeing each other's answers;
               costs ``rounds`` x experts generations.
voting         Short factual answers (a name, a number, yes/no): the majority wins, with
               the tally.
cascade        Cheap-first pipelines: experts in routing order, stop at the first one
               whose answer is good enough (``min_score``).
best_of_n      Quality matters more than cost: draw ``n`` answers per expert, score each
               against the question and passages, keep the best, with the scores.
=============  ==========================================================================
"""
from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from ..errors import ConfigError, InvalidInput

DEBATE_INSTRUCTION = ("The other experts answered as shown. Revise your answer: keep what is right, "
                      "correct what is wrong, and answer the question again.")


@dataclass
class Contribution:
    """One generation by one expert (or by the synthesizer / fallback).

    ``confidence`` is the expert's routing confidence, ``tokens`` the completion tokens,
    ``time`` seconds spent (retries included). A failure has ``ok=False`` and ``error`` set.
    """

    expert: str
    answer: str = ""
    confidence: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    time: float = 0.0
    ok: bool = True
    error: Optional[str] = None
    timed_out: bool = False
    backend: str = ""
    round: int = 1
    sample: int = 0
    attempts: int = 1
    role: str = "expert"
    score: Optional[float] = None
    weight: Optional[float] = None
    citations: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Slot:
    """A chosen expert: routing confidence, its own passages (``Hit``), its generator."""

    name: str
    confidence: float
    passages: list
    generator: Any


@dataclass
class Synthesis:
    """What a strategy returns: the final text, every contribution, strategy-specific extras."""

    text: str
    contributions: list[Contribution]
    extra: dict[str, Any] = field(default_factory=dict)
    streamed: bool = False
    used: Optional[list[str]] = None  # experts whose answers the text stands on (None: those quoted in it)


class Session:
    """Everything a strategy may do. Built by :meth:`moedb.Database.ask`.

    ``run(jobs, parallel) -> outcomes`` runs ``(generator, GenRequest)`` pairs;
    ``scorer(query, answers, passages_per_answer) -> list[float]`` scores answers;
    ``synthesizer`` is the generator of ``llm_merge``; ``on_token`` streams the final stage.
    """

    def __init__(self, query: str, slots: list[Slot], *, collaboration: str, rounds: int, options: dict,
                 run: Callable, scorer: Callable, synthesizer: Any = None, on_token: Optional[Callable] = None):
        self.query = query
        self.slots = slots
        self.collaboration = collaboration
        self.rounds = rounds
        self.options = options
        self._run = run
        self._scorer = scorer
        self.synthesizer = synthesizer
        self.on_token = on_token
        self.gen_seconds = 0.0

    # ------------------------------------------------------------------ asking
    def _contribution(self, slot: Slot, outcome: Any, rnd: int, sample: int = 0, role: str = "expert") -> Contribution:
        from ..generate import GenerationError

        backend = getattr(slot.generator, "backend", "")
        if isinstance(outcome, GenerationError):
            return Contribution(expert=slot.name, confidence=slot.confidence, ok=False, error=str(outcome),
                                timed_out=outcome.timed_out, backend=backend, round=rnd, sample=sample, role=role,
                                time=outcome.seconds, attempts=outcome.attempts)
        cites = [{"expert": h.expert, "id": h.id, "source": h.source, "score": float(h.score)}
                 for h in outcome.citations]
        ok = bool(outcome.text.strip())
        return Contribution(expert=slot.name, answer=outcome.text, confidence=slot.confidence,
                            tokens=outcome.completion_tokens, prompt_tokens=outcome.prompt_tokens,
                            time=outcome.seconds, ok=ok, error=None if ok else "empty answer", backend=backend,
                            round=rnd, sample=sample, attempts=outcome.attempts, role=role, citations=cites)

    def ask(self, slots: Optional[list[Slot]] = None, *, rnd: int = 1, history: Optional[dict[str, list]] = None,
            instruction: Optional[str] = None, sample: int = 0, stream: bool = False) -> list[Contribution]:
        """Ask ``slots`` (default: all) once; returns their contributions in slot order.

        ``history``: per expert name, the ``(expert, answer)`` pairs it is shown. In sequential
        collaboration each expert also sees the answers given before it in this call. ``stream``
        streams tokens when exactly one expert is asked.
        """
        from ..generate import GenRequest

        slots = self.slots if slots is None else slots
        history = history or {}

        def req(s: Slot, extra: list) -> Any:
            return GenRequest(query=self.query, expert=s.name, passages=s.passages,
                              history=list(history.get(s.name, [])) + extra, instruction=instruction,
                              seed_offset=sample)

        t0 = time.perf_counter()
        if stream and len(slots) == 1 and self.on_token is not None:
            out = [self._generate_streamed(slots[0].generator, req(slots[0], []))]
        elif self.collaboration == "sequential":
            out, earlier = [], []
            for s in slots:
                o = self._run([(s.generator, req(s, list(earlier)))], False)[0]
                out.append(o)
                if not isinstance(o, Exception) and o.text.strip():
                    earlier.append((s.name, o.text))
        else:
            out = self._run([(s.generator, req(s, [])) for s in slots], True)
        self.gen_seconds += time.perf_counter() - t0
        return [self._contribution(s, o, rnd, sample) for s, o in zip(slots, out)]

    def _generate_streamed(self, gen: Any, req: Any) -> Any:
        from ..generate import GenerationError

        try:
            return gen.generate(req, on_token=self.on_token)
        except GenerationError as e:
            return e

    def merge(self, answers: list[tuple[str, str]]) -> Contribution:
        """Ask the synthesizer generator to merge ``(expert, answer)`` pairs (streamed)."""
        from ..generate import GenRequest

        slot = Slot("synthesizer", 1.0, [], self.synthesizer)
        req = GenRequest(query=self.query, expert="synthesizer", history=answers, role="synthesizer",
                         instruction="Write one answer to the question from the answers above.")
        o = self._generate_streamed(self.synthesizer, req) if self.on_token else self._run([(self.synthesizer, req)], False)[0]
        return self._contribution(slot, o, 1, role="synthesizer")

    def score(self, contributions: list[Contribution]) -> None:
        """Set ``score`` on every successful contribution (see :func:`moedb.ask.answer_scores`)."""
        ok = [c for c in contributions if c.ok]
        if not ok:
            return
        by_name = {s.name: s for s in self.slots}
        scores = self._scorer(self.query, [c.answer for c in ok], [by_name[c.expert].passages for c in ok])
        for c, sc in zip(ok, scores):
            c.score = float(sc)


# ---------------------------------------------------------------------- helpers
def _ok(cs: list[Contribution]) -> list[Contribution]:
    return [c for c in cs if c.ok]


def failed_text(cs: list[Contribution]) -> str:
    """What an answer says when every expert routing chose failed: which ones and why (no other expert fits)."""
    bad = [c for c in cs if c.role == "expert" and not c.ok]
    names = ", ".join(dict.fromkeys(c.expert for c in bad)) or "none"
    why = "; ".join(dict.fromkeys(f"{c.expert}: {c.error}" for c in bad if c.error))
    return (f"No answer: the expert{'s' if len(set(c.expert for c in bad)) > 1 else ''} that fit this question "
            f"failed ({names}){': ' + why if why else ''}. No other expert fits this question, so none was asked "
            "instead.")


def _none_answered(cs: list[Contribution]) -> str:
    why = "; ".join(f"{c.expert}: {c.error}" for c in cs if not c.ok)
    return "No expert could answer" + (f" ({why})." if why else ".")


def _sections(cs: list[Contribution], label: Callable[[Contribution], str]) -> str:
    return "\n\n".join(f"[{c.expert}] ({label(c)})\n{c.answer}" for c in cs)


def _weights(cs: list[Contribution]) -> None:
    ok = _ok(cs)
    total = sum(max(c.confidence, 0.0) for c in ok)
    for c in ok:
        c.weight = (max(c.confidence, 0.0) / total) if total > 0 else 1.0 / len(ok)


def normalize_answer(text: str) -> str:
    """The form voting compares: lower case, citations (``[1]``, ``[expert: source]``) and punctuation
    removed, spaces collapsed."""
    t = re.sub(r"\[[^\]]*\]", " ", text.lower())
    t = re.sub(r"[^\w\s]", " ", t)
    return " ".join(t.split())


# ---------------------------------------------------------------------- strategies
def concatenate(s: Session) -> Synthesis:
    """Every expert answers; the answers are concatenated in routing order, each under its expert's name.

    Use it when you want all views side by side with clear attribution and no model in between.
    """
    cs = s.ask()
    ok = _ok(cs)
    text = _sections(ok, lambda c: f"confidence {c.confidence:.2f}") if ok else _none_answered(cs)
    return Synthesis(text, cs)


def weighted(s: Session) -> Synthesis:
    """Every expert answers; each answer gets the weight ``confidence / sum of confidences`` of the
    experts that answered, and the answers are shown by decreasing weight (``min_weight`` drops
    the lightest, default 0.05).

    ``mix_adapters=1``: when the chosen experts are LoRA adapters on one llama-server (backend
    ``llama_server``), one answer is generated with their adapters applied together, each at its
    scale x its weight (experts under ``min_weight`` left out, weights renormalised); otherwise the
    answers are combined as above and ``extra["mix_error"]`` says why they could not be mixed.

    The default: use it when several experts may be relevant and the router's confidence should
    decide what comes first.
    """
    min_w = float(s.options.get("min_weight", 0.05))
    mix_error = None
    if s.options.get("mix_adapters"):
        mixed, mix_error = _mixed(s, min_w)
        if mixed is not None:
            return mixed
    cs = s.ask()
    _weights(cs)
    ok = sorted(_ok(cs), key=lambda c: -(c.weight or 0.0))
    keep = [c for c in ok if (c.weight or 0.0) >= min_w] or ok[:1]
    text = _sections(keep, lambda c: f"weight {c.weight:.2f}") if keep else _none_answered(cs)
    extra: dict[str, Any] = {"weights": {c.expert: c.weight for c in ok}}
    if mix_error is not None:
        extra["mix_error"] = mix_error
    return Synthesis(text, cs, extra)


def _mixed(s: Session, min_w: float) -> tuple[Optional[Synthesis], Optional[str]]:
    """``weighted`` with ``mix_adapters``: one generation from the experts' adapters mixed by routing weight,
    or ``(None, why)`` when their generators cannot be mixed."""
    from ..generate import mix_adapters

    total = sum(max(sl.confidence, 0.0) for sl in s.slots)
    share = {sl.name: max(sl.confidence, 0.0) / total if total > 0 else 1.0 / len(s.slots) for sl in s.slots}
    keep = [sl for sl in s.slots if share[sl.name] >= min_w] or s.slots[:1]
    kept = sum(share[sl.name] for sl in keep)
    weights = {sl.name: share[sl.name] / kept if kept > 0 else 1.0 / len(keep) for sl in keep}
    try:
        gen = mix_adapters([(sl.generator, weights[sl.name]) for sl in keep])
    except ConfigError as e:
        return None, str(e)
    slot = Slot("+".join(sl.name for sl in keep), sum(sl.confidence for sl in keep),
                [h for sl in keep for h in sl.passages], gen)
    c = s.ask([slot], stream=True)[0]
    c.weight = 1.0
    text = c.answer if c.ok else _none_answered([c])
    return Synthesis(text, [c], {"weights": weights, "mixed": [sl.name for sl in keep]},
                     streamed=c.ok and s.on_token is not None), None


def best_only(s: Session) -> Synthesis:
    """Only the most confident expert answers (streamed); if it fails, the next one is asked, and so on.

    Use it when latency or cost matter and routing is reliable: one generation per question.
    """
    cs: list[Contribution] = []
    for slot in s.slots:
        c = s.ask([slot], stream=True)[0]
        cs.append(c)
        if c.ok:
            return Synthesis(c.answer, cs, {"chosen": c.expert}, streamed=s.on_token is not None)
    return Synthesis(_none_answered(cs), cs, {"chosen": None})


def llm_merge(s: Session) -> Synthesis:
    """Every expert answers, then the synthesizer generator (configurable: ``synthesizer=`` or the
    database's synthesizer, else the default generator) writes one answer from them (streamed).

    Use it when answers overlap or conflict and a model should reconcile them. If the synthesizer
    fails, the weighted combination is returned and the failure is reported in ``extra``.
    """
    cs = s.ask()
    ok = _ok(cs)
    if not ok:
        return Synthesis(_none_answered(cs), cs, {"synthesizer": None})
    t0 = time.perf_counter()
    m = s.merge([(c.expert, c.answer) for c in sorted(ok, key=lambda c: -c.confidence)])
    m.time = m.time or (time.perf_counter() - t0)
    extra = {"synthesizer": m.to_dict()}
    if m.ok:
        return Synthesis(m.answer, cs, extra, streamed=s.on_token is not None)
    fallback = weighted_text(cs)
    return Synthesis(fallback, cs, extra)


def weighted_text(cs: list[Contribution]) -> str:
    _weights(cs)
    ok = sorted(_ok(cs), key=lambda c: -(c.weight or 0.0))
    return _sections(ok, lambda c: f"weight {c.weight:.2f}") if ok else _none_answered(cs)


def debate(s: Session) -> Synthesis:
    """Round 1: every expert answers. Rounds 2..``rounds``: each expert sees the others' latest
    answers and revises its own. Exactly ``rounds`` rounds are run; the final round is combined
    as in ``weighted``.

    Use it for hard or contested questions where experts benefit from each other's answers;
    it costs ``rounds`` x experts generations.
    """
    all_cs = s.ask(rnd=1)
    latest = {c.expert: c for c in all_cs}
    for r in range(2, s.rounds + 1):
        hist = {slot.name: [(o.expert, o.answer) for o in latest.values() if o.ok and o.expert != slot.name]
                for slot in s.slots}
        cs = s.ask(rnd=r, history=hist, instruction=DEBATE_INSTRUCTION)
        all_cs += cs
        for c in cs:  # a failure in a later round keeps the expert's previous answer
            if c.ok or not latest[c.expert].ok:
                latest[c.expert] = c
    final = [latest[slot.name] for slot in s.slots]
    text = weighted_text(final)
    return Synthesis(text, all_cs, {"rounds": s.rounds,
                                    "final": {c.expert: c.answer for c in final if c.ok}})


def voting(s: Session) -> Synthesis:
    """Every expert answers; answers are compared after normalisation (case, punctuation, citations)
    and the most frequent wins (ties: higher summed routing confidence). ``extra["tally"]`` gives
    every distinct answer with its votes and voters.

    Use it for short answers (a name, a number, yes/no) where agreement is a signal of correctness.
    """
    cs = s.ask()
    groups: "OrderedDict[str, list[Contribution]]" = OrderedDict()
    for c in _ok(cs):
        groups.setdefault(normalize_answer(c.answer), []).append(c)
    if not groups:
        return Synthesis(_none_answered(cs), cs, {"tally": []})
    tally = sorted(groups.items(), key=lambda kv: (-len(kv[1]), -sum(c.confidence for c in kv[1])))
    winners = tally[0][1]
    best = max(winners, key=lambda c: c.confidence)
    extra = {"tally": [{"answer": max(v, key=lambda c: c.confidence).answer, "votes": len(v),
                        "experts": [c.expert for c in v]} for _, v in tally],
             "agreement": len(winners) / sum(len(v) for v in groups.values())}
    return Synthesis(best.answer, cs, extra, used=[c.expert for c in winners])


def cascade(s: Session) -> Synthesis:
    """Experts are asked one at a time in routing order; the first that answers with a score of at
    least ``min_score`` (default 0.3; the score of :meth:`Session.score`: similarity of the answer to
    the question and to the expert's passages) ends the cascade. Later experts are not asked. If none
    is good enough, the best-scored answer is returned and ``extra["accepted"]`` is ``None``.

    Use it to try cheap or specialised experts first and escalate only when needed.
    """
    min_score = float(s.options.get("min_score", 0.3))
    cs: list[Contribution] = []
    for slot in s.slots:
        c = s.ask([slot])[0]
        cs.append(c)
        if c.ok:
            s.score([c])
            if c.score is not None and c.score >= min_score:
                return Synthesis(c.answer, cs, {"accepted": c.expert, "tried": len(cs), "min_score": min_score})
    ok = _ok(cs)
    if not ok:
        return Synthesis(_none_answered(cs), cs, {"accepted": None, "tried": len(cs), "min_score": min_score})
    best = max(ok, key=lambda c: c.score if c.score is not None else -1.0)
    return Synthesis(best.answer, cs, {"accepted": None, "best": best.expert, "tried": len(cs),
                                       "min_score": min_score})


def best_of_n(s: Session) -> Synthesis:
    """Every expert answers ``n`` times (default 1; sample ``i`` uses seed + i), every answer is scored
    (similarity to the question and to the expert's passages) and the best is kept.
    ``extra["scores"]`` lists every candidate with its score.

    Use it when quality matters more than cost and answers vary (sampling temperature > 0, or
    experts of uneven quality).
    """
    n = int(s.options.get("n", 1))
    cs: list[Contribution] = []
    for i in range(n):
        cs += s.ask(sample=i)
    s.score(cs)
    ok = [c for c in cs if c.ok and c.score is not None]
    scores = [{"expert": c.expert, "sample": c.sample, "score": c.score} for c in cs if c.ok]
    if not ok:
        return Synthesis(_none_answered(cs), cs, {"scores": scores})
    best = max(ok, key=lambda c: c.score)
    return Synthesis(best.answer, cs, {"scores": scores, "best": {"expert": best.expert, "sample": best.sample}})


STRATEGIES: dict[str, Callable[[Session], Synthesis]] = {
    "concatenate": concatenate, "weighted": weighted, "best_only": best_only, "llm_merge": llm_merge,
    "debate": debate, "voting": voting, "cascade": cascade, "best_of_n": best_of_n,
}
OPTIONS: dict[str, dict[str, type]] = {
    "weighted": {"min_weight": float, "mix_adapters": int}, "cascade": {"min_score": float}, "best_of_n": {"n": int},
}
COLLABORATIONS = ("parallel", "sequential")


def check_strategy(strategy: Any, collaboration: Any = "parallel", rounds: Any = 1,
                   options: Optional[dict] = None) -> dict[str, Any]:
    """Validated ``{strategy, collaboration, rounds, options}``; :class:`ConfigError` names the bad field."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if collaboration not in COLLABORATIONS:
        raise ConfigError(f"collaboration: must be parallel or sequential, got {collaboration!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InvalidInput(f"rounds must be an integer >= 1, got {rounds!r}")
    if rounds != 1 and strategy != "debate":
        raise InvalidInput(f"rounds={rounds} only applies to the debate strategy, not {strategy!r}")
    opts = dict(options or {})
    allowed = OPTIONS.get(strategy, {})
    for k, v in opts.items():
        if k not in allowed:
            raise ConfigError(f"options.{k}: not an option of the {strategy} strategy"
                              + (f" (options: {', '.join(allowed)})" if allowed else " (it has none)"))
        typ = allowed[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and not isinstance(v, int)):
            raise ConfigError(f"options.{k}: must be {'an integer' if typ is int else 'a number'}, got {v!r}")
        if k == "n" and not (1 <= v <= 16):
            raise ConfigError(f"options.n: must be between 1 and 16, got {v}")
        if k == "mix_adapters" and v not in (0, 1):
            raise ConfigError(f"options.mix_adapters: must be 0 or 1, got {v}")
        opts[k] = typ(v)
    return {"strategy": strategy, "collaboration": collaboration, "rounds": rounds, "options": opts}
