"""Commands that make and inspect experts: init, add-expert, add-docs, list, show, remove-expert."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from .common import JSON_OPT, REFIT_OPT, LazyBar, app, console, emit_json, open_db, warm_router


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
    pb = LazyBar(f"embedding {name}")
    with open_db(ctx, must_exist=False) as db:
        try:
            e = db.add_expert(name, list(text or []), files=list(paths) if paths else None, chunk_size=chunk_size,
                              description=description, keywords=keyword or [], parent=parent, progress=pb,
                              refuse=refuse)
        finally:
            pb.close()
        warm_router(db, refit)
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
    pb = LazyBar(f"embedding {name}")
    with open_db(ctx) as db:
        try:
            n = db.add_files(name, paths, chunk_size=chunk_size, on_conflict=on_conflict, progress=pb)
        finally:
            pb.close()
        size = db.expert(name).size
        warm_router(db, refit)
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
    elif not experts:
        typer.echo("no experts yet (add one with `moedb add-expert NAME PATH`)")
    elif tree:
        print_tree(experts, ctx.obj["db"])
    else:
        from rich.table import Table

        t = Table("expert", "docs", "parent", "keywords", "description")
        for e in experts:
            t.add_row(e.name + (" (refuses)" if e.refuse else ""), str(e.size), e.parent or "",
                      ", ".join(e.keywords), e.description[:60])
        console().print(t)


def print_tree(experts, title: str) -> None:
    from rich.tree import Tree

    children: dict = {}
    for e in experts:
        children.setdefault(e.parent, []).append(e)
    root = Tree(f"[bold]{title}[/bold]")

    def grow(node, parent):
        for e in children.get(parent, []):
            role = ", refuses" if e.refuse else ""
            grow(node.add(f"{e.name} [dim]({e.size} docs{role})[/dim]"), e.name)

    grow(root, None)
    console().print(root)


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
    role = "; a refusal expert: routes that match it abstain" if e.refuse else ""
    typer.echo(f"{e.name}  ({e.size} documents{role})")
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
