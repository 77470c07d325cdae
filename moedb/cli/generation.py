"""Commands of the generation area: ``moedb ask``, ``set-generator``, ``set-strategy``, ``apply``.

Each command is one library call plus formatting."""
from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from ..errors import ConfigError
from .common import JSON_OPT, REFIT_OPT, app, bar, console, emit_json, open_db, skipped_files, warm_router


def parse_pairs(pairs: Optional[List[str]], what: str) -> dict:
    """``key=value`` strings to a dict; values are parsed as JSON when possible (numbers, lists)."""
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ConfigError(f"{what} {p!r}: expected key=value")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except ValueError:
            out[k.strip()] = v
    return out


@app.command()
def ask(ctx: typer.Context, query: str,
        strategy: Optional[str] = typer.Option(None, "--strategy", "-s",
                                               help="concatenate | weighted | best_only | llm_merge | debate | "
                                                    "voting | cascade | best_of_n (default: the database's)."),
        top_k: Optional[int] = typer.Option(None, "--top-k", help="How many experts at most."),
        k: Optional[int] = typer.Option(None, "-k", help="Passages per expert."),
        collaboration: Optional[str] = typer.Option(None, "--collaboration", help="parallel | sequential"),
        rounds: Optional[int] = typer.Option(None, "--rounds", help="Debate rounds."),
        min_confidence: Optional[float] = typer.Option(None, "--min-confidence", help="Abstain below this."),
        option: List[str] = typer.Option(None, "--option", "-o",
                                         help="Strategy option key=value (min_score, n, min_weight); repeatable."),
        stream: bool = typer.Option(False, "--stream", help="Print tokens as they are generated."),
        json_out: bool = JSON_OPT) -> None:
    """Answer a question with the routed experts' generators and a synthesizer strategy."""
    out = sys.stderr if json_out else sys.stdout

    def on_token(piece: str) -> None:
        out.write(piece)
        out.flush()

    with open_db(ctx) as db:
        a = db.ask(query, top_k=top_k, strategy=strategy, collaboration=collaboration, rounds=rounds, k=k,
                   min_confidence=min_confidence, options=parse_pairs(option, "--option") or None,
                   stream=on_token if stream else None)
    if stream:
        out.write("\n")
        out.flush()
    if json_out:
        emit_json(a.to_dict())
        return
    if not stream:
        typer.echo(a.text)
    print_answer_details(a)


def print_answer_details(a) -> None:
    from rich.table import Table

    con = console()
    if a.contributions:
        t = Table("expert", "backend", "round", "confidence", "", "tokens", "time", "status",
                  title=f"{a.strategy} ({a.collaboration})", title_justify="left")
        for c in a.contributions:
            status = "ok" if c.ok else ("timeout: " if c.timed_out else "failed: ") + (c.error or "")[:70]
            if c.score is not None:
                status += f" (score {c.score:.2f})"
            t.add_row(c.expert, c.backend, str(c.round), f"{c.confidence:.2f}", bar(c.confidence, 10),
                      str(c.tokens), f"{c.time * 1000:.0f} ms", status)
        con.print(t)
    for key in ("tally", "scores"):
        if a.extra.get(key):
            typer.echo(f"{key}: " + json.dumps(a.extra[key], ensure_ascii=False))
    if a.citations:
        typer.echo("sources: " + "; ".join(f"{c.expert}: {c.source or c.id}" for c in a.citations[:8]))
    lat = a.latency
    typer.echo(f"{lat['total_ms']:.0f} ms (route {lat['route_ms']:.0f}, generation {lat['generation_ms']:.0f}, "
               f"synthesis {lat['synthesis_ms']:.0f}); {a.usage['total_tokens']} tokens in "
               f"{a.usage['generations']} generations")


