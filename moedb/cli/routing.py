"""Commands that answer with passages: route (through the gate) and search (exhaustive).

This is the cold path a shell pays for on every query: rich tables are imported inside the commands.
"""
from __future__ import annotations

from typing import List, Optional

import typer

from ..errors import MoedbError
from .common import JSON_OPT, app, bar, console, emit_json, open_db


RETRIEVAL_OPT = typer.Option(None, "--retrieval", help="How passages are ranked: hybrid (BM25 + dense, fused "
                             "by reciprocal rank), dense or lexical (default: the database's setting).")


def _components(h) -> str:
    """A hit's score components as one cell: cosine and BM25 with their ranks."""
    c = h.components or {}
    parts = [f"{name} {c[name]:.3f} (#{c[name + '_rank']})" for name in ("dense", "lexical") if name in c]
    return ", ".join(parts) or "-"


def print_hits(hits, title: str = "passages", explain: bool = False) -> None:
    from rich.table import Table

    cols = ["#", "score", "expert", "passage", "source"] + (["components"] if explain else [])
    t = Table(*cols, title=title, title_justify="left")
    for i, h in enumerate(hits, 1):
        row = [str(i), f"{h.score:.3f}", h.expert, h.text[:160].replace("\n", " ") or f"(no text; id {h.id})",
               h.source or "inline text"]
        t.add_row(*(row + ([_components(h)] if explain else [])))
    console().print(t)


@app.command()
def route(ctx: typer.Context, query: str,
          top_k: int = typer.Option(2, "--top-k", help="How many experts at most."),
          k: int = typer.Option(5, "-k", help="How many passages."),
          min_confidence: Optional[float] = typer.Option(None, "--min-confidence",
                                                         help="Abstain below this (default: the database's)."),
          explain: bool = typer.Option(False, "--explain", help="Show each expert's score components."),
          context: List[str] = typer.Option(None, "--context", help="An earlier turn of the conversation "
                                            "(repeatable, oldest first)."),
          retrieval: Optional[str] = RETRIEVAL_OPT,
          json_out: bool = JSON_OPT) -> None:
    """Route a question to the best experts and show their best passages."""
    import time

    with open_db(ctx) as db:
        experts = db.experts()
        if not any(e.size for e in experts):
            raise MoedbError(f"{ctx.obj['db']} has no expert with documents yet: nothing to route to (add one "
                             "with `moedb add-expert NAME FILES`)" if experts else
                             f"{ctx.obj['db']} has no experts yet: nothing to route to (add one with "
                             "`moedb add-expert NAME FILES`)")
        t0 = time.perf_counter()
        db.embedder.embed(["warm up"])  # load the embedding model and the router first: the route's own time
        db.warm_router()            # is printed apart from what starting a process costs
        start_ms = (time.perf_counter() - t0) * 1000.0
        r = db.route(query, top_k=top_k, k=k, min_confidence=min_confidence, explain=explain,
                     context=list(context) if context else None, retrieval=retrieval)
    if json_out:
        emit_json(r.to_dict())
        return
    if r.abstained and r.refused_by:
        typer.echo(f"refused: the query looks like the out-of-scope examples in {r.refused_by!r} (abstained)")
    elif r.abstained:
        typer.echo("no expert fits this query: it does not look like any expert's documents (abstained)")
    else:
        print_experts(r)
        if r.path:
            typer.echo("path: " + " > ".join(r.path))
        print_hits(r.hits, explain=explain)
    if r.explanation:
        typer.echo(explanation_line(r.explanation))
    took = f"route {r.latency_ms:.1f} ms; loading the model and router {start_ms:.0f} ms"
    typer.echo(f"query id {r.query_id}  ({took})" if r.query_id else f"({took})")


def print_experts(r) -> None:
    """The chosen experts with a confidence bar and, with ``--explain``, each score component."""
    from rich.table import Table

    comp_names = sorted({c for e in r.experts for c in (e.components or {})})
    # the logit (``score``) is on a log scale: confidence = softmax of the logits, so it is shown only with
    # --explain, beside the components it is the sum of
    extra = ("logit", *comp_names) if comp_names else ()
    t = Table("expert", "confidence", "", *extra, title=f"experts for: {r.query}", title_justify="left")
    for e in r.experts:
        comps = [f"{(e.components or {}).get(c, float('nan')):+.3f}" for c in comp_names]
        t.add_row(e.name, bar(e.confidence), f"{e.confidence:.2f}", *((f"{e.score:+.3f}", *comps) if extra else ()))
    console().print(t)
    if extra:
        typer.echo("logit = centroid + gate + lexical (log scale, bias only ranks); confidence = softmax of the "
                   "logits over all experts")


def explanation_line(x: dict) -> str:
    best = x.get("best_rejected")
    if x.get("rule") == "scope":
        thr = x.get("scope_threshold")
        rule = (f"scope {x['scope']:+.2f} vs threshold {thr:+.2f} ({'below: abstained' if x['abstained'] else 'fits'})"
                if thr is not None and thr > float("-inf") else
                "no scope threshold (too few documents to calibrate one): never abstains")
    else:
        rule = f"confidence threshold {x['threshold']:.3f}"
    lines = [rule + (f" (best: {best['name']} at {best['confidence']:.3f})" if best else "")
             + f"; scored {x['experts_scored']} of {x['experts_total']} experts; mix "
             + ", ".join(f"{k} {v:.2f}" for k, v in x["mix"].items())
             + ("; words: " + ", ".join(t for t, _ in x["lexical_terms"]) if x["lexical_terms"] else "")]
    for d in x.get("dropped") or []:
        lines.append(f"dropped {d['name']}: {d['why']}")
    return "\n".join(lines)


@app.command()
def search(ctx: typer.Context, query: str, k: int = typer.Option(10, "-k", help="How many passages."),
           retrieval: Optional[str] = RETRIEVAL_OPT,
           explain: bool = typer.Option(False, "--explain", help="Show each passage's dense and BM25 scores."),
           json_out: bool = JSON_OPT) -> None:
    """Exhaustive search over every document (no routing)."""
    with open_db(ctx) as db:
        hits = db.search(query, k=k, retrieval=retrieval, explain=explain)
    if json_out:
        emit_json([h.to_dict() for h in hits])
    else:
        print_hits(hits, title=f"search: {query}", explain=explain)
