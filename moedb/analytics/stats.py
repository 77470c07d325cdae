"""Offline analytics of expert load from the query log.

Aggregation happens in SQL (see :mod:`moedb.store.loads`); this module turns the per-expert
counts into shares, imbalance figures and load-over-time buckets, and renders CSV or a PNG.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import ConfigError, InvalidInput
from ..engine.catalog import Catalog
from ..store import Store
from ..timeparse import parse_time

_NICE = (1, 5, 15, 60, 300, 900, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400, 30 * 86400,
         365 * 86400)


def imbalance(counts: Sequence[float]) -> dict[str, Optional[float]]:
    """Imbalance of a load vector ``counts`` ``(E,)`` (one entry per expert, zeros included).

    ``cv``: population standard deviation / mean; ``gini``: mean absolute difference over
    twice the mean (0 = even, (E-1)/E = all on one expert); ``max_mean``: max / mean;
    ``entropy_bits``: Shannon entropy of the shares in bits; ``entropy_norm``: that entropy
    over ``log2(E)`` (1 = even). All ``None`` when there is no load.
    """
    x = np.asarray(counts, dtype=np.float64)
    if x.size == 0 or x.sum() <= 0:
        return {"experts": int(x.size), "cv": None, "gini": None, "max_mean": None, "entropy_bits": None,
                "entropy_norm": None}
    mean = x.mean()
    xs = np.sort(x)
    n = x.size
    gini = float(np.sum((2 * np.arange(1, n + 1) - n - 1) * xs) / (n * xs.sum()))
    p = x / x.sum()
    nz = p[p > 0]
    h = float(-(nz * np.log2(nz)).sum()) + 0.0  # + 0.0 turns -0.0 (all load on one expert) into 0.0
    return {"experts": int(n), "cv": float(x.std() / mean), "gini": gini, "max_mean": float(x.max() / mean),
            "entropy_bits": h, "entropy_norm": h / math.log2(n) if n > 1 else 1.0}


def bucket_width(span: float, buckets: int) -> float:
    """A readable bucket width (1 s, 5 s, 15 s, 1 min, … 1 year) giving at most ``buckets`` buckets."""
    target = span / max(1, buckets)
    for w in _NICE:
        if w >= target:
            return float(w)
    return float(math.ceil(target / _NICE[-1]) * _NICE[-1])


def stats_csv(stats: dict[str, Any]) -> str:
    """The per-expert table of :meth:`Analytics.stats` as CSV text (header + one row per expert)."""
    cols = ["name", "queries", "share", "selected", "mean_confidence", "feedback", "feedback_success_rate",
            "latency_p50_ms", "latency_p95_ms"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for e in stats["experts"]:
        w.writerow(["" if e[c] is None else e[c] for c in cols])
    return buf.getvalue()


def stats_plot(stats: dict[str, Any], path: str, top: int = 8) -> str:
    """Draw load distribution (bars) and load over time (top experts + other + abstained) to a PNG
    (needs the extra ``plot``)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("a stats plot needs matplotlib: pip install 'moedb[plot]'") from None

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    experts = sorted(stats["experts"], key=lambda e: -e["queries"])
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 8), constrained_layout=True)
    names = [e["name"] for e in experts]
    a1.bar(range(len(experts)), [e["queries"] for e in experts], color="#4477aa")
    if len(names) <= 40:
        a1.set_xticks(range(len(experts)))
        a1.set_xticklabels(names, rotation=60 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center",
                           fontsize=8)
    else:
        a1.set_xticks([])
        a1.set_xlabel(f"{len(names)} experts, busiest first")
    imb = stats["imbalance"]
    sub = "" if imb["gini"] is None else \
        f"  (Gini {imb['gini']:.2f}, CV {imb['cv']:.2f}, max/mean {imb['max_mean']:.2f})"
    a1.set_title("queries per expert (top route)" + sub)
    a1.set_ylabel("queries")
    lot = stats["load_over_time"]
    xs = [b["start"] for b in lot["buckets"]]
    if xs:
        import datetime as dt

        when = [dt.datetime.fromtimestamp(x) for x in xs]
        shown = names[:top]
        for n in shown:
            a2.plot(when, [b["by_expert"].get(n, 0) for b in lot["buckets"]], label=n, marker=".")
        rest = [sum(v for k, v in b["by_expert"].items() if k not in shown) for b in lot["buckets"]]
        if any(rest):
            a2.plot(when, rest, label="other", color="grey", linestyle="--")
        if any(b["abstained"] for b in lot["buckets"]):
            a2.plot(when, [b["abstained"] for b in lot["buckets"]], label="abstained", color="black", linestyle=":")
        a2.legend(fontsize=8, ncol=2)
        for lbl in a2.get_xticklabels():
            lbl.set_rotation(30)
            lbl.set_horizontalalignment("right")
    a2.set_title(f"load over time ({fmt_width(lot['bucket_seconds'])} buckets)")
    a2.set_ylabel("queries")
    from matplotlib.ticker import MaxNLocator

    for ax in (a1, a2):  # counts of queries: whole numbers on the y axes, never 0.5 of a query
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fmt_width(w: Optional[float]) -> str:
    """A bucket width for people: ``1 h``, ``15 min``, ``2 d``, else seconds (``no`` when there is none)."""
    if not w:
        return "no"
    for unit, s in (("d", 86400), ("h", 3600), ("min", 60)):
        if w >= s and w % s == 0:
            return f"{int(w // s)} {unit}"
    return f"{w:g} s"


