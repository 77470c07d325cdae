"""schemathesis against the OpenAPI document `moedb serve` publishes: generated requests to every operation
(valid ones, then invalid ones) never get a 5xx, and every error is the JSON error shape."""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (extra test)")
pytest.importorskip("fastapi", reason="the server extra is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from serverkit import auth, make_db, running_server  # noqa: E402

EXAMPLES = 25


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-schema")
    with running_server(make_db(str(d / "experts.db")), log_path=str(d / "server.log")) as url:
        yield schemathesis.openapi.from_url(url + "/openapi.json", headers=auth()), d / "server.log"


def check(case) -> None:
    resp = case.call(headers=auth(), timeout=60)
    assert resp.status_code < 500, f"{case.method} {case.formatted_path}: {resp.status_code} {resp.text[:300]}"
    if resp.status_code >= 400:
        body = resp.json()
        assert set(body) == {"error"} and {"type", "message"} <= set(body["error"]), resp.text[:300]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_error_for_any_generated_request(schema, mode):
    sch, log = schema
    ops = [r.ok() for r in sch.get_all_operations()]
    assert {(o.method.upper(), o.path) for o in ops} >= {("POST", "/v1/route"), ("POST", "/v1/chat/completions"),
                                                       ("POST", "/v1/experts"), ("GET", "/v1/stats")}
    tried = 0
    for op in ops:
        strategy = op.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

        @given(case=strategy)
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            check(case)

        try:
            run()
            tried += 1
        except Unsatisfiable:  # an operation without parameters has no invalid request to make
            assert mode == "negative"
    assert tried >= 10
    assert "Traceback" not in log.read_text()
