"""Attack suite: a 4-process soak (issue 15). For a while, four processes share one file: one adds experts
and documents, one routes, one ingests feedback files, one creates, merges and renames experts. Each counts
its calls, busy errors (target 0: the store waits for the lock and long work holds none) and any other
exception; at the end every write a process saw committed must be in the file (lost writes, target 0) and
the file must pass ``integrity_check``.

A short soak runs by default; the long one (60 s) is marked ``slow``. Counts are printed (attack_tally)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import moedb

from attack_tally import Tally, integrity_ok

D = 16
WORKER = r'''
import json, sys, time, traceback, numpy as np, moedb
role, path, seconds, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
D = %d
rng = np.random.default_rng(abs(hash(role)) %% 1000)
db = moedb.connect(path, embedder=moedb.VectorsOnly(D))
res = {"role": role, "calls": 0, "busy": 0, "errors": [], "committed": []}
end = time.monotonic() + seconds
k = 0
def vecs(n, axis):
    return np.eye(D)[axis %% D] * 3 + 0.3 * rng.normal(size=(n, D))
while time.monotonic() < end:
    k += 1
    try:
        if role == "add":  # 20 experts, then documents for them (the file stays of a size a refit takes seconds for)
            if k <= 20:
                db.add_expert(f"a{k}", [f"a{k} {i}" for i in range(20)], vectors=vecs(20, k))
                res["committed"].append(["expert", f"a{k}", None])
            else:
                db.add_documents(f"a{k %% 20 + 1}", [{"id": f"q{k}-{i}", "text": f"q {k} {i}"} for i in range(10)],
                                 vectors=vecs(10, k %% 20 + 1))
                res["committed"].append(["docs", f"a{k %% 20 + 1}", f"q{k}-", 10])
            db.add_documents("pool", [{"id": f"p{k}-{i}", "text": f"p {k} {i}"} for i in range(10)], vectors=vecs(10, 0))
            res["committed"].append(["docs", "pool", f"p{k}-", 10])
        elif role == "route":
            r = db.route(vecs(1, k)[0], top_k=2)
            res["committed"].append(["query", r.query_id])
        elif role == "ingest":
            qids = [db.route(vecs(1, i)[0]).query_id for i in range(3)]
            f = out + f".{k}.jsonl"
            with open(f, "w") as fh:
                for i in range(50):
                    fh.write(json.dumps({"id": f"e{k}-{i}", "query_id": qids[i %% 3], "expert": "pool" if i %% 2 else "other",
                                         "reward": 1 if i %% 3 else -1}) + "\n")
            rep = db.ingest_feedback(f)
            assert rep["taken"] + rep["already_present"] == 50, rep
            res["committed"].append(["feedback", f"e{k}-", 50])
        else:
            db.add_expert(f"mx{k}", [f"x {i}" for i in range(20)], vectors=vecs(20, k))
            db.add_expert(f"my{k}", [f"y {i}" for i in range(20)], vectors=vecs(20, k + 1))
            db.merge_experts([f"mx{k}", f"my{k}"], f"mm{k}")
            res["committed"].append(["expert", f"mm{k}", 40])
            db.rename_expert(f"mm{k}", f"mr{k}")
            res["committed"][-1] = ["expert", f"mr{k}", 40]
        res["calls"] += 1
    except Exception as e:
        if type(e).__name__ in ("DatabaseBusy", "BusyError"):
            res["busy"] += 1
        else:
            res["errors"].append(traceback.format_exc()[-600:])
json.dump(res, open(out, "w"))
''' % D


def _lost(path: str, results: list[dict]) -> list[str]:
    lost = []
    with moedb.connect(path, embedder=moedb.VectorsOnly(D)) as db:
        names = {e.name: e.size for e in db.experts()}
        ids_of = {n: {d["id"] for d in db.documents(n)} for n in names}
        keys = {r[0] for r in db.store.q("SELECT event_key FROM feedback")}
        for res in results:
            for item in res["committed"]:
                kind = item[0]
                if kind == "expert" and (item[1] not in names or item[2] not in (None, names[item[1]])):
                    lost.append(f"{res['role']}: expert {item[1]} has {names.get(item[1])} documents, not {item[2]}")
                elif kind == "docs" and sum(1 for i in range(item[3])
                                            if f"{item[2]}{i}" in ids_of.get(item[1], ())) != item[3]:
                    lost.append(f"{res['role']}: documents {item[2]}* of {item[1]}")
                elif kind == "feedback" and sum(1 for i in range(item[2]) if f"id:{item[1]}{i}" in keys) != item[2]:
                    lost.append(f"{res['role']}: feedback {item[1]}*")
                elif kind == "query":
                    try:
                        db.query_log(item[1])
                    except moedb.errors.MoedbError:
                        lost.append(f"{res['role']}: query {item[1]}")
    return lost


@pytest.mark.parametrize("seconds", [pytest.param(8, id="short"), pytest.param(60, id="long", marks=pytest.mark.slow)])
@pytest.mark.timeout(900)
def test_attack_four_process_soak(tmp_path, seconds):
    path = str(tmp_path / "soak.db")
    with moedb.connect(path, embedder=moedb.VectorsOnly(D)) as db:
        db.add_expert("pool", ["p"], vectors=np.eye(D)[:1])
        db.add_expert("other", ["o"], vectors=np.eye(D)[1:2])
    roles = ["add", "route", "ingest", "merge"]
    outs = {r: str(tmp_path / f"{r}.json") for r in roles}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, r, path, str(seconds), outs[r]],
                              stderr=subprocess.PIPE, text=True) for r in roles]
    errs = [p.communicate(timeout=seconds + 600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    results = [json.load(open(outs[r])) for r in roles]
    tally = Tally(f"4-process soak ({seconds} s: add, route, ingest, merge/rename)")
    tally.tried = sum(r["calls"] + r["busy"] + len(r["errors"]) for r in results)
    tally.ok = sum(r["calls"] for r in results)
    tally.clean = sum(r["busy"] for r in results)       # (busy errors: reported as such below)
    tally.tracebacks = sum(len(r["errors"]) for r in results)
    for r in results:
        for e in r["errors"][:2]:
            tally.note(f"{r['role']}: {e}")
    lost = _lost(path, results)
    tally.lost = len(lost)
    for x in lost[:3]:
        tally.note(x)
    tally.corrupted = 0 if integrity_ok(path) else 1
    tally.report()
    print("per role:", {r["role"]: {"calls": r["calls"], "busy": r["busy"], "errors": len(r["errors"])} for r in results})
    assert all(r["calls"] > 0 for r in results)
    assert tally.clean == 0, "busy errors"
    assert tally.tracebacks == 0 and tally.lost == 0 and tally.corrupted == 0
