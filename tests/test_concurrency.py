"""Two processes on one file: one writes while another routes (WAL + busy timeout)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import moedb

DIM = 16

WRITER = textwrap.dedent("""
    import sys, numpy as np, moedb
    path, n = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(7)
    with moedb.connect(path, embedder=moedb.VectorsOnly({dim})) as d:
        for i in range(n):
            v = rng.normal(size=(20, {dim}))
            v[:, i % {dim}] += 6.0                      # each new expert owns one axis
            d.add_expert(f"w{{i}}", [f"w{{i}} doc {{j}}" for j in range(20)], vectors=v)
    print("writer done")
""").format(dim=DIM)

READER = textwrap.dedent("""
    import sys, numpy as np, moedb
    path, n = sys.argv[1], int(sys.argv[2])
    seen, routes, bad = set(), 0, 0
    with moedb.connect(path, embedder=moedb.VectorsOnly({dim})) as d:
        q = np.zeros({dim}); q[0] = 1.0
        for _ in range(n):
            r = d.route(q, top_k=3, k=5, min_confidence=0.0)
            routes += 1
            names = [e.name for e in r.experts]
            seen.update(names)
            # every hit must belong to a chosen expert and exist (never a half-written expert)
            if any(h.expert not in names for h in r.hits) or (names and not r.hits):
                bad += 1
    print(routes, len(seen), bad)
""").format(dim=DIM)


def run_pair(tmp_path, path: str, writer: str, writer_arg: str, reader: str, reader_arg: str) -> tuple[str, str]:
    """Start a writer and a reader script on the same file at once; both must succeed. Returns their stdout."""
    procs = []
    for name, script, arg in (("w.py", writer, writer_arg), ("r.py", reader, reader_arg)):
        (tmp_path / name).write_text(script)
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / name), path, arg], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(out)
    return outs[0], outs[1]


def test_one_process_writes_while_another_routes(tmp_path):
    path = str(tmp_path / "shared.db")
    rng = np.random.default_rng(0)
    with moedb.connect(path, embedder=moedb.VectorsOnly(DIM)) as d:
        d.add_expert("seed", ["s"], vectors=rng.normal(size=(1, DIM)))
    wout, rout = run_pair(tmp_path, path, WRITER, "40", READER, "400")
    assert "writer done" in wout
    routes, seen, bad = map(int, rout.split())
    assert routes == 400 and bad == 0
    with moedb.connect(path, embedder=moedb.VectorsOnly(DIM)) as d:
        assert len(d.experts()) == 41
        assert d.store.log.count() == 400  # every route of the reader was logged despite the writer
        # the reader's process saw the writer's new experts while it ran (cache refresh across processes)
        q = np.zeros(DIM)
        q[5] = 1.0
        assert d.route(q, top_k=1, min_confidence=0.0, log=False).experts[0].name in {f"w{i}" for i in range(5, 40, DIM)}
    assert seen >= 2


def test_a_reader_sees_new_experts_without_reopening(tmp_path):
    path = str(tmp_path / "x.db")
    a = moedb.connect(path, embedder=moedb.VectorsOnly(DIM))
    b = moedb.connect(path, embedder=moedb.VectorsOnly(DIM))
    try:
        v = np.eye(DIM)[:1]
        a.add_expert("first", ["f"], vectors=v)
        assert [e.name for e in b.route(v[0], top_k=5, min_confidence=0.0, log=False).experts] == ["first"]
        a.add_expert("second", ["s"], vectors=np.eye(DIM)[1:2])
        assert b.route(np.eye(DIM)[1], top_k=1, min_confidence=0.0, log=False).experts[0].name == "second"
        a.remove_documents("second", [a.documents("second")[0]["id"]])
        assert [e.name for e in b.route(np.eye(DIM)[1], top_k=5, min_confidence=0.0, log=False).experts] == ["first"]
    finally:
        a.close()
        b.close()


def test_a_reader_sees_every_change_of_another_connection_s_experts(tmp_path):
    """The refresh re-reads only rows that changed: each kind of change must still show."""
    path = str(tmp_path / "rows.db")
    a = moedb.connect(path, embedder=moedb.VectorsOnly(DIM))
    b = moedb.connect(path, embedder=moedb.VectorsOnly(DIM))

    def seen():
        return {e.name: (e.description, e.keywords, e.parent, e.size, e.metadata, e.refuse,
                         None if e.centroid is None else np.round(e.centroid, 5).tolist()) for e in b.experts()}

    def written():
        c = moedb.connect(path, embedder=moedb.VectorsOnly(DIM))  # a fresh connection reads every row
        try:
            return {e.name: (e.description, e.keywords, e.parent, e.size, e.metadata, e.refuse,
                             None if e.centroid is None else np.round(e.centroid, 5).tolist()) for e in c.experts()}
        finally:
            c.close()

    try:
        a.add_expert("top")
        a.add_expert("left", ["l1", "l2"], vectors=np.eye(DIM)[:2], parent="top")
        a.add_expert("right", ["r1"], vectors=np.eye(DIM)[2:3], parent="top")
        assert seen() == written() and b.expert("top").centroid is not None  # a parent's centroid from its children
        steps = [lambda: a.update_expert("left", description="now described", keywords=["k"]),
                 lambda: a.update_expert("right", metadata={"team": "x"}),
                 lambda: a.add_documents("right", ["r2"], vectors=np.eye(DIM)[3:4]),
                 lambda: a.remove_documents("left", [a.documents("left")[0]["id"]]),
                 lambda: a.update_expert("right", parent=None),   # top's centroid is left's alone now
                 lambda: a.remove_expert("top"),                   # left's parent goes (ON DELETE SET NULL)
                 lambda: a.add_expert("noise", ["n"], vectors=np.eye(DIM)[5:6], refuse=True),
                 lambda: a.remove_expert("left")]
        for step in steps:
            before = seen()
            step()
            now = seen()
            assert now == written() and now != before
        assert set(seen()) == {"right", "noise"} and seen()["right"][2] is None
        # what a caller gets is a copy or read-only: editing it cannot change what later calls see
        e = b.expert("right")
        with pytest.raises(ValueError):
            e.centroid[:] = 7.0
        e.metadata["team"] = "changed"
        e.keywords.append("changed")
        assert seen() == written()
    finally:
        a.close()
        b.close()


REFITTER = textwrap.dedent("""
    import sys, numpy as np, moedb
    path, n = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(11)
    with moedb.connect(path, embedder=moedb.VectorsOnly({dim})) as d:
        for i in range(n):
            v = rng.normal(size=(12, {dim}))
            v[:, (i + 3) % {dim}] += 6.0
            d.add_expert(f"r{{i}}", [f"r{{i}} doc {{j}}" for j in range(12)], vectors=v)
            figures = d.refit_router()                   # fit + persist a new gate while the other routes
            assert figures["experts"] == 3 + i + 1, figures
    open(path + ".done", "w").close()
    print("refits done")
