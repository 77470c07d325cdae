"""Small collections (a newcomer's own few documents): does the router refuse off-topic questions while it
answers questions on its subjects? Three rules on the same files, in one run:

- ``today``: the rule before issue 16 (held-out quantile only, none below ``min_heldout`` = 30 documents):
  the same file with ``configure(small_heldout=0)``;
- ``new``: the default rule (small-collection scope threshold, ``small_heldout`` = 200);
- ``top-conf``: a plain threshold on the top confidence, ``route(min_confidence=c)``, with ``c`` chosen on
  val (the c maximising answered-correctly + off-topic-refused) for each unit and size;
- ``bound``: not a rule: per file the scope threshold that maximises answered-correctly + off-topic-refused
  on the evaluated questions themselves. It says how far any scope threshold can go on these files.

Files: 5 random CLINC150 ``--unit``s as experts (``domain``: the issue's setting, 15 intents per expert;
``intent``: one coherent subject per expert, like a newcomer's "cooking" notes), each with 5, 10 or 20 train
utterances; 20 seeds. In-scope questions: 100 utterances of the experts' units from ``--split``; off-topic:
100 utterances of other units (other domains for ``domain``, other domains' intents for ``intent``) + 100
``oos_<split>``. Documents always come from train; ``--split val`` (the default) is what the defaults were
tuned on; ``--split test`` is reported separately (c still chosen on val).

Also the drop rule (``min_relative_confidence``): with ``top_k=2`` under the default rule, how often a second
expert comes back and whether the right expert is among those returned, for several ratios.

    python benches/bench_small.py                 # val, both units, ~5 min on 2 busy cores
    python benches/bench_small.py --split test    # the held-back test figures
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_routing import LookupEmbedder  # noqa: E402
from clinc import OUT, clinc_embedded, find_shared, vector_table  # noqa: E402

SIZES = (5, 10, 20)
RATIOS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)
CS = np.round(np.arange(0.30, 1.0, 0.025), 3)


def draw(data, unit: str, seed: int, n: int, split: str, nq: int = 100):
    """One small file and its questions: ``(experts {name: train rows}, in (rows, truth), off-topic rows)``
    with rows into ``data[split]`` / ``data["oos_" + split]`` (off-topic: ``("oos", i)`` or ``(split, i)``)."""
    rng = np.random.default_rng(seed)
    dom = data["domain_of"]
    chosen_dom = list(rng.choice(sorted(data["domains"]), 5, replace=False))
    if unit == "domain":
        chosen = chosen_dom
        unit_of = lambda lab: dom[lab]  # noqa: E731
    else:  # one intent from each of 5 random domains: the others' intents are off-topic
        chosen = [str(rng.choice(sorted(data["domains"][d]))) for d in chosen_dom]
        unit_of = lambda lab: lab if dom[lab] in chosen_dom else dom[lab]  # noqa: E731
    tr_units = np.array([unit_of(lab) for lab in data["train"]["labels"]])
    experts = {u: rng.choice(np.flatnonzero(tr_units == u), n, replace=False) for u in chosen}
    te_units = np.array([unit_of(lab) for lab in data[split]["labels"]])
    te_dom = np.array([dom[lab] for lab in data[split]["labels"]])
    inside = rng.choice(np.flatnonzero(np.isin(te_units, chosen)), nq, replace=False)
    other = rng.choice(np.flatnonzero(~np.isin(te_dom, chosen_dom)), nq, replace=False)
    oos = rng.choice(len(data["oos_" + split]["texts"]), nq, replace=False)
    return experts, (inside, te_units[inside]), other, oos


def build(path: pathlib.Path, data, table, experts) -> object:
    import moedb

    db = moedb.connect(str(path), embedder=LookupEmbedder(table), log_queries=False)
    tr = data["train"]
    for name, rows in experts.items():
        db.add_expert(name, [{"text": tr["texts"][i], "id": str(i)} for i in rows], vectors=tr["X"][rows])
    return db


def outcome(rs, truth) -> tuple[np.ndarray, np.ndarray]:
    """``(answered (n,), answered and right (n,))`` of routes ``rs`` (``truth``: None for off-topic)."""
    ans = np.array([not r.abstained for r in rs])
    ok = np.array([(not r.abstained) and t is not None and r.experts[0].name == t for r, t in zip(rs, truth)])
    return ans, ok


def one(data, table, unit: str, seed: int, n: int, split: str, tmp: pathlib.Path) -> dict:
    """Every rule on one file: per rule ``(in-scope answered-correct, other-domain refused, oos refused)`` and the
    raw top confidences / scopes for the offline figures (the plain threshold's c, the bound, the drop rule)."""
    experts, (inside, truth), other, oos = draw(data, unit, seed, n, split)
    s = data[split]
    o = data["oos_" + split]
    texts = [s["texts"][i] for i in inside] + [s["texts"][i] for i in other] + [o["texts"][i] for i in oos]
    gold = list(truth) + [None] * (len(other) + len(oos))
    nin, noth = len(inside), len(other)
    path = tmp / f"{unit}_{seed}_{n}_{split}.db"
    db = build(path, data, table, experts)
    out: dict = {}

    def rates(rs):
        ans, ok = outcome(rs, gold)
        return (float(ok[:nin].mean()), float(1 - ans[nin:nin + noth].mean()), float(1 - ans[nin + noth:].mean()))

    db.refit_router()
    t = time.perf_counter()
    new = db.route_many(texts, top_k=2, k=0, log=False)
    out["route_ms"] = (time.perf_counter() - t) * 1000 / len(texts)
    out["new"] = rates(new)
    out["new_rule"] = db.router_figures().get("scope_rule")
    free = db.route_many(texts, top_k=2, k=0, log=False, min_confidence=0.0)
    conf = np.array([[e.confidence for e in r.experts] + [0.0] * (2 - len(r.experts)) for r in free])
    names = [[e.name for e in r.experts] for r in free]
    scope = np.array([r.scope if r.scope is not None else -np.inf for r in free])
    right1 = np.array([nm[0] == g for nm, g in zip(names, gold)])
    right2 = np.array([len(nm) > 1 and nm[1] == g for nm, g in zip(names, gold)])
    out["raw"] = {"conf": conf, "scope": scope, "right1": right1, "right2": right2, "nin": nin, "noth": noth,
                  "answered_new": np.array([not r.abstained for r in new])}
    db.configure(small_heldout=0)
    db.refit_router()  # (now: a lazy refit may serve the previous gate a while when fits are slow)
    assert db.router_figures().get("scope_rule") != "small"
    out["today"] = rates(db.route_many(texts, top_k=2, k=0, log=False))
    db.close()
    for suffix in ("", "-wal", "-shm"):
        pathlib.Path(str(path) + suffix).unlink(missing_ok=True)
    return out


def plain(raw: dict, c: float) -> tuple[float, float, float]:
    """The top-confidence rule at ``c`` on one file's raw figures (what ``route(min_confidence=c)`` does)."""
    nin, noth = raw["nin"], raw["noth"]
    ans = raw["conf"][:, 0] >= c
    return (float((ans & raw["right1"])[:nin].mean()), float(1 - ans[nin:nin + noth].mean()),
            float(1 - ans[nin + noth:].mean()))


def bound(runs: list[dict]) -> tuple[float, float, float]:
    """Per file the best scope threshold on its own questions (see the module docstring), averaged."""
    res = []
    for r in runs:
        raw = r["raw"]
        nin, s = raw["nin"], raw["scope"]
        best = None
        for t in np.r_[-np.inf, np.unique(s)]:
            ans = s >= t
            ok = float((ans & raw["right1"])[:nin].mean())
            refused = float(1 - ans[nin:].mean())
            key = ok + refused
            if best is None or key > best[0]:
                best = (key, (ok, float(1 - ans[nin:nin + raw["noth"]].mean()),
                              float(1 - ans[nin + raw["noth"]:].mean())))
        res.append(best[1])
    return tuple(np.mean(res, axis=0))


def drop_figures(runs: list[dict]) -> list[tuple]:
    """Per ratio: share of answered in-scope routes with a 2nd expert, and right expert among those returned."""
    rows = []
    for ratio in RATIOS:
        second, hit = [], []
        for r in runs:
            raw = r["raw"]
            nin = raw["nin"]
            ans = raw["answered_new"][:nin]
            c = raw["conf"][:nin]
            keep2 = (c[:, 1] > 0) & (c[:, 1] >= ratio * c[:, 0])
            second.append(keep2[ans].mean() if ans.any() else 0.0)
            got = raw["right1"][:nin] | (keep2 & raw["right2"][:nin])
            hit.append(got[ans].mean() if ans.any() else 0.0)
        rows.append((ratio, float(np.mean(second)), float(np.mean(hit))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--units", default="domain,intent")
    args = ap.parse_args()
    if find_shared() is None:
        print("skip: CLINC150 not found (../shared/data/clinc150)")
        return
    data = clinc_embedded()
    table = vector_table(data)
    report: dict = {"split": args.split, "seeds": args.seeds, "rows": []}
    lines = [f"CLINC150 small collections, split {args.split}, {args.seeds} seeds, 5 experts; cells: in-scope "
             "answered correctly / off-topic refused (other units / oos)",
             "| unit | docs/expert | today | new | top-conf (c from val) | bound |", "|---|---|---|---|---|---|"]
    drops = []
    with tempfile.TemporaryDirectory() as td:
        tmp = pathlib.Path(td)
        for unit in args.units.split(","):
            for n in SIZES:
                runs = [one(data, table, unit, seed, n, args.split, tmp) for seed in range(args.seeds)]
                val_runs = runs if args.split == "val" else \
                    [one(data, table, unit, seed, n, "val", tmp) for seed in range(args.seeds)]
                c = max(CS, key=lambda c: np.mean([plain(r["raw"], c)[0] + 0.5 * sum(plain(r["raw"], c)[1:])
                                                   for r in val_runs]))
                cells = {k: tuple(np.mean([r[k] for r in runs], axis=0)) for k in ("today", "new")}
                cells["plain"] = tuple(np.mean([plain(r["raw"], c) for r in runs], axis=0))
                cells["bound"] = bound(runs)

                def cell(v):
                    return f"{v[0]:.1%} / {(v[1] + v[2]) / 2:.1%} ({v[1]:.0%} / {v[2]:.0%})"

                lines.append(f"| {unit} | {n} | {cell(cells['today'])} | {cell(cells['new'])} | "
                             f"{cell(cells['plain'])} c={c:.3f} | {cell(cells['bound'])} |")
                print(lines[-1], flush=True)
                rules = sorted({r["new_rule"] for r in runs if r["new_rule"]})
                report["rows"].append({"unit": unit, "docs": n, "c": float(c), "new_scope_rule": rules,
                                       "route_ms": float(np.mean([r["route_ms"] for r in runs])),
                                       **{k: list(v) for k, v in cells.items()}})
                drops.append((unit, n, drop_figures(runs)))
    lines += ["", "drop rule (top_k=2, default abstention): answered in-scope routes that keep a 2nd expert / "
              "right expert among those returned", "| unit | docs | " + " | ".join(f"ratio {r:g}" for r in RATIOS)
              + " |", "|---|---|" + "---|" * len(RATIOS)]
    for unit, n, rows in drops:
        lines.append(f"| {unit} | {n} | " + " | ".join(f"{s:.0%} / {h:.1%}" for _, s, h in rows) + " |")
        report["rows"].append({"unit": unit, "docs": n, "drop": rows})
    print("\n".join(lines))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"bench_small_{args.split}.json").write_text(json.dumps(report, indent=1))
    (OUT / f"bench_small_{args.split}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
