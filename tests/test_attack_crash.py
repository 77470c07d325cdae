"""Attack suite: kill -9 during ingest, merge and refit (issue 15). A child process loops over large
add_documents calls, merges of two experts (with their refit) and refits/splits; it is SIGKILLed at a
random moment, then the file is checked: ``integrity_check`` is ok, every call is all-or-nothing (a batch
of documents is wholly present or absent; a merge happened wholly or not at all), nothing a finished call
reported is lost, and every expert's stored vector sum equals the sum of its documents' vectors.

A short loop runs by default; the long one (30 kills) is marked ``slow``. Counts are printed (attack_tally)."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import moedb

from attack_tally import Tally, integrity_ok

D = 32
BATCH = 4000
CHILD = r'''
import os, sys, numpy as np, moedb
path, log, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
D, BATCH = %d, %d
rng = np.random.default_rng(seed)
out = open(log, "a", buffering=1)
def note(s):
    out.write(s + "\n"); out.flush(); os.fsync(out.fileno())
db = moedb.connect(path, embedder=moedb.VectorsOnly(D))
note("ready")
k = seed  # (each child starts with another of the three operations)
while True:
    k += 1
    tag = f"{seed}-{k}"
    op = ("ingest", "merge", "refit")[k %% 3]
    if op == "ingest":
        note(f"start ingest {tag}")
        db.add_documents("pool", [{"id": f"b{tag}-{i}", "text": f"text {tag} {i}"} for i in range(BATCH)],
                         vectors=rng.normal(size=(BATCH, D)))
        note(f"done ingest {tag}")
    elif op == "merge":
        for side in "xy":
            db.add_expert(f"{side}{tag}", [f"{side} {i}" for i in range(300)], vectors=rng.normal(size=(300, D)))
        note(f"start merge {tag}")
        db.merge_experts([f"x{tag}", f"y{tag}"], f"m{tag}")
        note(f"done merge {tag}")
    else:
        note(f"start refit {tag}")
        db.refit_router()
        if k %% 2:
            name = f"m{seed}-{k - 1}"
            if any(e.name == name for e in db.experts()):
                db.split_expert(name, 2)
        note(f"done refit {tag}")
''' % (D, BATCH)


def _check(path: str, log: str, tally: Tally, during: dict[str, int]) -> None:
    """After a kill: integrity, whole-call atomicity, no lost finished call, centroids."""
    tally.tried += 1
    steps = [x.split() for x in open(log).read().split("\n") if x.startswith(("start ", "done "))]
    last = steps[-1] if steps else ["", "setup"]
    op = last[1] if last[0] == "start" else "between calls"
    during[op] = during.get(op, 0) + 1
    if not integrity_ok(path):
        tally.corrupted += 1
        tally.note("integrity_check failed")
        return
    lines = open(log).read().split("\n")
    done = {tuple(x.split()[1:]) for x in lines if x.startswith("done ")}
    started = {tuple(x.split()[1:]) for x in lines if x.startswith("start ")}
    with moedb.connect(path, embedder=moedb.VectorsOnly(D)) as db:
        names = {e.name: e for e in db.experts()}
        pool = names["pool"]
        counts: dict[str, int] = {}
        for d in db.documents("pool"):
            m = re.match(r"^(b\d+-\d+)-\d+$", d["id"])
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        bad = [t for t, n in counts.items() if n != BATCH]
        lost = [t for op, t in done if op == "ingest" and counts.get("b" + t, 0) != BATCH]
        for op, t in started:
            if op != "merge":
                continue
            x, y, m = f"x{t}" in names, f"y{t}" in names, f"m{t}" in names or any(
                n.startswith(f"m{t}/") for n in names)
            if not ((x and y and not m) or (m and not x and not y)):
                bad.append(f"merge {t}: x={x} y={y} m={m}")
            if ("merge", t) in done and not m:
                lost.append(f"merge {t}")
        for r in db.catalog.rows:
            _, V = db.catalog.expert_docs(r)
            if r["size"] != len(V) or (len(V) and not np.allclose(r["vec_sum"], V.sum(axis=0), atol=1e-3 * len(V))):
                bad.append(f"centroid of {r['name']}")
        assert pool.size == sum(counts.values()) + 1  # (and the seed document)
    if bad or lost:
        tally.lost += 1
        tally.note(f"partial {bad[:3]} lost {lost[:3]}")
    else:
        tally.clean += 1


@pytest.mark.parametrize("kills", [pytest.param(3, id="short"), pytest.param(30, id="long", marks=pytest.mark.slow)])
@pytest.mark.timeout(3600)
def test_attack_kill_during_ingest_merge_and_refit(tmp_path, kills):
    path, log = str(tmp_path / "crash.db"), str(tmp_path / "ops.log")
    with moedb.connect(path, embedder=moedb.VectorsOnly(D)) as db:
        db.add_expert("pool", ["seed"], vectors=np.ones((1, D)))
        db.add_expert("other", ["other"], vectors=-np.ones((1, D)))
    tally = Tally("kill -9 during ingest, merge and refit")
    rnd = random.Random(15)
    during: dict[str, int] = {}
    try:
        for i in range(kills):
            start = len(open(log).read()) if os.path.exists(log) else 0
            p = subprocess.Popen([sys.executable, "-c", CHILD, path, log, str(i)], stderr=subprocess.PIPE)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 120:  # wait for "ready", then let it work for a while
                if "ready" in (open(log).read()[start:] if os.path.exists(log) else ""):
                    break
                if p.poll() is not None:
                    raise AssertionError(p.stderr.read().decode()[-2000:])
                time.sleep(0.05)
            # a child whose first call is an ingest (a few hundred ms) is killed early, the others later
            time.sleep(rnd.uniform(0.02, 0.8) if (i + 1) % 3 == 0 else rnd.uniform(0.2, 6.0))
            if p.poll() is not None:
                tally.tracebacks += 1
                tally.note(p.stderr.read().decode()[-500:])
                continue
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            p.stderr.close()
            _check(path, log, tally, during)
    finally:
        tally.note(f"killed during: {during}")
        tally.report()
    assert tally.corrupted == 0 and tally.lost == 0 and tally.tracebacks == 0
    assert tally.tried == kills