""").format(dim=DIM)

GATE_READER = textwrap.dedent("""
    import sys, numpy as np, moedb
    import os, time
    path, limit = sys.argv[1], float(sys.argv[2])
    sizes, i, t0 = [], 0, time.time()
    with moedb.connect(path, embedder=moedb.VectorsOnly({dim})) as d:
        while time.time() - t0 < limit:
            done = os.path.exists(path + ".done")          # one more route after the writer finished
            i += 1
            q = np.zeros({dim}); q[i % {dim}] = 1.0
            r = d.route(q, top_k=3, k=3, min_confidence=0.0, log=False)
            conf = [e.confidence for e in r.experts]
            assert r.experts and all(0.0 <= c <= 1.0 for c in conf) and conf == sorted(conf, reverse=True), conf
            assert {{h.expert for h in r.hits}} <= {{e.name for e in r.experts}}
            sizes.append(d.router_figures()["experts"])
            if done:
                break
    assert sizes == sorted(sizes), "the gate a reader sees never goes back to an older one"
    print(min(sizes), max(sizes))
""").format(dim=DIM)


def test_routing_during_refits_in_another_process_sees_whole_gates(tmp_path):
    """One process adds experts and refits the gate repeatedly; another routes meanwhile."""
    path = str(tmp_path / "gate.db")
    rng = np.random.default_rng(1)
    with moedb.connect(path, embedder=moedb.VectorsOnly(DIM)) as d:
        for i in range(3):
            v = rng.normal(size=(12, DIM))
            v[:, i] += 6.0
            d.add_expert(f"base{i}", [f"b{i} {j}" for j in range(12)], vectors=v)
        d.refit_router()
    wout, rout = run_pair(tmp_path, path, REFITTER, "8", GATE_READER, "240")
    assert "refits done" in wout
    lo, hi = map(int, rout.split())
    assert lo < hi == 11  # it routed through several gate generations and ended on the newest
