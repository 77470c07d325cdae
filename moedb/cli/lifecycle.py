"""Commands of the expert lifecycle: feedback, ingest-feedback, retrain, split, merge, rename, optimize,
tune-embedder. Each command is one library call plus formatting."""
from __future__ import annotations

import os
from typing import List, Optional

import typer

from ..errors import InvalidInput
from .common import JSON_OPT, LazyBar, StageBar, app, emit_json, open_db


@app.command()
def feedback(ctx: typer.Context, query_id: int = typer.Argument(..., help="Query id printed by `moedb route`."),
             expert: str = typer.Argument(..., help="The expert the feedback is about."),
             good: bool = typer.Option(False, "--good", help="The route to EXPERT was right (reward +1)."),
             bad: bool = typer.Option(False, "--bad", help="The route to EXPERT was wrong (reward -1)."),
             reward: Optional[float] = typer.Option(None, "--reward", help="Any reward in [-1, 1] instead."),
             json_out: bool = JSON_OPT) -> None:
    """Tell moedb whether routing a logged query to an expert was good or bad."""
    given = [x for x in (good, bad, reward is not None) if x]
    if len(given) != 1:
        raise InvalidInput("give exactly one of --good, --bad and --reward")
    r = 1.0 if good else -1.0 if bad else float(reward)
    with open_db(ctx) as db:
        out = db.feedback(query_id, expert, r)
    if json_out:
        emit_json(out)
    else:
        state = "already recorded" if out["already_present"] else "recorded"
        typer.echo(f"{state}: query {query_id} -> {expert!r} reward {r:+g} (feedback #{out['id']})")


@app.command("ingest-feedback")
def ingest_feedback(ctx: typer.Context, path: str = typer.Argument(..., help="JSONL file, one event per line."),
                    json_out: bool = JSON_OPT) -> None:
    """Ingest a JSONL file of feedback events (re-running it adds nothing twice)."""
    pb = LazyBar(f"ingesting {os.path.basename(path)} (bytes)")
    try:
        with open_db(ctx) as db:
            out = db.ingest_feedback(path, progress=pb)
    finally:
        pb.close()
    if json_out:
        emit_json(out)
        return
    typer.echo(f"{out['lines']} lines: {out['taken']} taken, {out['skipped']} skipped, "
               f"{out['already_present']} already present")
    for e in out["errors"][:20]:
        typer.echo(f"  line {e['line']}: {e['error']}", err=True)
    more = out["skipped"] - min(20, len(out["errors"]))
    if more > 0:
        typer.echo(f"  ... and {more} more skipped line(s) (use --json for the list)", err=True)


def _acc(block: dict) -> str:
    a = block.get("accuracy")
    return "n/a" if a is None else f"{a:.1%} of {block['events']}"


@app.command()
def retrain(ctx: typer.Context, holdout: float = typer.Option(0.1, "--holdout", help="Share of feedback held out."),
            json_out: bool = JSON_OPT) -> None:
    """Fold feedback into the gate; report agreement with held-out feedback before and after."""
    with open_db(ctx) as db:
        out = db.retrain(holdout=holdout)
    if json_out:
        emit_json(out)
        return
    typer.echo(f"retrained on {out['training_events']} feedback events ({out['heldout_events']} more kept aside "
               "to measure agreement)")
    typer.echo(f"agreement with {out['measured_on']}: before {_acc(out['before'])}, after {_acc(out['after'])}")
    for line in gate_summary(out.get("gate") or {}):
        typer.echo("  " + line)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def gate_summary(g: dict) -> list[str]:
    """The gate's fit figures in words (``--json`` has them all, raw)."""
    if not g.get("experts"):
        return ["router: no expert with documents yet"]
    lines = [f"router: {g['experts']} experts, {g.get('documents', 0)} documents, {g.get('feedback', 0)} feedback "
             "events learned from"]
    if g.get("heldout"):
        fb = g.get("heldout_feedback") or 0
        lines.append(f"checked on {g['heldout']} documents held out in turn"
                     + (f" and {fb} feedback events" if fb else "") + f": accuracy {_pct(g.get('heldout_accuracy'))}, calibration error {_pct(g.get('heldout_ece'))}")
    thr, rule = g.get("scope_threshold"), g.get("scope_rule")
    if thr is None:
        lines.append("abstains: never (too few documents, or experts, to calibrate a scope threshold)")
    else:
        how = "small-collection rule" if rule == "small" else "held-out quantile"
        refused = g.get("heldout_refused")
        lines.append(f"abstains below scope {thr:+.2f} ({how}" + (f"; refuses {_pct(refused)} of the held-out "
                     "documents" if refused is not None else "") + ")")
    return lines