@app.command("set-generator")
def set_generator(ctx: typer.Context,
                  name: Optional[str] = typer.Argument(None, help="Expert name (omit with --default, --fallback, "
                                                                  "--synthesizer)."),
                  backend: Optional[str] = typer.Option(None, "--backend", help="extractive | llama | mlx | openai"),
                  model: Optional[str] = typer.Option(None, "--model", help="GGUF file, mlx folder, or server model"),
                  lora: Optional[str] = typer.Option(None, "--lora", help="LoRA adapter GGUF (llama)."),
                  adapter_path: Optional[str] = typer.Option(None, "--adapter-path", help="mlx adapter folder."),
                  base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible server URL."),
                  api_key_env: Optional[str] = typer.Option(None, "--api-key-env",
                                                            help="Name of the env variable holding the API key."),
                  system_prompt: Optional[str] = typer.Option(None, "--system-prompt"),
                  max_tokens: Optional[int] = typer.Option(None, "--max-tokens"),
                  temperature: Optional[float] = typer.Option(None, "--temperature"),
                  timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds per attempt."),
                  retries: Optional[int] = typer.Option(None, "--retries"),
                  extra: List[str] = typer.Option(None, "--set", help="Any other field key=value; repeatable."),
                  default: bool = typer.Option(False, "--default", help="Set the database default generator."),
                  fallback: bool = typer.Option(False, "--fallback", help="Set the generator used on abstention."),
                  synthesizer: bool = typer.Option(False, "--synthesizer", help="Set llm_merge's synthesizer."),
                  clear: bool = typer.Option(False, "--clear", help="Remove the generator instead."),
                  json_out: bool = JSON_OPT) -> None:
    """Set an expert's generator (or the database default, fallback or synthesizer), validated now."""
    roles = [r for r, on in (("default", default), ("fallback", fallback), ("synthesizer", synthesizer)) if on]
    if len(roles) > 1 or (roles and name) or (not roles and not name):
        raise ConfigError("give an expert NAME, or exactly one of --default, --fallback, --synthesizer")
    cfg = {k: v for k, v in {
        "backend": backend, "model": model, "lora": lora, "adapter_path": adapter_path, "base_url": base_url,
        "api_key_env": api_key_env, "system_prompt": system_prompt, "max_tokens": max_tokens,
        "temperature": temperature, "timeout": timeout, "retries": retries}.items() if v is not None}
    cfg.update(parse_pairs(extra, "--set"))
    if clear and cfg:
        raise ConfigError("--clear takes no generator fields")
    if not clear and not cfg:
        raise ConfigError("nothing to set (give --backend and its fields, or --clear)")
    value = None if clear else cfg
    with open_db(ctx) as db:
        target = roles[0] if roles else name
        if roles == ["default"]:
            db.set_default_generator(value)  # None clears it
        elif roles == ["fallback"]:
            db.set_fallback_generator(value)
        elif roles == ["synthesizer"]:
            db.set_synthesizer(value)
        else:
            db.set_generator(name, value)
        effective = db.generator_config(name) if name else value
    if json_out:
        emit_json({"target": target, "generator": effective})
    else:
        typer.echo(f"{target}: " + ("generator cleared" if value is None else json.dumps(effective)))


@app.command("set-strategy")
def set_strategy(ctx: typer.Context, strategy: str = typer.Argument(..., help="Default synthesizer strategy."),
                 collaboration: Optional[str] = typer.Option(None, "--collaboration"),
                 rounds: Optional[int] = typer.Option(None, "--rounds"),
                 top_k: Optional[int] = typer.Option(None, "--top-k"),
                 k: Optional[int] = typer.Option(None, "-k"),
                 option: List[str] = typer.Option(None, "--option", "-o", help="key=value; repeatable."),
                 json_out: bool = JSON_OPT) -> None:
    """Set the database's default ask strategy (validated now)."""
    kw = {key: v for key, v in {"strategy": strategy, "collaboration": collaboration, "rounds": rounds,
                                "top_k": top_k, "k": k}.items() if v is not None}
    kw["options"] = parse_pairs(option, "--option")
    with open_db(ctx) as db:
        d = db.set_ask_defaults(**kw)
    if json_out:
        emit_json(d)
    else:
        typer.echo("ask defaults: " + json.dumps(d))


@app.command()
def apply(ctx: typer.Context, directory: str = typer.Argument(..., help="Folder of YAML expert files."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; write nothing."),
          refit: bool = REFIT_OPT, json_out: bool = JSON_OPT) -> None:
    """Create or update experts from a folder of YAML files (idempotent)."""
    with open_db(ctx, must_exist=False) as db, skipped_files():
        rep = db.apply_dir(directory, dry_run=dry_run)
        if not dry_run and (rep["created"] or rep["updated"]):
            warm_router(db, refit)  # the end of a bulk build: the next `moedb route` loads the fitted router
    if json_out:
        emit_json(rep)
        return
    prefix = "would be " if dry_run else ""
    for action in ("created", "updated", "unchanged"):
        for name in rep[action]:
            d = rep["details"][name]
            docs = f" (+{d['added']} ~{d['changed']} -{d['removed']} passages)" if action != "unchanged" else ""
            fields = f" [{', '.join(d['fields'])}]" if d["fields"] and action == "updated" else ""
            typer.echo(f"{prefix}{action}: {name}{fields}{docs}")
    typer.echo(f"{len(rep['created'])} {prefix}created, {len(rep['updated'])} {prefix}updated, "
               f"{len(rep['unchanged'])} unchanged" + (" (dry run: nothing was written)" if dry_run else ""))
    if rep["created"] or rep["updated"]:
        import os

        typer.echo(f"passage sources are stored relative to {os.path.abspath(directory)} (the YAML files' folder), "
                   "so the folder can move; `add-expert` and `add-docs` store the absolute paths they are given")
