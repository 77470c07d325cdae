"""`moedb serve`: the REST API under /v1 on a real uvicorn server (a `moedb serve` process on 127.0.0.1),
called with httpx: the CLI's --json fields, writes, feedback, stats, auth, error shapes and limits,
concurrent clients with a write among them."""
from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx", reason="the server extra is not installed")
pytest.importorskip("fastapi", reason="the server extra is not installed")
pytest.importorskip("uvicorn", reason="the server extra is not installed")

from serverkit import KEY, auth, make_db, running_server  # noqa: E402


ORIGIN = "http://app.localhost:3000"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    path = make_db(str(d / "experts.db"))
    with running_server(path, KEY, "--cors-origin", ORIGIN, log_path=str(d / "server.log")) as url:
        with httpx.Client(base_url=url, headers=auth(), timeout=60) as client:
            yield client, path, d / "server.log"


def cli_json(path: str, *args: str):
    out = subprocess.run([sys.executable, "-m", "moedb.cli", "--db", path, *args, "--json"], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def assert_error(resp, status: int, type_: str, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == type_, body
    for w in words:
        assert w in body["error"]["message"], body
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    return body["error"]


def test_key_is_required_and_checked(served):
    client, _, _ = served
    url = str(client.base_url)
    assert_error(httpx.get(url + "/v1/experts"), 401, "unauthorized", "Bearer")
    assert_error(httpx.get(url + "/v1/experts", headers=auth("wrong-key")), 401, "unauthorized")
    assert_error(httpx.get(url + "/v1/experts", headers={"Authorization": KEY}), 401, "unauthorized")  # no scheme
    assert_error(httpx.post(url + "/v1/route", json={"query": "refund"}), 401, "unauthorized")
    assert httpx.get(url + "/openapi.json").status_code == 401
    assert client.get("/openapi.json").json()["info"]["title"] == "moedb"
    # the dashboard's shell holds no data and tells the page that a key is needed
    assert httpx.get(url + "/").status_code == 200
    assert httpx.get(url + "/dashboard.json").json() == {"key_required": True}


def test_cors_only_for_the_configured_origin(served):
    client, _, _ = served
    pre = client.options("/v1/route", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    ok = client.get("/v1/experts", headers={"Origin": ORIGIN})
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    other = client.get("/v1/experts", headers={"Origin": "http://elsewhere.localhost"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    refused = client.options("/v1/route", headers={"Origin": "http://elsewhere.localhost",
                                                   "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in refused.headers


def test_experts_are_the_cli_json(served):
    client, path, _ = served
    assert client.get("/v1/experts").json() == cli_json(path, "list")
    assert client.get("/v1/experts/billing", params={"docs": 2}).json() == cli_json(path, "show", "billing",
                                                                                       "--docs", "2")
    info = client.get("/v1/info").json()
    assert set(info) == set(cli_json(path, "init")) and info["experts"] >= 3


def test_route_matches_the_cli_fields_and_routes_right(served):
    client, path, _ = served
    r = client.post("/v1/route", json={"query": "my refund has not reached my credit card", "k": 3,
                                       "explain": True}).json()
    cli = cli_json(path, "route", "my refund has not reached my credit card", "-k", "3", "--explain")
    assert set(r) == set(cli)
    assert r["experts"][0]["name"] == cli["experts"][0]["name"] == "billing"
    assert [h["id"] for h in r["hits"]] == [h["id"] for h in cli["hits"]]
    assert r["hits"][0]["text"].startswith("Refunds take five business days")
    assert r["query_id"] and r["explanation"]["experts_total"] >= 3
    # a conversation's earlier turn steers a follow-up that says little by itself
    follow = client.post("/v1/route", json={"query": "how long does it take?", "top_k": 1,
                                            "context": ["I asked for a refund of my invoice"]}).json()
    assert follow["experts"] and follow["experts"][0]["name"] == "billing"
    # the route is listed for the dashboard
    recent = client.get("/v1/recent", params={"limit": 5}).json()
    assert any(x["query_id"] == follow["query_id"] and x["experts"][0]["name"] == "billing" for x in recent)


def test_search_is_exhaustive_and_sorted(served):
    client, path, _ = served
    hits = client.post("/v1/search", json={"query": "bake bread", "k": 4}).json()
    assert [h["id"] for h in hits] == [h["id"] for h in cli_json(path, "search", "bake bread", "-k", "4")]
    assert hits[0]["expert"] == "cooking" and "bread" in hits[0]["text"]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    only = client.post("/v1/search", json={"query": "bake bread", "k": 3, "experts": ["security"]}).json()
    assert {h["expert"] for h in only} == {"security"}


def test_writes_build_an_expert_that_routes(served):
    client, _, _ = served
    made = client.post("/v1/experts", json={
        "name": "travel", "description": "trips", "keywords": ["flight"],
        "documents": ["Book flights six weeks ahead for cheaper fares.",
                      {"id": "passport", "text": "Passports must be valid six months after the trip.",
                       "metadata": {"kind": "rule"}}]})
    assert made.status_code == 201, made.text
    assert made.json()["name"] == "travel" and made.json()["size"] == 2 and made.json()["keywords"] == ["flight"]
    added = client.post("/v1/experts/travel/documents", json={"documents": ["Pack light for short trips."]})
    assert added.json() == {"expert": "travel", "added": 1, "size": 3}
    r = client.post("/v1/route", json={"query": "is my passport valid long enough for the trip?", "k": 1}).json()
    assert r["experts"][0]["name"] == "travel" and r["hits"][0]["id"] == "passport"
    docs = client.get("/v1/experts/travel/documents", params={"limit": 10}).json()
    assert len(docs) == 3 and {"passport"} <= {d["id"] for d in docs}
    assert_error(client.post("/v1/experts", json={"name": "travel", "documents": ["x"]}), 409, "duplicate_expert",
                 "travel")
    assert_error(client.post("/v1/experts/travel/documents", json={"documents": [{"id": "passport", "text": "y"}]}),
                 409, "duplicate_document")
    skipped = client.post("/v1/experts/travel/documents", json={"documents": [{"id": "passport", "text": "y"}],
                                                                "on_conflict": "skip"})
    assert skipped.json()["added"] == 0
    assert client.delete("/v1/experts/travel").json() == {"expert": "travel", "removed": True}
    assert_error(client.get("/v1/experts/travel"), 404, "unknown_expert", "travel")
    assert_error(client.delete("/v1/experts/travel"), 404, "unknown_expert")
    assert_error(client.post("/v1/experts/nope/documents", json={"documents": ["a"]}), 404, "unknown_expert")
    r = client.post("/v1/route", json={"query": "is my passport valid long enough for the trip?"}).json()
    assert all(e["name"] != "travel" for e in r["experts"])


def test_bad_input_is_a_json_error_naming_the_field(served):
    client, _, _ = served
    assert_error(client.post("/v1/route", json={"query": "refund", "top_k": 0}), 422, "invalid_input", "top_k")
    assert_error(client.post("/v1/route", json={"query": "   "}), 422, "invalid_input", "empty")
    assert_error(client.post("/v1/route", json={"query": "refund", "topk": 2}), 422, "invalid_input", "topk")
    assert_error(client.post("/v1/route", json={"k": 2}), 422, "invalid_input", "query")
    assert_error(client.post("/v1/route", json={"query": "refund", "k": "many"}), 422, "invalid_input", "k")
    assert_error(client.post("/v1/route", content=b"{not json", headers={"Content-Type": "application/json"}),
                 422, "invalid_input")
    assert_error(client.post("/v1/route", json={"query": "refund", "min_confidence": 2.0}), 422, "invalid_input",
                 "min_confidence")
    assert_error(client.post("/v1/experts", json={"name": "", "documents": ["a"]}), 422, "invalid_input")
    assert_error(client.post("/v1/experts", json={"name": "m", "documents": ["a"], "metadata": {"x": [1] * 3,
                                                                                               "d": {"e": None}},
                                                  "parent": "no-such-parent"}), 404, "unknown_expert")
    assert_error(client.post("/v1/ask", json={"query": "refund", "strategy": "shouting"}), 422, "config_error",
                 "strategy")
    assert_error(client.get("/v1/stats", params={"since": "yesterday-ish"}), 422, "invalid_input", "since")
    assert_error(client.get("/v1/no-such-endpoint"), 404, "not_found")
    assert_error(client.put("/v1/route", json={}), 405, "method_not_allowed")


def test_request_size_limits(served):
    client, _, _ = served
    big = {"query": "x" * (17 * 1024 * 1024)}
    assert_error(client.post("/v1/route", json=big), 413, "request_too_large", "bytes")

    def chunks():  # no Content-Length: counted while it arrives
        for _ in range(20):
            yield b" " * (1024 * 1024)

    assert_error(client.post("/v1/route", content=chunks(), headers={"Content-Type": "application/json"}), 413,
                 "request_too_large")
    assert_error(client.post("/v1/experts", json={"name": "many", "documents": ["a"] * 10_001}), 422,
                 "invalid_input", "documents")


def test_feedback_single_and_batch_reach_stats(served):
    client, path, _ = served
    r = client.post("/v1/route", json={"query": "rotate the api keys", "top_k": 1}).json()
    assert r["experts"][0]["name"] == "security"
    one = client.post("/v1/feedback", json={"query_id": r["query_id"], "expert": "security", "reward": 1}).json()
    assert one["query_id"] == r["query_id"] and one["expert"] == "security" and one["already_present"] is False
    again = client.post("/v1/feedback", json={"query_id": r["query_id"], "expert": "security", "reward": 1,
                                              "id": "e-1"}).json()
    assert again["already_present"] is False
    assert client.post("/v1/feedback", json={"query_id": r["query_id"], "expert": "security", "reward": 1,
                                             "id": "e-1"}).json()["already_present"] is True
    batch = client.post("/v1/feedback", json={"events": [
        {"query": "my invoice is wrong", "expert": "billing", "reward": 1},
        {"query": "my invoice is wrong", "expert": "nope", "reward": 1},
        {"expert": "billing", "reward": 1}]}).json()
    assert batch["lines"] == 3 and batch["taken"] == 1 and batch["skipped"] == 2
    assert [e["line"] for e in batch["errors"]] == [2, 3]
    assert_error(client.post("/v1/feedback", json={"expert": "billing", "reward": 1}), 422, "invalid_input", "query")
    assert_error(client.post("/v1/feedback", json={"query_id": r["query_id"], "expert": "security", "reward": 3}),
                 422, "invalid_input", "reward")
    assert_error(client.post("/v1/feedback", json={"query_id": 10**12, "expert": "security"}), 422,
                 "invalid_input", "query id")
    stats = client.get("/v1/stats").json()
    cli = cli_json(path, "stats")
    assert set(stats) == set(cli) and stats["queries"] == cli["queries"] > 0
    sec = next(e for e in stats["experts"] if e["name"] == "security")
    assert sec["feedback"] >= 2 and sec["feedback_success_rate"] == 1.0
    assert sum(b["queries"] for b in stats["load_over_time"]["buckets"]) == stats["queries"]


def test_ask_answers_with_citations(served):
    client, _, _ = served
    a = client.post("/v1/ask", json={"query": "how long do refunds take?", "strategy": "best_only"}).json()
    assert a["strategy"] == "best_only" and not a["abstained"]
    assert "five business days" in a["text"]
    assert a["citations"] and a["citations"][0]["expert"] == "billing"


def test_many_clients_and_a_write_at_once(served):
    """32 concurrent routes while an expert is created: every answer is right and none is a 5xx."""
    client, _, log = served
    url, headers = str(client.base_url), dict(client.headers)
    queries = [("refund to my credit card", "billing"), ("two-factor authentication", "security"),
               ("how long to boil pasta", "cooking")] * 16

    def one(q):
        with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
            return c.post("/v1/route", json={"query": q[0], "top_k": 1, "k": 1})

    def write():
        with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
            return c.post("/v1/experts", json={"name": "gardening", "documents": [
                "Water tomatoes at the base in the morning.", "Prune roses in late winter."]})

    with cf.ThreadPoolExecutor(32) as ex:
        futs = [ex.submit(one, q) for q in queries]
        w = ex.submit(write)
        answers = [f.result() for f in futs]
    assert w.result().status_code == 201, w.result().text
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:3]
    assert [a.json()["experts"][0]["name"] for a in answers] == [q[1] for q in queries]
    r = client.post("/v1/route", json={"query": "when should I prune my roses?", "top_k": 1}).json()
    assert r["experts"][0]["name"] == "gardening"
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("args, env, words", [
    (["--db", "{missing}", "serve"], {}, "no database"),
    (["--db", "{db}", "serve", "--api-key-env", "MOEDB_NO_SUCH_KEY_VAR"], {}, "MOEDB_NO_SUCH_KEY_VAR"),
    (["--db", "{db}", "serve", "--api-key-env", "MOEDB_EMPTY_KEY"], {"MOEDB_EMPTY_KEY": ""}, "not set or empty"),
    (["--db", "{db}", "serve", "--readers", "0"], {}, "readers"),
    (["--db", "{db}", "serve", "--port", "70000"], {}, "--port"),
])
def test_serve_command_refuses_bad_options_with_one_line(served, tmp_path, args, env, words):
    _, path, _ = served
    import os

    argv = [a.format(missing=str(tmp_path / "none.db"), db=path) for a in args]
    out = subprocess.run([sys.executable, "-m", "moedb.cli", *argv], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], out.stderr


def test_a_busy_database_is_503_with_retry_after():
    from moedb.errors import DatabaseBusy, InvalidInput
    from moedb.server.errors import classify

    # the store turns SQLite's busy error into DatabaseBusy, a MoedbError: still "busy", not a 422
    assert classify(DatabaseBusy("the write lock was held too long")) == (
        503, "busy", "the database is busy; retry shortly", {"Retry-After": "1"})
    assert classify(InvalidInput("top_k must be >= 1"))[:2] == (422, "invalid_input")
