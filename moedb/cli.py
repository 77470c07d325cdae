"""The ``moedb`` command: a thin typer layer, each command one library call.

Library errors become a one-line ``error: ...`` on stderr and exit code 1.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, List, Optional

import typer

from .errors import MoedbError

app = typer.Typer(help="moedb: an embedded mixture-of-experts retrieval engine in one SQLite file.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

JSON_OPT = typer.Option(False, "--json", help="Machine-readable JSON output.")
REFIT_OPT = typer.Option(True, "--refit/--no-refit",
                         help="Fit the router now, so the next `moedb route` does not pay for it.")


def refit_now(db, refit: bool) -> None:
    """After a change of experts, fit the gate while the user is already waiting on a write."""
    if refit:
        from rich.console import Console

        with Console(stderr=True).status("fitting the router"):
            db.refit_router(recalibrate=False)  # what the next route would do; a full calibration when due


@app.callback()
def _global(ctx: typer.Context,
            db: str = typer.Option("./moedb.db", "--db", envvar="MOEDB_DB", help="Database file.")) -> None:
    ctx.obj = {"db": db}


def open_db(ctx: typer.Context, must_exist: bool = True):
    """Open the database named by ``--db``; a missing file is an error except for ``init``."""
    path = ctx.obj["db"]
    if must_exist and path != ":memory:" and not os.path.exists(path):
        raise MoedbError(f"no database at {path!r} (run `moedb init` or pass --db)")
    import moedb

    return moedb.connect(path)


def console():
    from rich.console import Console

    return Console()


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def bar(value: float, width: int = 20) -> str:
    value = min(max(value, 0.0), 1.0)
    full = int(round(value * width))
    return "█" * full + "░" * (width - full)


class progress_bar:
    """A rich progress bar usable as the library's ``progress(done, total)`` callback (stderr)."""

    def __init__(self, label: str):
        self.label = label
        self._p = None
        self._task = None

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self._p = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self._p.__enter__()
        self._task = self._p.add_task(self.label, total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        self._p.update(self._task, completed=done, total=total)

    def __exit__(self, *exc):
        self._p.__exit__(*exc)


# ---------------------------------------------------------------------- commands
@app.command()
def init(ctx: typer.Context, json_out: bool = JSON_OPT) -> None:
    """Create the database file (or check an existing one) and print its summary."""
    with open_db(ctx, must_exist=False) as db:
        info = db.info()
    if json_out:
        emit_json(info)
    else:
        emb = info["embedder"]
        typer.echo(f"{info['path']}: schema v{info['schema_version']}, embedder {emb['name']} "
                   f"(dim {emb['dim']}), {info['experts']} experts, {info['documents']} documents")


@app.command("add-expert")
def add_expert(ctx: typer.Context, name: str,
               paths: List[str] = typer.Argument(None, help="Files or directories (.txt, .md, .jsonl)."),
               text: List[str] = typer.Option(None, "--text", help="A document given inline (repeatable)."),
               description: str = typer.Option("", "--description"),
               keyword: List[str] = typer.Option(None, "--keyword", help="Keyword (repeatable)."),
               parent: Optional[str] = typer.Option(None, "--parent"),
               chunk_size: int = typer.Option(1000, "--chunk-size", help="Max characters per passage."),
               refuse: bool = typer.Option(False, "--refuse", help="A refusal expert: its documents are examples "
                                           "of queries no expert should answer; routes that match it abstain."),
               refit: bool = REFIT_OPT, json_out: bool = JSON_OPT) -> None:
    """Create an expert from files and/or inline texts."""
    from .chunk import iter_files, read_passages

    docs: list = list(text or [])
    for f in iter_files(list(paths or [])):
        docs += list(read_passages(f, chunk_size))
    with open_db(ctx, must_exist=False) as db:
        with progress_bar(f"embedding {name}") as pb:
            e = db.add_expert(name, docs, description=description, keywords=keyword or [], parent=parent,
                              progress=pb, refuse=refuse)
        refit_now(db, refit)
    if json_out:
        emit_json(e.to_dict())
    else:
        typer.echo(f"added {'refusal ' if e.refuse else ''}expert {e.name!r} with {e.size} passages")


@app.command("add-docs")
def add_docs(ctx: typer.Context, name: str, paths: List[str] = typer.Argument(..., help="Files or directories."),
             chunk_size: int = typer.Option(1000, "--chunk-size"),
             on_conflict: str = typer.Option("error", "--on-conflict", help="error | skip | replace"),
             refit: bool = REFIT_OPT, json_out: bool = JSON_OPT) -> None:
    """Add files' passages to an existing expert."""
    with open_db(ctx) as db:
        with progress_bar(f"embedding {name}") as pb:
            n = db.add_files(name, paths, chunk_size=chunk_size, on_conflict=on_conflict, progress=pb)
        size = db.expert(name).size
        refit_now(db, refit)
    if json_out:
        emit_json({"expert": name, "added": n, "size": size})
    else:
        typer.echo(f"added {n} passages to {name!r} (now {size})")


@app.command("list")
def list_experts(ctx: typer.Context, tree: bool = typer.Option(False, "--tree", help="Draw the hierarchy."),
                 json_out: bool = JSON_OPT) -> None:
    """List experts."""
    with open_db(ctx) as db:
        experts = db.experts()
    if json_out:
        emit_json([e.to_dict() for e in experts])
        return
    if not experts:
        typer.echo("no experts yet (add one with `moedb add-expert NAME PATH`)")
        return
    if tree:
        from rich.tree import Tree

        children: dict = {}
        for e in experts:
            children.setdefault(e.parent, []).append(e)
        root = Tree(f"[bold]{ctx.obj['db']}[/bold]")

        def grow(node, parent):
            for e in children.get(parent, []):
                role = ", refuses" if e.refuse else ""
                grow(node.add(f"{e.name} [dim]({e.size} docs{role})[/dim]"), e.name)

        grow(root, None)
        console().print(root)
        return
    from rich.table import Table

    t = Table("expert", "docs", "parent", "keywords", "description")
    for e in experts:
        t.add_row(e.name + (" (refuses)" if e.refuse else ""), str(e.size), e.parent or "", ", ".join(e.keywords),
                  e.description[:60])
    console().print(t)


@app.command()
def show(ctx: typer.Context, name: str, docs: int = typer.Option(5, "--docs", help="How many documents to show."),
         json_out: bool = JSON_OPT) -> None:
    """Show one expert and its first documents."""
    with open_db(ctx) as db:
        e = db.expert(name)
        sample = db.documents(name, limit=docs)
    if json_out:
        emit_json({**e.to_dict(), "documents": sample})
        return
    typer.echo(f"{e.name}  ({e.size} documents{'; a refusal expert: routes that match it abstain' if e.refuse else ''})")
    for label, value in (("description", e.description), ("keywords", ", ".join(e.keywords)),
                         ("parent", e.parent or ""), ("metadata", json.dumps(e.metadata) if e.metadata else "")):
        if value:
            typer.echo(f"  {label}: {value}")
    for d in sample:
        src = f"  [{d['source']}#{d['position']}]" if d["source"] else ""
        typer.echo(f"  - {d['id']}{src}: {d['text'][:100]!r}")


@app.command("remove-expert")
def remove_expert(ctx: typer.Context, name: str) -> None:
    """Delete an expert and its documents."""
    with open_db(ctx) as db:
        db.remove_expert(name)
    typer.echo(f"removed expert {name!r}")


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
    from rich.table import Table

    if r.abstained and r.refused_by:
        typer.echo(f"refused: the query looks like the out-of-scope examples in {r.refused_by!r} (abstained)")
    elif r.abstained:
        typer.echo("no expert is confident enough for this query (abstained)")
    else:
        cols = ["expert", "confidence", "", "score"]
        comp_names = sorted({c for e in r.experts for c in (e.components or {})})
        t = Table(*cols, *comp_names, title=f"experts for: {r.query}", title_justify="left")
        for e in r.experts:
            comps = [f"{(e.components or {}).get(c, float('nan')):+.3f}" for c in comp_names]
            t.add_row(e.name, bar(e.confidence), f"{e.confidence:.2f}", f"{e.score:.3f}", *comps)
        console().print(t)
        if r.path:
            typer.echo("path: " + " > ".join(r.path))
        print_hits(r.hits)
    if r.explanation:
        x = r.explanation
        best = x.get("best_rejected")
        typer.echo(f"threshold {x['threshold']:.3f}" + (f" (best: {best['name']} at {best['confidence']:.3f})" if best
                                                         else "") +
                   f"; scored {x['experts_scored']} of {x['experts_total']} experts; mix " +
                   ", ".join(f"{k} {v:.2f}" for k, v in x["mix"].items()) +
                   ("; words: " + ", ".join(t for t, _ in x["lexical_terms"]) if x["lexical_terms"] else ""))
    typer.echo(f"query id {r.query_id}  ({r.latency_ms:.1f} ms)" if r.query_id else f"({r.latency_ms:.1f} ms)")


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


def _load_extensions() -> None:
    """Register commands that live in other modules (lifecycle, generation) if present."""
    import importlib

    for mod in ("moedb.cli_ops", "moedb.cli_gen"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    import click

    _load_extensions()
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="moedb")
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except MoedbError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
