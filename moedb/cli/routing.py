"""Commands that answer with passages: route (through the gate) and search (exhaustive).

This is the cold path a shell pays for on every query: rich tables are imported inside the commands.
"""
from __future__ import annotations

from typing import List, Optional

import typer

from .common import JSON_OPT, app, bar, console, emit_json, open_db


def print_hits(hits, title: str = "passages") -> None:
    from rich.table import Table

    t = Table("#", "score", "expert", "passage", "source", title=title, title_justify="left")
    for i, h in enumerate(hits, 1):
        t.add_row(str(i), f"{h.score:.3f}", h.expert, h.text[:160].replace("\n", " "), h.source or h.id)
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
          json_out: bool = JSON_OPT) -> None:
    """Route a question to the best experts and show their best passages."""
    with open_db(ctx) as db:
        r = db.route(query, top_k=top_k, k=k, min_confidence=min_confidence, explain=explain,
                     context=list(context) if context else None)
    if json_out:
        emit_json(r.to_dict())
        return
    if r.abstained and r.refused_by:
        typer.echo(f"refused: the query looks like the out-of-scope examples in {r.refused_by!r} (abstained)")
    elif r.abstained:
        typer.echo("no expert is confident enough for this query (abstained)")
    else:
        print_experts(r)
        if r.path:
            typer.echo("path: " + " > ".join(r.path))
        print_hits(r.hits)
    if r.explanation:
        typer.echo(explanation_line(r.explanation))
    typer.echo(f"query id {r.query_id}  ({r.latency_ms:.1f} ms)" if r.query_id else f"({r.latency_ms:.1f} ms)")


def print_experts(r) -> None:
    """The chosen experts with a confidence bar and, with ``--explain``, each score component."""
    from rich.table import Table

    comp_names = sorted({c for e in r.experts for c in (e.components or {})})
    t = Table("expert", "confidence", "", "score", *comp_names, title=f"experts for: {r.query}",
              title_justify="left")
    for e in r.experts:
        comps = [f"{(e.components or {}).get(c, float('nan')):+.3f}" for c in comp_names]
        t.add_row(e.name, bar(e.confidence), f"{e.confidence:.2f}", f"{e.score:.3f}", *comps)
    console().print(t)


def explanation_line(x: dict) -> str:
    best = x.get("best_rejected")
    return (f"threshold {x['threshold']:.3f}"
            + (f" (best: {best['name']} at {best['confidence']:.3f})" if best else "")
            + f"; scored {x['experts_scored']} of {x['experts_total']} experts; mix "
            + ", ".join(f"{k} {v:.2f}" for k, v in x["mix"].items())
            + ("; words: " + ", ".join(t for t, _ in x["lexical_terms"]) if x["lexical_terms"] else ""))


@app.command()
def search(ctx: typer.Context, query: str, k: int = typer.Option(10, "-k", help="How many passages."),
           json_out: bool = JSON_OPT) -> None:
    """Exhaustive search over every document (no routing)."""
    with open_db(ctx) as db:
        hits = db.search(query, k=k)
    if json_out:
        emit_json([h.to_dict() for h in hits])
    else:
        print_hits(hits, title=f"search: {query}")
