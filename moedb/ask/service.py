"""Asking: routed context reaches generation experts, and a synthesizer makes one answer.

:meth:`Generation.ask` routes the question, gives each chosen expert its own retrieved passages, runs the
experts' generators (concurrently, grouped per model/adapter, or in turn) and combines their answers with
one of the strategies of :mod:`moedb.ask.synth`. Generator configurations are validated when they are set
(:mod:`moedb.generate`).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..engine.catalog import Catalog
from ..engine.embedding import FileEmbedder
from ..engine.retrieval import Retrieval
from ..engine.route import RouteService
from ..errors import ConfigError, InvalidInput
from ..generate import GenerationError, GenRequest, effective_config, make_generator, validate_config
from ..generate.runner import run_batch
from ..store import Store
from .answer import Answer, Citation, answer_scores, token_usage
from .synth import STRATEGIES, Contribution, Session, Slot, check_strategy, failed_text

ABSTAIN_TEXT = ("No expert is confident enough to answer this question (the router abstained). "
                "Configure a fallback generator (`moedb set-generator --fallback ...`) to answer anyway.")
BUILTIN_ASK = {"top_k": 2, "k": 3, "strategy": "weighted", "collaboration": "parallel", "rounds": 1, "options": {}}


class Generation:
    """Generator settings and :meth:`ask` for one file."""

    def __init__(self, store: Store, catalog: Catalog, embedding: FileEmbedder, router: RouteService,
                 retrieval: Retrieval):
        self.store = store
        self.catalog = catalog
        self.embedding = embedding
        self.router = router
        self.retrieval = retrieval

    def set_generator(self, name: str, generator: Optional[dict]) -> dict:
        """Set (or with ``None`` clear) an expert's generator; validated now. Returns the stored config."""
        row = self.catalog.require(name)
        cfg = validate_config(generator, expert=name) if generator is not None else None
        self.store.experts.update(row["id"], generator=cfg)
        self.catalog.touch()
        return cfg

    def set_synthesizer(self, generator: Optional[dict]) -> None:
        """The generator ``llm_merge`` uses to merge answers (default: the database default generator)."""
        self._set_meta_generator("synthesizer", generator)

    def set_fallback_generator(self, generator: Optional[dict]) -> None:
        """The generator that answers (without passages) when routing abstains."""
        self._set_meta_generator("fallback_generator", generator)

    def _set_meta_generator(self, key: str, generator: Optional[dict]) -> None:
        cfg = validate_config(generator) if generator is not None else None
        if cfg is not None and not cfg.get("backend"):
            raise ConfigError(f"generator.backend: the {key.replace('_', ' ')} needs a backend")
        self.store.set_meta(key, cfg)

    def set_ask_defaults(self, **defaults: Any) -> dict[str, Any]:
        """Database defaults of :meth:`ask` (``strategy``, ``collaboration``, ``rounds``, ``top_k``, ``k``,
        ``options``), validated now. Returns the merged defaults."""
        unknown = set(defaults) - set(BUILTIN_ASK)
        if unknown:
            raise ConfigError(f"{sorted(unknown)[0]}: not an ask default (choose from {', '.join(BUILTIN_ASK)})")
        cur = {**self.ask_defaults(), **defaults}
        check_strategy(cur["strategy"], cur["collaboration"], cur["rounds"], cur["options"])
        for key in ("top_k", "k"):
            v = cur[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key}: must be an integer >= 1, got {v!r}")
        self.store.set_meta("ask_defaults", {k: cur[k] for k in BUILTIN_ASK})
        return cur

    def ask_defaults(self) -> dict[str, Any]:
        return {**BUILTIN_ASK, **(self.store.get_meta("ask_defaults") or {})}

    def generator_config(self, name: Optional[str] = None) -> dict:
        """The effective generator of an expert (its own, its overlay on the default, or the default)."""
        own = self.catalog.require(name)["generator"] if name is not None else None
        return effective_config(own, self.store.get_meta("generator"))

    def ask(self, query: str, top_k: Optional[int] = None, strategy: Optional[str] = None,
            collaboration: Optional[str] = None, rounds: Optional[int] = None, *, k: Optional[int] = None,
            min_confidence: Optional[float] = None, options: Optional[dict] = None,
            synthesizer: Optional[dict] = None, fallback: Optional[dict] = None,
            stream: Optional[Callable[[str], None]] = None, context: Optional[Sequence[str]] = None) -> Answer:
        """Answer ``query`` with the routed experts and a synthesizer strategy.

        Defaults (unless changed with :meth:`set_ask_defaults`): ``top_k=2`` experts, ``k=3``
        passages each, ``strategy="weighted"``, ``collaboration="parallel"``, ``rounds=1`` (debate
        only). ``options``: strategy options (``min_score`` for cascade, ``n`` for best_of_n,
        ``min_weight`` for weighted). ``synthesizer`` / ``fallback``: generator configs overriding
        the stored ones for this call. ``stream(text)`` receives the final stage's tokens as they
        are generated (or the final text in one piece when it is composed from several answers).
        ``context``: earlier turns of the conversation (oldest first), used by routing and retrieval as in
        :meth:`moedb.Database.route`.
        """

        t_start = time.perf_counter()
        d = self.ask_defaults()
        top_k = d["top_k"] if top_k is None else top_k
        k = d["k"] if k is None else k
        strategy = d["strategy"] if strategy is None else strategy
        same = strategy == d["strategy"]  # stored rounds/options belong to the stored strategy
        plan = check_strategy(strategy, d["collaboration"] if collaboration is None else collaboration,
                              rounds if rounds is not None else (d["rounds"] if same else 1),
                              options if options is not None else (d["options"] if same else {}))
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise InvalidInput(f"k must be an integer >= 1, got {k!r}")
        syn_cfg = validate_config(synthesizer) if synthesizer is not None else None
        fb_cfg = validate_config(fallback) if fallback is not None else None
        if not isinstance(query, str) or not query.strip():
            raise InvalidInput("query is empty")

        t0 = time.perf_counter()
        r = self.router.route(query, top_k=top_k, k=k * top_k, min_confidence=min_confidence, context=context)
        route_ms = (time.perf_counter() - t0) * 1000.0
        t0 = time.perf_counter()
        by_expert: dict[str, list] = {e.name: [] for e in r.experts}
        for h in r.hits:
            if h.expert in by_expert and len(by_expert[h.expert]) < k:
                by_expert[h.expert].append(h)
        for e in r.experts:  # an expert crowded out of the shared top list gets its own search
            size = self.catalog.by_name[e.name]["size"] if e.name in self.catalog.by_name else 0
            if len(by_expert[e.name]) < min(k, size):
                by_expert[e.name] = self.retrieval.search(query, k=k, experts=[e.name])
        retrieval_ms = (time.perf_counter() - t0) * 1000.0

        default_cfg = self.store.get_meta("generator")
        experts_info = [e.to_dict() for e in r.experts]
        common = dict(query=query, strategy=plan["strategy"], collaboration=plan["collaboration"],
                      experts=experts_info, query_id=r.query_id)
        if r.abstained or not r.experts:
            fb = fb_cfg or self.store.get_meta("fallback_generator")
            return self._abstain(query, fb, stream, common, route_ms, retrieval_ms, t_start)


        slots = [Slot(e.name, float(e.confidence), by_expert[e.name],
                      make_generator(effective_config(self.catalog.by_name[e.name]["generator"], default_cfg)))
                 for e in r.experts]
        syn = syn_cfg or self.store.get_meta("synthesizer") or effective_config(None, default_cfg)
        session = Session(query, slots, collaboration=plan["collaboration"], rounds=plan["rounds"],
                          options=plan["options"], run=lambda jobs, par: run_batch(jobs, parallel=par),
                          scorer=lambda q, a, p: answer_scores(self.embedding.embed, q, a, p),
                          synthesizer=make_generator(syn), on_token=stream)
        t0 = time.perf_counter()
        syn_out = STRATEGIES[plan["strategy"]](session)
        strat_s = time.perf_counter() - t0
        if not any(c.ok and c.role == "expert" for c in syn_out.contributions):
            # every expert that fits failed: say so (which and why); answer anyway only from a fallback
            # generator the caller configured, never from an expert routing dropped
            syn_out.text = failed_text(syn_out.contributions)
            syn_out.extra["failed"] = [c.expert for c in syn_out.contributions if c.role == "expert"]
            fb = fb_cfg or self.store.get_meta("fallback_generator")
            if fb:
                c = self._fallback(query, fb, None)
                syn_out.contributions.append(c)
                syn_out.extra["fallback"] = True
                if c.ok:
                    syn_out.text += "\n\nA general answer (the fallback generator, without passages):\n" + c.answer
        if stream is not None and not syn_out.streamed:
            stream(syn_out.text)
        contributions = syn_out.contributions
        synth_c = syn_out.extra.get("synthesizer") if plan["strategy"] == "llm_merge" else None
        gen_ms = session.gen_seconds * 1000.0
        latency = {"route_ms": route_ms, "retrieval_ms": retrieval_ms, "generation_ms": gen_ms,
                   "synthesis_ms": max(strat_s * 1000.0 - gen_ms, 0.0),
                   "total_ms": (time.perf_counter() - t_start) * 1000.0}
        return Answer(text=syn_out.text, contributions=contributions,
                      citations=self._citations(syn_out.text, contributions, syn_out.used), usage=token_usage(contributions, synth_c),
                      latency=latency, extra=syn_out.extra, **common)

    def _abstain(self, query: str, fb: Optional[dict], stream, common: dict, route_ms: float, retrieval_ms: float,
                 t_start: float) -> Answer:

        contributions: list[Contribution] = []
        text = ABSTAIN_TEXT
        t0 = time.perf_counter()
        streamed = False
        if fb:
            c = self._fallback(query, fb, stream)
            streamed = stream is not None and c.error is None
            if c.ok:
                text = c.answer
            contributions.append(c)
        if stream is not None and not streamed:
            stream(text)
        gen_ms = (time.perf_counter() - t0) * 1000.0
        latency = {"route_ms": route_ms, "retrieval_ms": retrieval_ms, "generation_ms": gen_ms, "synthesis_ms": 0.0,
                   "total_ms": (time.perf_counter() - t_start) * 1000.0}
        return Answer(text=text, contributions=contributions, citations=[], usage=token_usage(contributions, None),
                      latency=latency, abstained=True, extra={"fallback": bool(fb)}, **common)

    @staticmethod
    def _fallback(query: str, fb: dict, stream) -> Contribution:
        """The fallback generator's answer to ``query`` (no passages), as a ``role="fallback"`` contribution."""
        gen = make_generator(fb)
        try:
            g = gen.generate(GenRequest(query=query, expert="general", role="fallback"), on_token=stream)
        except GenerationError as e:
            return Contribution(expert="fallback", ok=False, error=str(e), timed_out=e.timed_out,
                                backend=gen.backend, role="fallback")
        return Contribution(expert="fallback", answer=g.text, tokens=g.completion_tokens,
                            prompt_tokens=g.prompt_tokens, time=g.seconds, ok=bool(g.text.strip()),
                            backend=gen.backend, attempts=g.attempts, role="fallback")

    @staticmethod
    def _citations(text: str, contributions: list[Contribution], used_experts: Optional[list[str]] = None
                   ) -> list[Citation]:
        """Passages of the answers the final text stands on: the strategy's ``used`` experts, else the
        answers quoted in the text, else every successful answer."""
        ok = [c for c in contributions if c.ok and c.role == "expert"]
        if used_experts is not None:
            used = [c for c in ok if c.expert in used_experts]
        else:
            used = [c for c in ok if c.answer and c.answer in text] or ok
        seen, out = set(), []
        for c in used:
            for h in c.citations:
                key = (h["expert"], h["id"])
                if key not in seen:
                    seen.add(key)
                    out.append(Citation(h["expert"], h["id"], h["source"], h["score"]))
        out.sort(key=lambda c: -c.score)
        return out
