"""CLINC150 routing benchmark: moedb's hybrid gate next to its peers, same MiniLM embeddings, one run.

150 intents are experts (their train utterances are the documents), the 10 domains of domains.json
are parent experts. Every setting is chosen on train/val (never test): baselines pick their
hyper-parameter on val, semantic-router fits its threshold on val + oos_val, moedb calibrates itself
on held-out slices of its own documents. Reported on test (4,500 in-scope + 1,000 out-of-scope).

    python benches/bench_routing.py            # ~5-10 min on 2 busy cores; caches under benches/out/
    python benches/bench_routing.py --quick    # skip the 1,000-expert latency part
    python benches/bench_routing.py --tuned    # also files whose embedder was tuned (tune_embedder), with
                                               # and without a refusal expert: ~15 min each the first time

Embeddings are computed once (benches/clinc.py) and served to both moedb and semantic-router through
their embedder/encoder interfaces by text lookup, so routing latency excludes the embedding.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from clinc import OUT, SPLITS, clinc_embedded, embed_cached, find_shared, vector_table  # noqa: E402


class LookupEmbedder:
    """all-MiniLM-L6-v2 vectors (or a tuned model's: ``name``, ``model``) served from a precomputed
    table; texts not in it go to the model."""

    dim = 384

    def __init__(self, table: dict[str, np.ndarray], name: str = "all-MiniLM-L6-v2", model: Any = None):
        self.table = table
        self.name = name
        self.model = model

    def embed(self, texts):
        missing = [t for t in texts if t not in self.table]
        if missing:
            from clinc import _embedder

            for t, v in zip(missing, (self.model or _embedder()).embed(missing)):
                self.table[t] = v
        return np.stack([self.table[t] for t in texts])


def ece(conf, correct, bins=15):
    from moedb.routing.calibration import ece as _ece

    return _ece(np.asarray(conf), np.asarray(correct), bins)


def build_db(path: pathlib.Path, data, table, experts: dict[str, list[int]], parents: dict[str, str] | None,
             settings: dict[str, Any] | None = None, own_embedder: bool = False):
    """A moedb file with one expert per key of ``experts`` (train row indices); reused when it exists.

    The cached vectors are served by lookup; ``own_embedder``: the file keeps its own embedder (the
    bundled MiniLM, whose vectors the cache holds; a file that can be tuned)."""
    import moedb

    fresh = not path.exists()
    try:
        db = moedb.connect(str(path), embedder=None if own_embedder else LookupEmbedder(table), log_queries=False)
    except moedb.SchemaError:  # a cached file from an older schema: rebuild it
        for suffix in ("", "-wal", "-shm"):
            pathlib.Path(str(path) + suffix).unlink(missing_ok=True)
        return build_db(path, data, table, experts, parents, settings, own_embedder)
    if fresh:
        if settings:
            db.configure(**settings)
        tr = data["train"]
        X = data["train"]["X"]
        for p in sorted(set((parents or {}).values())):
            db.add_expert(p, description=p.replace("_", " "))
        for name, rows in experts.items():
            db.add_expert(name, [{"text": tr["texts"][i], "id": str(i)} for i in rows], vectors=X[rows],
                          parent=(parents or {}).get(name))
    return db


def add_refusal_expert(db, data) -> None:
    """The 100 oos_train queries as the refusal expert ``out_of_scope`` (unless the file has it)."""
    if "out_of_scope" not in {e.name for e in db.experts()}:
        db.add_expert("out_of_scope", data["oos_train"]["texts"], refuse=True,
                      description="examples of queries none of the intents should answer")


def route_table(db, texts, top_k=2, **kw):
    """``(top-1 names, top-2 name lists, top-1 confidences, abstained)`` of ``route_many`` (no retrieval)."""
    rs = db.route_many(texts, top_k=top_k, k=0, log=False, **kw)
    names = [r.experts[0].name if r.experts else None for r in rs]
    top2 = [[e.name for e in r.experts] for r in rs]
    conf = np.array([r.experts[0].confidence if r.experts else 0.0 for r in rs])
    return names, top2, conf, np.array([r.abstained for r in rs]), rs


def p50_pair(fa, fb, items, warm=20, block=25) -> tuple[float, float]:
    """p50 ms of ``fa`` and ``fb`` on the same items, timed in alternating blocks of ``block`` items, so
    that both see the same machine noise (their ratio is what a shared, busy machine can measure) while
    each runs warm within its block, as a loop of routes does."""
    for x in items[:warm]:
        fa(x)
        fb(x)
    ta, tb = [], []
    for s in range(0, len(items), block):
        for f, ts in (((fa, ta), (fb, tb)) if (s // block) % 2 == 0 else ((fb, tb), (fa, ta))):
            for x in items[s:s + block]:
                t = time.perf_counter()
                f(x)
                ts.append((time.perf_counter() - t) * 1000)
    return float(np.median(ta)), float(np.median(tb))


def p50_ms(fn, items, warm=20):
    for x in items[:warm]:
        fn(x)
    ts = []
    for x in items:
        t = time.perf_counter()
        fn(x)
        ts.append((time.perf_counter() - t) * 1000)
    return float(np.median(ts))


# ---------------------------------------------------------------------- baselines
def baselines(data, intents):
    ix = {n: i for i, n in enumerate(intents)}
    Xtr, Xva, Xte = data["train"]["X"], data["val"]["X"], data["test"]["X"]
    ytr = np.array([ix[l] for l in data["train"]["labels"]])
    yva = np.array([ix[l] for l in data["val"]["labels"]])
    yte = np.array([ix[l] for l in data["test"]["labels"]])
    out = {}
    C = np.stack([Xtr[ytr == e].mean(0) for e in range(len(intents))])
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    S = Xte @ C.T
    out["nearest centroid"] = {"acc": float((S.argmax(1) == yte).mean()),
                               "top2": float((np.argsort(-S, 1)[:, :2] == yte[:, None]).any(1).mean())}

    def knn_scores(Q, k):
        sim = Q @ Xtr.T
        idx = np.argpartition(-sim, k, axis=1)[:, :k]
        votes = np.zeros((len(Q), len(intents)))
        rows = np.arange(len(Q))[:, None]
        np.add.at(votes, (np.repeat(rows, k, 1), ytr[idx]), sim[rows, idx])
        return votes

    best_k = max([1, 5, 10, 20], key=lambda k: (knn_scores(Xva, k).argmax(1) == yva).mean())
    V = knn_scores(Xte, best_k)
    out[f"kNN vote (k={best_k} on val)"] = {"acc": float((V.argmax(1) == yte).mean()),
                                            "top2": float((np.argsort(-V, 1)[:, :2] == yte[:, None]).any(1).mean())}
    from sklearn.linear_model import LogisticRegression

    fits = {c: LogisticRegression(C=c, max_iter=300).fit(Xtr, ytr) for c in (10.0, 100.0)}
    best_c = max(fits, key=lambda c: (fits[c].predict(Xva) == yva).mean())
    P = fits[best_c].predict_proba(Xte)
    out[f"logistic regression (C={best_c:g} on val)"] = {
        "acc": float((P.argmax(1) == yte).mean()), "top2": float((np.argsort(-P, 1)[:, :2] == yte[:, None]).any(1).mean()),
        "ece": ece(P.max(1), P.argmax(1) == yte)}
    return out


def semantic_router_peer(data, table, groups: dict[str, list[int]], fit=True, n_latency=300, moedb_route=None):
    """aurelio semantic-router's IndexedRouter (top_k=5, mean) over the same vectors; its latency is timed
    in alternating blocks with ``moedb_route`` (``moedb_p50_ms``) when given."""
    try:
        from semantic_router import Route
        from semantic_router.encoders import DenseEncoder
        from semantic_router.routers import IndexedRouter
    except ImportError as e:
        return {"skipped": f"semantic-router not installed ({e}); pip install 'moedb[bench]'"}

    class Lookup(DenseEncoder):
        name: str = "all-MiniLM-L6-v2"

        def __call__(self, docs):
            return [table[d].tolist() for d in docs]

    tr = data["train"]["texts"]
    routes = [Route(name=n, utterances=[tr[i] for i in rows]) for n, rows in groups.items()]
    t = time.perf_counter()
    router = IndexedRouter(encoder=Lookup(), routes=routes, top_k=5, aggregation="mean")
    out: dict[str, Any] = {"build_s": time.perf_counter() - t}
    te = data["test"]
    q = te["texts"][:n_latency]
    if moedb_route is not None:
        out["moedb_p50_ms"], out["p50_ms"] = p50_pair(moedb_route, lambda x: router(x), q)
    else:
        out["p50_ms"] = p50_ms(lambda x: router(x), q)
    if not fit:
        return out
    from semantic_router.routers.base import run

    X = data["val"]["texts"] + data["oos_val"]["texts"]
    y = data["val"]["labels"] + [None] * len(data["oos_val"]["texts"])
    rep = router.fit(X, y)
    out["fit"] = {"method": rep.method if hasattr(rep, "method") else None}
    scores = run(router._scores_many(te["texts"]))
    top = [sorted(s, key=s.get, reverse=True)[:2] for s in scores]
    lab = te["labels"]
    out["acc"] = float(np.mean([t[0] == y_ for t, y_ in zip(top, lab)]))
    out["top2"] = float(np.mean([y_ in t for t, y_ in zip(top, lab)]))
    probs = [router._probs(s) for s in scores]
    out["ece"] = ece([p[t[0]] for p, t in zip(probs, top)], [t[0] == y_ for t, y_ in zip(top, lab)])
    # its own decision rule (calibrated threshold) on the scores computed once, as its evaluate() does
    picks_in = [router._choose(s, 1, None) for s in scores]
    picks_oos = [router._choose(s, 1, None) for s in run(router._scores_many(data["oos_test"]["texts"]))]

    def name(p):
        p = p[0] if isinstance(p, list) and p else p
        return getattr(p, "name", None) if p else None

    out["acc_at_threshold"] = float(np.mean([name(p) == y_ for p, y_ in zip(picks_in, lab)]))
    out["oos_recall"] = float(np.mean([name(p) is None for p in picks_oos]))
    return out


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the 1,000-expert latency comparison")
    ap.add_argument("--fresh", action="store_true", help="rebuild the moedb files (refit the gate)")
    ap.add_argument("--tuned", action="store_true", help="also tune the embedder on the train utterances "
                    "(moedb tune-embedder, ~15 min per file on 2 cores; the tuned files are cached)")
    ap.add_argument("--only-tuned", action="store_true", help="run only the tuned part and merge it into the "
                    "last benches/out/bench_routing.json (its accuracy figures; no latency comparison)")
    args = ap.parse_args()
    if find_shared() is None:
        print("skip: CLINC150 not found under ../shared/data/clinc150")
        return
    data = clinc_embedded()
    table = vector_table(data)
    intents = data["intents"]
    tr_lab = np.array(data["train"]["labels"])
    groups = {n: np.flatnonzero(tr_lab == n).tolist() for n in intents}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "bench_routing_clinc150.db"
    if args.fresh and path.exists():
        path.unlink()
    t = time.perf_counter()
    db = build_db(path, data, table, groups, data["domain_of"])
    db.route("warm up", log=False)  # fits (or loads) the gate
    fit_s = time.perf_counter() - t
    figs = db.router_figures()
    te, oos = data["test"], data["oos_test"]
    lab = te["labels"]
    dom = data["domain_of"]
    res: dict[str, Any] = {"gate_figures": figs, "fit_or_load_s": fit_s}

    def evaluate(db, tag, **kw):
        names, top2, conf, _, rs = route_table(db, te["texts"], min_confidence=0.0, **kw)
        ok = np.array([a == b for a, b in zip(names, lab)])
        r = {"acc": float(ok.mean()), "top2": float(np.mean([y in t for t, y in zip(top2, lab)])),
             "ece": ece(conf, ok), "domain_acc": float(np.mean([dom.get(a) == dom[b] for a, b in zip(names, lab)]))}
        res[tag] = r
        return r, rs

    def at(db, **kw):
        """In-scope accuracy, refusals and oos recall on test under the database's current rule."""
        names, _, _, abst, _ = route_table(db, te["texts"], **kw)
        _, _, _, abst_oos, ors = route_table(db, oos["texts"], **kw)
        return {"acc_at_threshold": float(np.mean([a == b for a, b in zip(names, lab)])),
                "refused_in_scope": float(abst.mean()), "oos_recall": float(abst_oos.mean()),
                "oos_refused_by_expert": float(np.mean([r.refused_by is not None for r in ors]))}

    def val_scores(db):
        """Val and oos_val under the scope rule without a scope threshold: whether each in-scope query is
        routed right, the scopes (-inf when a refusal expert refuses it, whatever the threshold) and the
        top confidences."""
        db.configure(min_scope=-1e9)
        vn, _, vconf, _, vrs = route_table(db, data["val"]["texts"])
        _, _, oconf, _, ors = route_table(db, data["oos_val"]["texts"])
        db.configure(min_scope=None)
        vok = np.array([a == b for a, b in zip(vn, data["val"]["labels"])])
        scopes = lambda rs: np.array([-np.inf if r.refused_by else r.scope for r in rs])  # noqa: E731
        return vok, scopes(vrs), scopes(ors), vconf, oconf

    def tune(v_in, v_oos, vok):
        """The threshold with the best oos_val recall that keeps val accuracy >= 95%."""
        best, rec = float(v_in[np.isfinite(v_in)].min()), -1.0
        for thr in np.unique(np.r_[v_in, v_oos]):
            if (vok & (v_in >= thr)).mean() >= 0.95 and (v_oos < thr).mean() > rec:
                best, rec = float(thr), float((v_oos < thr).mean())
        return best

    def abstention(db, calibrated_key, tuned_key):
        """The calibrated scope threshold (default), then min_scope tuned on val + oos_val, on test."""
        db.configure(min_scope=None)  # whatever an interrupted run left in the cached file
        res[calibrated_key] = {"threshold": db.router_figures()["scope_threshold"], **at(db)}
        vok, vscope, oscope, vconf, oconf = val_scores(db)
        thr = tune(vscope, oscope, vok)
        db.configure(min_scope=thr)
        res[tuned_key] = {"threshold": thr, **at(db)}
        db.configure(min_scope=None)
        return vok, vconf, oconf

    if args.tuned or args.only_tuned:
        before = set(res)
        for refusal in (False, True):
            tuned_part(res, data, refusal, args.fresh, evaluate, abstention)
        tuned_keys = set(res) - before
    if args.only_tuned:
        db.close()
        last = json.loads((OUT / "bench_routing.json").read_text())
        last.update({k: res[k] for k in tuned_keys})
        (OUT / "bench_routing.json").write_text(json.dumps(last, indent=2, default=float))
        report(last)
        return
    db.configure(balance=False, beam=0)
    evaluate(db, "moedb flat, no balancing")
    db.configure(balance=True)
    evaluate(db, "moedb flat, balancing on (default)")
    vok, vconf, oconf = abstention(db, "calibrated", "val_tuned_scope")
    # for comparison, a threshold on the top confidence (min_confidence) tuned on val + oos_val
    thr_c = tune(vconf, oconf, vok)
    res["val_tuned_threshold"] = {"threshold": thr_c, **at(db, min_confidence=thr_c)}
    # hierarchy: a beam over the 10 domains
    db.configure(beam=3, balance=False)
    _, rs = evaluate(db, "moedb hierarchical (beam 3 of 10 domains)", explain=True)
    res["moedb hierarchical (beam 3 of 10 domains)"]["leaves_scored"] = float(
        np.mean([r.explanation["experts_scored"] for r in rs]))
    db.configure(beam=None, balance=True)
    # the same experts plus one refusal expert holding the 100 oos_train queries (train data, not test)
    p_ref = OUT / "bench_routing_clinc150_refuse.db"
    if args.fresh and p_ref.exists():
        p_ref.unlink()
    t = time.perf_counter()
    dbr = build_db(p_ref, data, table, groups, data["domain_of"])
    add_refusal_expert(dbr, data)
    dbr.route("warm up", log=False)
    res["refusal_fit_or_load_s"] = time.perf_counter() - t
    res["refusal_gate_figures"] = dbr.router_figures()
    evaluate(dbr, "moedb + refusal expert (oos_train)")
    abstention(dbr, "calibrated_refusal", "val_tuned_scope_refusal")
    dbr.close()
    # latency per query (embedding excluded: the lookup embedder costs microseconds)
    q = te["texts"][:300]
    res["moedb p50_ms with 5 passages (150 experts)"] = p50_ms(lambda x: db.route(x, top_k=2, k=5, log=False), q)
    res["baselines"] = baselines(data, intents)
    route150 = lambda x: db.route(x, top_k=2, k=0, log=False)  # noqa: E731
    res["semantic-router (150 routes)"] = sr = semantic_router_peer(data, table, groups, moedb_route=route150)
    res["moedb p50_ms (150 experts)"] = sr.get("moedb_p50_ms") or p50_ms(route150, q)
    db.close()
    if not args.quick:
        # 1,000 experts: every intent split into 7 replicas (first 1,000), same 15,000 utterances
        big: dict[str, list[int]] = {}
        for n in intents:
            for r in range(7):
                big[f"{n}#{r}"] = groups[n][r::7]
        big = dict(list(big.items())[:1000])
        p2 = OUT / "bench_routing_1000.db"
        if args.fresh and p2.exists():
            p2.unlink()
        t = time.perf_counter()
        db2 = build_db(p2, data, table, big, None, settings={"gate_folds": 0, "gate_max_iter": 40})
        db2.route("warm up", log=False)
        res["moedb 1000 experts fit_or_load_s"] = time.perf_counter() - t
        route1000 = lambda x: db2.route(x, top_k=2, k=0, log=False)  # noqa: E731
        res["semantic-router (1000 routes)"] = sr2 = semantic_router_peer(data, table, big, fit=False,
                                                                         moedb_route=route1000)
        res["moedb p50_ms (1000 experts)"] = sr2.get("moedb_p50_ms") or p50_ms(route1000, q)
        db2.close()
    (OUT / "bench_routing.json").write_text(json.dumps(res, indent=2, default=float))
    report(res)


def tuned_part(res, data, refusal: bool, fresh: bool, evaluate, abstention) -> None:
    """A file whose embedder was tuned on the train utterances (moedb's tune_embedder, default settings;
    with the oos_train queries as a refusal expert when ``refusal``), evaluated like the others."""
    import moedb

    tag = "tuned" + ("_refusal" if refusal else "")
    path = OUT / f"bench_routing_clinc150_{tag}.db"
    if fresh:
        import shutil

        for suffix in ("", "-wal", "-shm"):
            pathlib.Path(str(path) + suffix).unlink(missing_ok=True)
        shutil.rmtree(str(path) + ".embedders", ignore_errors=True)
    lab = np.array(data["train"]["labels"])
    groups = {n: np.flatnonzero(lab == n).tolist() for n in data["intents"]}
    db = build_db(path, data, None, groups, data["domain_of"], own_embedder=True)  # then tuned
    rec = db.info()["embedder"]
    if not rec.get("tuned"):
        if refusal:
            add_refusal_expert(db, data)
        out = db.tune_embedder(seed=0)
        out["reused"] = False
        res[f"{tag}_tune"] = out
    else:
        res[f"{tag}_tune"] = {**rec["tuned"], "reused": True}
    # the tuned model's vectors of every split, computed once, then served by lookup (latency excluded)
    model = db.embedder
    texts = [t for s in SPLITS for t in data[s]["texts"]]
    V = embed_cached(texts, f"{tag}_{db.info()['embedder']['fingerprint'][:12]}", embedder=model)
    name = db.embedder.name
    db.close()
    db = moedb.connect(str(path), embedder=LookupEmbedder(dict(zip(texts, V)), name=name, model=model),
                       log_queries=False)
    db.route("warm up", log=False)
    res[f"{tag}_gate_figures"] = db.router_figures()
    label = "moedb, tuned embedder" + (" + refusal expert" if refusal else "")
    evaluate(db, label)
    abstention(db, f"calibrated_{tag}", f"val_tuned_scope_{tag}")
    db.close()


def report(res):
    pct = lambda x: f"{100 * x:5.1f}%" if isinstance(x, float) else "  -  "  # noqa: E731
    print("\nCLINC150 test (4,500 in-scope, 1,000 out-of-scope), all-MiniLM-L6-v2 embeddings for everyone")
    print(f"{'router':<46} {'acc':>7} {'top-2':>7} {'ECE':>7} {'domain':>7}")
    rows = [(k, v) for k, v in res.items() if k.startswith("moedb") and isinstance(v, dict)]
    rows += list(res["baselines"].items())
    sr = res["semantic-router (150 routes)"]
    if "acc" in sr:
        rows.append(("semantic-router IndexedRouter (top_k=5, mean)", sr))
    for k, v in rows:
        print(f"{k:<46} {pct(v.get('acc'))} {pct(v.get('top2'))} {pct(v.get('ece'))} {pct(v.get('domain_acc'))}")
    print("\nabstention                                          threshold   in-scope acc   refused in-scope   oos recall")
    for label, key in (("moedb scope rule, calibrated on its documents (default)", "calibrated"),
                       ("moedb scope rule, min_scope tuned on val + oos_val", "val_tuned_scope"),
                       ("moedb top-confidence rule tuned on val + oos_val", "val_tuned_threshold"),
                       ("moedb + refusal expert (oos_train), calibrated", "calibrated_refusal"),
                       ("moedb + refusal expert, min_scope tuned on val", "val_tuned_scope_refusal"),
                       ("moedb, tuned embedder, calibrated", "calibrated_tuned"),
                       ("moedb, tuned embedder, min_scope tuned on val", "val_tuned_scope_tuned"),
                       ("moedb, tuned + refusal expert, calibrated", "calibrated_tuned_refusal"),
                       ("moedb, tuned + refusal expert, min_scope tuned on val", "val_tuned_scope_tuned_refusal")):
        c = res.get(key)
        if c is None:
            continue
        print(f"{label:<52} {c['threshold']:7.3f}   {pct(c['acc_at_threshold'])}"
              f"         {pct(c['refused_in_scope'])}           {pct(c['oos_recall'])}")
    if "acc_at_threshold" in sr:
        print(f"semantic-router fit on val + oos_val                       -   {pct(sr['acc_at_threshold'])}"
              f"               -             {pct(sr['oos_recall'])}")
    h = res["moedb hierarchical (beam 3 of 10 domains)"]
    print(f"\nhierarchy: flat {pct(res['moedb flat, no balancing']['acc'])} vs beam {pct(h['acc'])}, "
          f"leaves scored {h['leaves_scored']:.1f} of 150")
    print("\nrouting latency per query, embedding excluded (p50, same run, timed in alternating blocks of 25 queries)")
    for n, peer in (("150", sr), ("1000", res.get("semantic-router (1000 routes)", {}))):
        mine = res.get(f"moedb p50_ms ({n} experts)")
        if mine is None:
            continue
        if "p50_ms" in peer:
            print(f"  {n:>4} experts: moedb {mine:.3f} ms   semantic-router {peer['p50_ms']:.3f} ms   "
                  f"ratio x{peer['p50_ms'] / mine:.1f}")
        else:  # the peer is not installed (pip install 'moedb[bench]')
            print(f"  {n:>4} experts: moedb {mine:.3f} ms   semantic-router {peer.get('skipped', 'not run')}")
    print(f"  (moedb with retrieval of 5 passages, 150 experts: {res['moedb p50_ms with 5 passages (150 experts)']:.3f} ms)")
    for tag in ("tuned", "tuned_refusal"):
        t = res.get(f"{tag}_tune")
        if t:
            print(f"\n{tag}: tune_embedder {t['epochs']} epochs on {t['trained']} documents, {t['held_out']} held out; "
                  f"held-out nearest centroid {pct(t['holdout_accuracy_before'])} -> {pct(t['holdout_accuracy_after'])}"
                  + (" (cached file)" if t.get("reused") else f"; {t['train_seconds']:.0f} s training, "
                     f"{t['seconds']:.0f} s in all"))


if __name__ == "__main__":
    main()