@app.command()
def split(ctx: typer.Context, name: str, n: Optional[int] = typer.Option(None, "--n", help="Number of children "
                                                                                        "(default: by silhouette)."),
          child: List[str] = typer.Option(None, "--name", help="Child name (repeatable; default NAME/1, NAME/2…)."),
          json_out: bool = JSON_OPT) -> None:
    """Split an expert into children by k-means over its documents."""
    with open_db(ctx) as db:
        out = db.split_expert(name, n, names=child or None)
    if json_out:
        emit_json(out)
        return
    typer.echo(f"split {name!r} into {out['n']} experts ({out['chosen_by']}):")
    for c in out["children"]:
        typer.echo(f"  {c['name']}: {c['size']} documents")


@app.command()
def merge(ctx: typer.Context, names: List[str] = typer.Argument(..., help="Experts to merge."),
          into: str = typer.Option(..., "--into", help="Target expert (existing or new)."),
          json_out: bool = JSON_OPT) -> None:
    """Merge experts into one; documents, feedback and log references follow."""
    with open_db(ctx) as db:
        out = db.merge_experts(list(names), into=into)
    if json_out:
        emit_json(out)
    else:
        m = out["moved"]
        typer.echo(f"merged {', '.join(out['merged'])} into {into!r} ({out['size']} documents; moved "
                   f"{m['documents']} documents, {m['feedback']} feedback events, {m['log_choices']} log references)")


@app.command()
def rename(ctx: typer.Context, old: str, new: str, json_out: bool = JSON_OPT) -> None:
    """Rename an expert."""
    with open_db(ctx) as db:
        out = db.rename_expert(old, new)
    if json_out:
        emit_json(out)
    else:
        typer.echo(f"renamed {old!r} to {new!r}")


@app.command()
def optimize(ctx: typer.Context, apply: bool = typer.Option(False, "--apply", help="Carry the plan out."),
             json_out: bool = JSON_OPT) -> None:
    """Propose merges, splits and a retrain with their evidence (--apply: do it, in one transaction)."""
    with open_db(ctx) as db:
        out = db.optimize(apply=apply)
    if json_out:
        emit_json(out)
        return
    if not out["proposals"]:
        typer.echo("nothing to do: no redundant, incoherent or overloaded experts and no new feedback")
        return
    for p in out["proposals"]:
        what = {"merge": lambda: f"merge {' + '.join(p['experts'])} into {p['into']!r}",
                "split": lambda: f"split {p['expert']!r} into {p['n']}",
                "retrain": lambda: "retrain the gate"}[p["action"]]()
        typer.echo(f"- {what}: {p['reason']}")
    typer.echo("applied." if out["applied"] else "(dry run; use --apply to carry this out)")


@app.command("tune-embedder")
def tune_embedder(ctx: typer.Context,
                  out: Optional[str] = typer.Option(None, "--out", help="Folder for the tuned model (new; default "
                                                    "<file>.embedders/<name> beside the file)."),
                  epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the documents "
                                                       "(default 3, more for a small file)."),
                  lr: float = typer.Option(5e-5, "--lr", help="Learning rate of the encoder."),
                  batch_size: int = typer.Option(32, "--batch-size", help="Documents per step."),
                  holdout: Optional[float] = typer.Option(None, "--holdout", help="Share of each expert's "
                                                          "documents kept out of training (they calibrate the "
                                                          "gate; default 0.1, more for a small file)."),
                  seed: int = typer.Option(0, "--seed", help="Seed of the split and the training order."),
                  json_out: bool = JSON_OPT) -> None:
    """Fine-tune the file's embedder on its experts' documents and re-embed the file with it."""
    pb = StageBar()
    try:
        with open_db(ctx) as db:
            out_ = db.tune_embedder(out, epochs=epochs, lr=lr, batch_size=batch_size, holdout=holdout, seed=seed,
                                    progress=pb)
    finally:
        pb.close()
    if json_out:
        emit_json(out_)
        return
    b, a = out_["holdout_accuracy_before"], out_["holdout_accuracy_after"]
    typer.echo(f"tuned {out_['name']} on {out_['trained']} documents of {out_['experts']} experts "
               f"({out_['epochs']} epochs, {out_['train_seconds']:.0f} s); model in {out_['model']}")
    if a is not None:
        typer.echo(f"held-out documents ({out_['held_out']}), nearest centroid: {b:.1%} before, {a:.1%} after")
    typer.echo(f"re-embedded {out_['documents']} documents and {out_['feedback']} feedback queries"
               + (f"; {out_['feedback_dropped']} feedback events without query text lost their vectors"
                  if out_["feedback_dropped"] else ""))
    for w in out_["warnings"]:
        typer.echo(f"warning: {w}", err=True)