class Analytics:
    """Load analytics of one file: ``store`` for the aggregates, ``catalog`` for the experts' names."""

    def __init__(self, store: Store, catalog: Catalog):
        self.store = store
        self.catalog = catalog

    def stats(self, since: Any = None, until: Any = None, *, buckets: int = 24) -> dict[str, Any]:
        """Load analytics over the query log between ``since`` (inclusive) and ``until`` (exclusive).

        ``since``/``until``: epoch seconds, ``datetime`` or ISO-8601 strings. Returns
        ``{"since", "until", "queries", "routed", "abstained", "abstention_rate", "latency_ms":
        {"p50", "p95"}, "experts": [{"name", "queries" (routes where it ranked first), "share",
        "selected" (times routes chose it at any rank), "mean_confidence", "feedback",
        "feedback_success_rate", "latency_p50_ms", "latency_p95_ms"}], "imbalance": {...},
        "load_over_time": {"bucket_seconds", "buckets": [{"start", "queries", "abstained",
        "by_expert"}]}}``. Every figure is counted from the file.
        """
        lo, hi = parse_time(since, "since"), parse_time(until, "until")
        if lo is not None and hi is not None and hi <= lo:
            raise InvalidInput("until must be later than since")
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
            raise InvalidInput(f"buckets must be an integer >= 1, got {buckets!r}")
        self.catalog.refresh()
        st = self.store.loads
        summary = st.summary(lo, hi)
        n = summary["queries"]
        names = {r["id"]: r["name"] for r in self.catalog.rows}
        width = start = None
        top: dict[int, list[float]] = {}
        slots: dict[int, dict[str, Any]] = {}
        if n:
            first = lo if lo is not None else summary["first"]
            last = hi if hi is not None else summary["last"]
            width = bucket_width(max(last - first, 1e-9), buckets)
            start = math.floor(first / width) * width
            for eid, b, cnt, conf in st.top_load(lo, hi, start, width):
                t = top.setdefault(eid, [0, 0.0])
                t[0] += cnt
                t[1] += conf
                slot = slots.setdefault(b, {"queries": 0, "abstained": 0, "by_expert": {}})
                slot["queries"] += cnt
                name = names.get(eid, f"#{eid} (removed)")
                slot["by_expert"][name] = slot["by_expert"].get(name, 0) + cnt
            for b, cnt in st.abstentions(lo, hi, start, width):
                slot = slots.setdefault(b, {"queries": 0, "abstained": 0, "by_expert": {}})
                slot["queries"] += cnt
                slot["abstained"] += cnt
        sel = st.selections(lo, hi) if n else {}
        overall_lat, lat = st.latency_percentiles(lo, hi, n)
        fb = st.feedback(lo, hi)
        answering = {r["id"] for r in self.catalog.answering()}
        ids = [r["id"] for r in self.catalog.rows if r["id"] in answering or r["id"] in top]
        ids += [i for i in top if i not in names]        # experts removed since (the log keeps their id)
        routed = n - summary["abstained"]
        rows = []
        for i in dict.fromkeys(ids):
            cnt, conf = top.get(i, (0, 0.0))
            f = fb.get(i)
            judged = (f["good"] + f["bad"]) if f else 0
            rows.append({
                "name": names.get(i, f"#{i} (removed)"), "queries": int(cnt),
                "share": cnt / routed if routed else 0.0, "selected": int(sel.get(i, 0)),
                "mean_confidence": conf / cnt if cnt else None, "feedback": int(f["events"]) if f else 0,
                "feedback_success_rate": f["good"] / judged if judged else None,
                "latency_p50_ms": lat.get(i, {}).get("p50"), "latency_p95_ms": lat.get(i, {}).get("p95"),
            })
        rows.sort(key=lambda e: (-e["queries"], e["name"]))
        if n:
            nb = int(((hi if hi is not None else summary["last"]) - start) // width) + 1
            empty = {"queries": 0, "abstained": 0, "by_expert": {}}
            lot = {"bucket_seconds": width, "start": start,
                   "buckets": [{"start": start + b * width, **slots.get(b, empty)} for b in range(nb)]}
        else:
            lot = {"bucket_seconds": None, "start": None, "buckets": []}
        return {
            "since": lo, "until": hi, "first": summary["first"], "last": summary["last"],
            "queries": n, "routed": routed, "abstained": summary["abstained"],
            "abstention_rate": summary["abstained"] / n if n else None,
            "latency_ms": overall_lat, "experts": rows,
            "imbalance": imbalance([e["queries"] for e in rows]),
            "load_over_time": lot,
        }
