"""Writers never see a raw busy error, and long work holds no write lock (issue 15, item 5).

Merge and split refitted the router inside their write transaction (4.9 s alone, 42 s under load), so
other writers hit the busy timeout with a raw ``apsw.BusyError``; while another process kept creating
experts, every route refitted the whole router. Here: a lock held past the busy timeout is a
:class:`DatabaseBusy` naming the file; a lock released within it is waited for; the refit of merge,
split, retrain and refit_router and split's k-means run while another connection can write; a split whose
expert changes under its k-means is computed again; a stale gate is served while refits are spaced out."""
from __future__ import annotations

import threading
import time

import apsw
import numpy as np
import pytest

import moedb
from moedb.engine import gate as gate_mod
from moedb.errors import DatabaseBusy, MoedbError
from moedb.lifecycle import evolve as evolve_mod

D = 8


def _db(path, busy_ms=None):
    db = moedb.connect(path, embedder=moedb.VectorsOnly(D))
    if busy_ms is not None:  # (the store's timeout; the default is 30 s)
        db.store.db.busy_timeout_ms = busy_ms
        db.store.db.conn.setbusytimeout(busy_ms)
    return db


def _experts(db, names, per=6, seed=0):
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        db.add_expert(name, [f"{name}-{j}" for j in range(per)],
                      vectors=np.eye(D)[i % D] * 3 + 0.3 * rng.normal(size=(per, D)))


def _hold_lock(path, seconds):
    """Another connection holding the write lock for ``seconds`` (a thread; returns it started)."""
    held = threading.Event()

    def run():
        c = apsw.Connection(path)
        c.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(seconds)
        c.execute("COMMIT")
        c.close()

    t = threading.Thread(target=run)
    t.start()
    held.wait(5)
    return t


def test_a_lock_held_past_the_timeout_is_a_moedb_error(db_path):
    db = _db(db_path, busy_ms=300)
    _experts(db, ["a"])
    db.route(np.eye(D)[0])  # (the gate is fitted: the route below only writes its log)
    t = _hold_lock(db_path, 3)
    try:
        for call in (lambda: db.add_expert("b", ["x"], vectors=np.ones((1, D))),
                     lambda: db.add_documents("a", ["y"], vectors=np.ones((1, D))),
                     lambda: db.route(np.eye(D)[0])):
            with pytest.raises(DatabaseBusy, match="database is busy") as e:
                call()
            assert isinstance(e.value, MoedbError) and db_path in str(e.value)
    finally:
        t.join()
    assert [x.name for x in db.experts()] == ["a"] and db.expert("a").size == 6
    db.add_expert("b", ["x"], vectors=np.ones((1, D)))  # the lock is free again
    db.close()


def test_a_lock_released_within_the_timeout_is_waited_for(db_path):
    db = _db(db_path, busy_ms=5000)
    _experts(db, ["a"])
    t = _hold_lock(db_path, 0.5)
    db.add_documents("a", ["y"], vectors=np.ones((1, D)))
    t.join()
    assert db.expert("a").size == 7
    db.close()


def _probe_writes(db_path, box):
    """A write from another connection with a 200 ms busy timeout: does it get the lock now?"""
    other = _db(db_path, busy_ms=200)
    try:
        other.add_expert(f"probe{time.monotonic_ns()}", ["p"], vectors=np.eye(D)[7:8])
        box.append("wrote")
    except DatabaseBusy:
        box.append("busy")
    finally:
        other.close()


@pytest.fixture
def probe_fits(monkeypatch, db_path):
    """Every gate fit first checks that another connection can write meanwhile."""
    box: list[str] = []
    real = gate_mod.Router.fit

    def fit(*a, **kw):
        _probe_writes(db_path, box)
        return real(*a, **kw)

    monkeypatch.setattr(gate_mod.Router, "fit", staticmethod(fit))
    return box


