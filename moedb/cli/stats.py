"""``moedb stats``: load analytics from the query log, as a table, CSV, JSON or a PNG chart."""
from __future__ import annotations

from typing import Optional

import typer

from ..analytics.stats import fmt_width, stats_csv, stats_plot
from .common import JSON_OPT, app, bar, console, emit_json, open_db


@app.command()
def stats(ctx: typer.Context,
          since: Optional[str] = typer.Option(None, "--since", help="Epoch seconds or ISO date (inclusive)."),
          until: Optional[str] = typer.Option(None, "--until", help="Epoch seconds or ISO date (exclusive)."),
          buckets: int = typer.Option(24, "--buckets", help="Time buckets for load over time."),
          csv_out: bool = typer.Option(False, "--csv", help="Per-expert table as CSV."),
          plot: Optional[str] = typer.Option(None, "--plot", help="Write load charts to FILE.png (needs matplotlib)."),
          json_out: bool = JSON_OPT) -> None:
    """Load analytics from the query log: per-expert load, imbalance, latency, load over time."""

    with open_db(ctx) as db:
        out = db.stats(since=since, until=until, buckets=buckets)
    if plot:
        stats_plot(out, plot)
    if json_out:
        emit_json(out)
    elif csv_out:
        typer.echo(stats_csv(out), nl=False)
    else:
        print_stats(out)
    if plot and not json_out and not csv_out:
        typer.echo(f"wrote {plot}")


def print_stats(s: dict) -> None:
    from rich.table import Table

    if not s["queries"]:
        typer.echo("no queries logged in this window")
        return
    lat = s["latency_ms"]
    typer.echo(f"{s['queries']} queries, {s['routed']} routed, {s['abstained']} abstained "
               f"({s['abstention_rate']:.1%}); latency p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms")
    t = Table("expert", "share", "", "queries", "conf", "fb ok", "p50 ms", "p95 ms")
    t.columns[0].no_wrap = True
    top = max((e["share"] for e in s["experts"]), default=0) or 1.0
    for e in s["experts"]:
        ok = "" if e["feedback_success_rate"] is None else f"{e['feedback_success_rate']:.0%} of {e['feedback']}"
        t.add_row(e["name"], bar(e["share"] / top, 10), f"{e['share']:.1%}", str(e["queries"]),
                  "" if e["mean_confidence"] is None else f"{e['mean_confidence']:.2f}", ok,
                  "" if e["latency_p50_ms"] is None else f"{e['latency_p50_ms']:.1f}",
                  "" if e["latency_p95_ms"] is None else f"{e['latency_p95_ms']:.1f}")
    console().print(t)
    imb = s["imbalance"]
    if imb["gini"] is not None:
        typer.echo(f"imbalance over {imb['experts']} experts: CV {imb['cv']:.2f}, Gini {imb['gini']:.2f}, "
                   f"max/mean {imb['max_mean']:.2f}, entropy {imb['entropy_bits']:.2f} bits "
                   f"({imb['entropy_norm']:.0%} of even)")
    lot = s["load_over_time"]
    if lot["buckets"]:
        import datetime as dt

        typer.echo(f"load over time ({fmt_width(lot['bucket_seconds'])} buckets):")
        peak = max(b["queries"] for b in lot["buckets"]) or 1
        for b in lot["buckets"]:
            when = dt.datetime.fromtimestamp(b["start"]).strftime("%Y-%m-%d %H:%M:%S")
            typer.echo(f"  {when}  {bar(b['queries'] / peak, 30)} {b['queries']}")
