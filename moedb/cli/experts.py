"""Commands that make and inspect experts: init, add-expert, add-docs, list, show, remove-expert."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from ..errors import MoedbError
from .common import JSON_OPT, REFIT_OPT, LazyBar, app, console, emit_json, open_db, skipped_files, warm_router


# how files become passages: one definition for add-expert and add-docs
CHUNK_SIZE_OPT = typer.Option(None, "--chunk-size", help="Max characters per passage (split by characters instead "
                              "of the embedder's tokens).")
CHUNK_TOKENS_OPT = typer.Option(None, "--chunk-tokens", help="Max embedder tokens per passage (default: 256, or the "
                                "embedder's limit).")
OVERLAP_OPT = typer.Option(None, "--overlap", help="Tokens repeated where a paragraph is cut (default 32).")


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
               chunk_size: Optional[int] = CHUNK_SIZE_OPT, chunk_tokens: Optional[int] = CHUNK_TOKENS_OPT,
               overlap: Optional[int] = OVERLAP_OPT,
               refuse: bool = typer.Option(False, "--refuse", help="A refusal expert: its documents are examples "
                                           "of queries no expert should answer; routes that match it abstain."),
               refit: bool = REFIT_OPT, json_out: bool = JSON_OPT) -> None:
    """Create an expert from files and/or inline texts."""
    if not paths and not text:
        raise MoedbError(f"add-expert {name}: give files or folders, or --text (an expert without documents "
                         "routes nothing)")
    pb = LazyBar(f"embedding {name}")
    with open_db(ctx, must_exist=False) as db:
        try:
            with skipped_files() as skipped:
                e = db.add_expert(name, list(text or []), files=list(paths) if paths else None,
                                  chunk_size=chunk_size, chunk_tokens=chunk_tokens, overlap=overlap,
                                  description=description, keywords=keyword or [],
                                  parent=parent, progress=pb, refuse=refuse)
        finally:
            pb.close()
        warm_router(db, refit)
    if json_out:
        emit_json({**e.to_dict(), "skipped": skipped})
    else:
        typer.echo(f"added {'refusal ' if e.refuse else ''}expert {e.name!r} with {plural(e.size, 'passage')}")


@app.command("add-docs")
def add_docs(ctx: typer.Context, name: str, paths: List[str] = typer.Argument(..., help="Files or directories."),
             chunk_size: Optional[int] = CHUNK_SIZE_OPT, chunk_tokens: Optional[int] = CHUNK_TOKENS_OPT,
             overlap: Optional[int] = OVERLAP_OPT,
             on_conflict: str = typer.Option("error", "--on-conflict", help="error | skip | replace"),
             refit: bool = REFIT_OPT, json_out: bool = JSON_OPT) -> None:
    """Add files' passages to an existing expert."""
    pb = LazyBar(f"embedding {name}")
    with open_db(ctx) as db:
        try:
            with skipped_files() as skipped:
                n = db.add_files(name, paths, chunk_size=chunk_size, chunk_tokens=chunk_tokens, overlap=overlap,
                                 on_conflict=on_conflict, progress=pb)
        finally:
            pb.close()
        size = db.expert(name).size
        warm_router(db, refit)
    if json_out:
        emit_json({"expert": name, "added": n, "size": size, "skipped": skipped})
    else:
        typer.echo(f"added {plural(n, 'passage')} to {name!r} (now {size})")


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


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


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
        # (a passage of a file is named source#position already: no second copy of it)
        where = f"{d['source']}#{d['position']}"
        src = f"  [{where}]" if d["source"] and d["id"] != where else ""
        typer.echo(f"  - {d['id']}{src}: {d['text'][:100]!r}" if d["text"] else f"  - {d['id']}{src}: (no text)")


@app.command("remove-expert")
def remove_expert(ctx: typer.Context, name: str) -> None:
    """Delete an expert and its documents."""
    with open_db(ctx) as db:
        children = [e.name for e in db.experts() if e.parent == name]
        db.remove_expert(name)
    typer.echo(f"removed expert {name!r}" + (f"; its children ({', '.join(children)}) are now top-level experts"
                                               if children else ""))