@pytest.mark.parametrize("op", ["merge", "split", "refit", "retrain", "optimize"])
def test_refits_hold_no_write_lock(db_path, probe_fits, op):
    db = _db(db_path)
    _experts(db, ["a", "b", "c"])
    db.route(np.eye(D)[0])
    probe_fits.clear()
    if op == "merge":
        db.merge_experts(["a", "b"], "ab")
    elif op == "split":
        db.split_expert("c", 2)
    elif op == "refit":
        db.refit_router()
    elif op == "optimize":
        db.feedback(db.route(np.eye(D)[0]).query_id, "a", 1)
        assert db.optimize(apply=True)["applied"]
    else:
        db.feedback(db.route(np.eye(D)[0]).query_id, "a", 1)
        db.retrain()
    assert probe_fits and set(probe_fits) == {"wrote"}, probe_fits
    db.close()


def test_split_k_means_holds_no_write_lock_and_a_change_meanwhile_is_redone(db_path, monkeypatch):
    db = _db(db_path)
    _experts(db, ["a", "b"], per=8)
    calls, box = [], []
    real = evolve_mod.choose_clusters

    def clusters(X, *a):
        calls.append(len(X))
        _probe_writes(db_path, box)
        if len(calls) == 1:  # another process adds a document to the expert being split
            other = _db(db_path)
            other.add_documents("a", ["late"], vectors=np.eye(D)[:1] * 3)
            other.close()
        return real(X, *a)

    monkeypatch.setattr(evolve_mod, "choose_clusters", clusters)
    out = db.split_expert("a", 2)
    assert calls == [8, 9] and set(box) == {"wrote"}
    assert sum(c["size"] for c in out["children"]) == 9 and db.expert("a").size == 0
    db.close()


def test_routes_serve_the_previous_gate_while_refits_are_spaced_out(db_path, monkeypatch):
    """Another process keeps creating experts: a connection goes on serving its gate instead of refitting on
    every route, while that gate was slow to fit and is recent; warm_router, time and a removed expert refit."""
    db = _db(db_path)
    _experts(db, ["a", "b", "c"])
    db.refit_router()
    reader = _db(db_path)
    reader.route(np.eye(D)[0])
    fits = []
    real = gate_mod.Router.fit
    monkeypatch.setattr(gate_mod.Router, "fit", staticmethod(lambda *a, **kw: fits.append(1) or real(*a, **kw)))

    def slow_and_recent(ago=0.0):  # the reader's gate says its fit took 60 s (as on a large file)
        reader.gate.current().gate.figures_.update(fit_seconds=60.0, fitted_at=time.time() - ago)

    slow_and_recent()
    for i in range(3):
        db.add_expert(f"new{i}", ["n"], vectors=np.eye(D)[3 + i:4 + i] * 3)  # "another process"
        assert reader.route(np.eye(D)[0], top_k=1).experts[0].name == "a"
    assert fits == []                                                    # no refit per route
    assert reader.route(np.eye(D)[3], top_k=3, min_confidence=0.0).experts[0].name != "new0"  # not in it yet
    reader.warm_router()                                                 # an explicit warm-up refits
    assert len(fits) == 1 and reader.route(np.eye(D)[3], top_k=1, min_confidence=0.0).experts[0].name == "new0"
    slow_and_recent(ago=301)                                             # the spacing (5 x 60 s) has passed
    db.add_expert("new9", ["n"], vectors=np.eye(D)[6:7] * 3)
    reader.route(np.eye(D)[0])
    assert len(fits) == 2
    slow_and_recent()
    db.remove_expert("b")                                                # an expert the gate scores is gone
    assert all(e.name != "b" for e in reader.route(np.eye(D)[1], top_k=3, min_confidence=0.0).experts)
    assert len(fits) == 3
    fresh = _db(db_path)                                                 # a new connection fits at once
    db.add_expert("new10", ["n"], vectors=np.eye(D)[7:8] * 3)
    fresh.route(np.eye(D)[7])
    assert len(fits) == 4
    for d in (db, reader, fresh):
        d.close()
