"""Load analytics: figures checked against counts computed independently from the same synthetic log."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moedb
from moedb.analytics.stats import bucket_width, imbalance
from moedb.embed import VectorsOnly
from moedb.errors import InvalidInput

from conftest import run_cli, has_matplotlib

D = 4
T0 = 1_700_000_000.0


def _make(path, n=400, seed=0):
    """A file with 4 experts and ``n`` synthetic logged routes of known content.

    Returns the database and the ground truth as arrays: ts, abstained, latency, top expert
    name (or None), top confidence, second expert name (or None).
    """
    rng = np.random.default_rng(seed)
    db = moedb.connect(path, embedder=VectorsOnly(D))
    names = ["north", "south", "east", "west"]
    for i, nm in enumerate(names):
        db.add_expert(nm, [f"{nm}{j}" for j in range(3)], vectors=np.eye(D)[i] + 0.1 * rng.normal(size=(3, D)))
    ids = {nm: db.catalog.require(nm)["id"] for nm in names}
    p = np.array([0.55, 0.25, 0.15, 0.05])
    truth = {"ts": [], "abst": [], "lat": [], "top": [], "conf": [], "second": []}
    entries = []
    for i in range(n):
        ts = T0 + float(rng.uniform(0, 86400))
        lat = float(rng.gamma(2.0, 3.0))
        abst = bool(rng.random() < 0.1)
        if abst:
            top, conf, second, choices = None, None, None, []
        else:
            a, b = rng.choice(4, size=2, replace=False, p=p)
            conf = float(rng.uniform(0.4, 1.0))
            top, second = names[a], names[b]
            choices = [(ids[top], 0, 0.5, conf), (ids[second], 1, 0.2, (1 - conf) / 2)]
        entries.append({"ts": ts, "query": f"q{i}", "query_vec": None, "abstained": abst, "top_confidence": conf,
                        "latency_ms": lat, "choices": choices})
        for k, v in zip(truth, (ts, abst, lat, top, conf, second)):
            truth[k].append(v)
    qids = db.store.log.append(entries)
    return db, {k: np.array(v, dtype=object) for k, v in truth.items()}, qids


@pytest.fixture
def logged(db_path):
    db, truth, qids = _make(db_path)
    yield db, truth, qids
    db.close()


def _pct(x, q):
    return float(np.percentile(np.asarray(x, float), q, method="lower"))


def test_stats_match_independent_counts(logged):
    db, t, _ = logged
    s = db.stats()
    n = len(t["ts"])
    assert s["queries"] == n and s["abstained"] == int(t["abst"].sum()) and s["routed"] == n - int(t["abst"].sum())
    assert s["abstention_rate"] == pytest.approx(t["abst"].mean())
    assert s["latency_ms"]["p50"] == pytest.approx(_pct(t["lat"], 50))
    assert s["latency_ms"]["p95"] == pytest.approx(_pct(t["lat"], 95))
    by = {e["name"]: e for e in s["experts"]}
    assert set(by) == {"north", "south", "east", "west"}
    for nm, e in by.items():
        mine = t["top"] == nm
        assert e["queries"] == int(mine.sum())
        assert e["selected"] == int(mine.sum() + (t["second"] == nm).sum())
        assert e["share"] == pytest.approx(mine.sum() / s["routed"])
        assert e["mean_confidence"] == pytest.approx(np.mean(t["conf"][mine].astype(float)))
        assert e["latency_p50_ms"] == pytest.approx(_pct(t["lat"][mine], 50))
        assert e["latency_p95_ms"] == pytest.approx(_pct(t["lat"][mine], 95))
    assert [e["queries"] for e in s["experts"]] == sorted((e["queries"] for e in s["experts"]), reverse=True)
    counts = np.array([by[nm]["queries"] for nm in by], float)
    mean = counts.mean()
    gini = np.abs(counts[:, None] - counts[None, :]).sum() / (2 * len(counts) ** 2 * mean)
    shares = counts / counts.sum()
    imb = s["imbalance"]
    assert imb["experts"] == 4
    assert imb["cv"] == pytest.approx(counts.std() / mean)
    assert imb["gini"] == pytest.approx(gini)
    assert imb["max_mean"] == pytest.approx(counts.max() / mean)
    assert imb["entropy_bits"] == pytest.approx(-(shares * np.log2(shares)).sum())
    assert imb["entropy_norm"] == pytest.approx(imb["entropy_bits"] / 2)


def test_load_over_time_and_time_window(logged):
    db, t, _ = logged
    s = db.stats(buckets=24)
    lot = s["load_over_time"]
    assert lot["bucket_seconds"] == 3600
    ts = t["ts"].astype(float)
    for b in lot["buckets"]:
        inside = (ts >= b["start"]) & (ts < b["start"] + 3600)
        assert b["queries"] == int(inside.sum())
        assert b["abstained"] == int((inside & t["abst"].astype(bool)).sum())
        for nm, c in b["by_expert"].items():
            assert c == int((inside & (t["top"] == nm)).sum())
    assert sum(b["queries"] for b in lot["buckets"]) == len(ts)
    lo, hi = T0 + 3 * 3600, T0 + 9 * 3600
    w = db.stats(since=lo, until=hi)
    inside = (ts >= lo) & (ts < hi)
    assert w["queries"] == int(inside.sum())
    assert {e["name"]: e["queries"] for e in w["experts"]} == \
        {nm: int((inside & (t["top"] == nm)).sum()) for nm in ["north", "south", "east", "west"]}
    assert w["latency_ms"]["p95"] == pytest.approx(_pct(t["lat"][inside], 95))
    assert all(lo <= b["start"] + 3600 and b["start"] < hi for b in w["load_over_time"]["buckets"])
    iso = db.stats(since="2023-11-14T22:13:20+00:00")      # == T0
    assert iso["queries"] == len(ts)
    with pytest.raises(InvalidInput, match="until must be later"):
        db.stats(since=hi, until=lo)
    with pytest.raises(InvalidInput, match="since"):
        db.stats(since="yesterday-ish")
    empty = db.stats(since=T0 + 10 * 86400)
    assert empty["queries"] == 0 and empty["imbalance"]["gini"] is None and empty["load_over_time"]["buckets"] == []


def test_feedback_success_rate_and_removed_experts(logged):
    db, t, qids = logged
    routed = [q for q, a in zip(qids, t["abst"]) if not a][:10]
    for i, q in enumerate(routed):
        db.store.feedback.insert([(f"k{i}", q, "q", None, db.catalog.require("north")["id"], 1.0 if i < 7 else -1.0,
                                   T0 + i, 0, "test")])
    s = db.stats()
    north = next(e for e in s["experts"] if e["name"] == "north")
    assert north["feedback"] == 10 and north["feedback_success_rate"] == pytest.approx(0.7)
    west_top = int((t["top"] == "west").sum())
    db.remove_expert("west")
    s = db.stats()
    gone = [e for e in s["experts"] if e["name"].endswith("(removed)")]
    assert len(gone) == 1 and gone[0]["queries"] == west_top


def test_stats_after_merge_follows_the_target(logged):
    db, t, _ = logged
    db.merge_experts(["east", "west"], into="eastwest")
    by = {e["name"]: e["queries"] for e in db.stats()["experts"]}
    assert by["eastwest"] == int(((t["top"] == "east") | (t["top"] == "west")).sum())
    assert "east" not in by and "west" not in by


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=40))
def test_imbalance_properties(counts):
    x = np.array(counts, float)
    imb = imbalance(counts)
    if x.sum() == 0:
        assert imb["gini"] is None and imb["cv"] is None
        return
    n = len(x)
    gini = np.abs(x[:, None] - x[None, :]).sum() / (2 * n * n * x.mean())
    assert imb["gini"] == pytest.approx(gini, abs=1e-9)
    assert -1e-12 <= imb["gini"] <= (n - 1) / n + 1e-12
    assert imb["cv"] == pytest.approx(x.std() / x.mean())
    assert 1.0 - 1e-12 <= imb["max_mean"] <= n + 1e-9
    assert 0.0 <= imb["entropy_bits"] <= np.log2(n) + 1e-9
    rng = np.random.default_rng(len(counts))
    perm = imbalance(list(rng.permutation(x) * 3))           # order and scale do not matter
    for k in ("gini", "cv", "max_mean", "entropy_bits"):
        assert perm[k] == pytest.approx(imb[k], abs=1e-9)
    if np.all(x == x[0]):
        assert imb["gini"] == pytest.approx(0.0, abs=1e-12) and imb["entropy_norm"] == pytest.approx(1.0)


def test_bucket_width_is_readable():
    assert bucket_width(86400, 24) == 3600
    assert bucket_width(59, 60) == 1
    assert bucket_width(7 * 86400, 7) == 86400
    assert bucket_width(10, 24) == 1


def test_cli_stats_json_csv_and_plot(db_path, tmp_path):
    db, t, _ = _make(db_path, n=200, seed=3)
    db.close()
    p = run_cli(["stats", "--json"], db_path)
    assert p.returncode == 0, p.stderr
    js = json.loads(p.stdout)
    assert js["queries"] == 200
    p = run_cli(["stats", "--csv"], db_path)
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert {r["name"]: int(r["queries"]) for r in rows} == {e["name"]: e["queries"] for e in js["experts"]}
    p = run_cli(["stats"], db_path)
    assert p.returncode == 0 and "imbalance over 4 experts" in p.stdout and "north" in p.stdout
    png = tmp_path / "load.png"
    p = run_cli(["stats", "--plot", str(png)], db_path)
    if not has_matplotlib:  # without the plot extra: one error line naming it, and no file
        assert p.returncode == 1 and "moedb[plot]" in p.stderr and not png.exists()
        return
    assert p.returncode == 0, p.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))
    assert img.shape[0] == 800 and img.shape[1] == 1000 and img.shape[2] in (3, 4)
    assert float(img[..., :3].std()) > 0.05          # something was drawn, not a blank canvas
    p = run_cli(["stats", "--since", "not a date"], db_path)
    assert p.returncode == 1 and p.stderr.startswith("error: since")
