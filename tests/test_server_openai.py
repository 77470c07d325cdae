"""The OpenAI-compatible endpoints of `moedb serve`, called with the official `openai` SDK against a real
server on 127.0.0.1: models, plain and streamed chat completions, embeddings, auth and unknown models."""
from __future__ import annotations

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the openai extra is not installed")
httpx = pytest.importorskip("httpx", reason="the server extra is not installed")
pytest.importorskip("fastapi", reason="the server extra is not installed")

from serverkit import KEY, auth, make_db, running_server  # noqa: E402

QUESTION = "how long until my refund reaches my credit card?"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-openai")
    with running_server(make_db(str(d / "experts.db")), log_path=str(d / "server.log")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_one_per_strategy(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "moedb"
    assert {"moedb/weighted", "moedb/voting", "moedb/best_only", "moedb/concatenate"} <= set(ids)


def test_chat_completion_answers_from_the_routed_expert(client):
    r = client.chat.completions.create(model="moedb/weighted", messages=[
        {"role": "system", "content": "You answer from the passages."},
        {"role": "user", "content": QUESTION}])
    text = r.choices[0].message.content
    assert "five business days" in text and r.choices[0].finish_reason == "stop"
    assert r.model.startswith("moedb/weighted:") and "billing" in r.model.split(":", 1)[1].split("+")
    extra = r.model_extra["moedb"]
    assert extra["experts"][0]["name"] == "billing" and extra["abstained"] is False
    assert extra["citations"] and {c["expert"] for c in extra["citations"]} == {"billing"}
    assert extra["query_id"] > 0 and extra["strategy"] == "weighted"


def test_streamed_chat_is_the_same_answer_in_pieces(client):
    plain = client.chat.completions.create(model="moedb/best_only", messages=[{"role": "user", "content": QUESTION}])
    pieces, last = [], None
    with client.chat.completions.create(model="moedb/best_only", stream=True,
                                        messages=[{"role": "user", "content": QUESTION}]) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            last = chunk
    assert "".join(pieces) == plain.choices[0].message.content
    assert last.choices[0].finish_reason == "stop"
    assert last.model == plain.model and last.model.startswith("moedb/best_only:billing")
    assert last.model_extra["moedb"]["citations"][0]["expert"] == "billing"


def test_chat_abstains_out_of_scope_and_says_so(client):
    r = client.chat.completions.create(model="moedb", messages=[{"role": "user", "content": "who won the 1998 world "
                                                                  "cup of chess boxing on the moon?"}],
                                       extra_body={"min_confidence": 0.999})
    assert r.model.endswith(":abstained") and r.model_extra["moedb"]["abstained"] is True
    assert r.model_extra["moedb"]["citations"] == []


def test_errors_reach_the_sdk_as_its_exceptions(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": QUESTION}])
    assert e.value.body["type"] == "model_not_found" and "moedb/weighted" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="moedb", messages=[{"role": "system", "content": "no user turn"}])
    with pytest.raises(openai.UnprocessableEntityError):  # an error before the first token: a status, not a stream
        client.chat.completions.create(model="moedb", stream=True, messages=[{"role": "user", "content": "  "}])
    bad = openai.OpenAI(base_url=server + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_embeddings_are_the_files_embedder(server, client):
    texts = ["refund to my card", "money back on my credit card", "bake sourdough bread"]
    got = client.embeddings.create(model="moedb", input=texts)  # the SDK asks for base64 and decodes it
    V = np.array([d.embedding for d in got.data], dtype=np.float32)
    assert V.shape == (3, 384)
    assert np.allclose(np.linalg.norm(V, axis=1), 1.0, atol=1e-4)
    assert V[0] @ V[1] > V[0] @ V[2] + 0.2
    plain = httpx.post(server + "/v1/embeddings", headers=auth(),
                       json={"input": texts[0], "encoding_format": "float"}).json()
    assert np.allclose(plain["data"][0]["embedding"], V[0], atol=1e-6)
    import moedb

    with moedb.connect(":memory:") as db:  # the same model as a fresh open of the bundled embedder
        assert np.allclose(db.embedder.embed(texts), V, atol=1e-5)


def test_cors_is_off_unless_configured(server):
    r = httpx.get(server + "/v1/models", headers={**auth(), "Origin": "http://app.localhost:3000"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = httpx.options(server + "/v1/models", headers={"Origin": "http://app.localhost:3000",
                                                        "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in pre.headers
