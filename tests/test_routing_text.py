"""Routing real text with the bundled MiniLM: calibrated abstention, conversation context, explanations, CLI."""
from __future__ import annotations

import json

import pytest

import moedb
from conftest import run_cli

EXPERTS = {
    "cloud-credentials": [
        "Create an access key for an IAM user in the AWS console under Security credentials.",
        "Rotate IAM access keys regularly: create a second key, update applications, then deactivate the old one.",
        "Never commit AWS secret access keys to git; use environment variables or a secrets manager.",
        "An expired or deleted access key makes the AWS CLI fail with InvalidClientTokenId.",
        "Use IAM roles instead of long-lived access keys for EC2 instances.",
        "The AWS CLI reads credentials from ~/.aws/credentials or environment variables.",
        "Grant least privilege: attach only the IAM policies a user really needs.",
        "Service account keys in Google Cloud should be rotated every 90 days.",
        "Multi-factor authentication protects the AWS root account.",
        "Audit who used an access key with CloudTrail logs.",
        "Temporary credentials from STS expire after a configurable duration.",
        "Store API tokens in a vault and rotate them automatically.",
    ],
    "car-maintenance": [
        "Rotate your tires every 5,000 to 7,500 miles so they wear evenly.",
        "Check tire pressure monthly; the right value is on the sticker in the driver's door.",
        "Change the engine oil and the oil filter every 5,000 miles with synthetic oil.",
        "Worn brake pads squeal; replace them before the rotors get damaged.",
        "Replace wiper blades when they streak the windshield.",
        "A weak car battery makes the engine crank slowly on cold mornings.",
        "Flush the coolant every two years to avoid engine overheating.",
        "Align the wheels if the car pulls to one side.",
        "Replace the cabin air filter once a year.",
        "Spark plugs should be replaced around 100,000 miles.",
        "Check the transmission fluid level with the engine warm.",
        "Balance the wheels when you feel vibrations at highway speed.",
    ],
    "baking": [
        "Bake sourdough in a preheated Dutch oven with the lid on for the first 20 minutes.",
        "Let bread dough proof until it has doubled in size.",
        "Cream butter and sugar until fluffy before adding eggs to cake batter.",
        "Chill cookie dough so the cookies spread less in the oven.",
        "Use a digital scale: grams are more accurate than cups for flour.",
        "Blind bake a pie crust with weights so it does not puff up.",
        "Brush croissants with egg wash for a shiny golden crust.",
        "A toothpick that comes out clean means the cake is done.",
        "Feed a sourdough starter with equal weights of flour and water.",
        "Rest pizza dough overnight in the fridge for better flavour.",
        "Sift cocoa powder to avoid lumps in brownies.",
        "Knead bread dough until it passes the windowpane test.",
    ],
}

UNRELATED = ["Who won the football world cup in 1998?", "Explain the causes of the French revolution",
             "What is the plot of Hamlet?", "How many moons does Jupiter have?",
             "Recommend a good jazz album from the sixties", "What is the capital of Mongolia?",
             "How do whales communicate with each other?", "Translate good morning into Japanese",
             "What is the derivative of sin(x)?", "Best hiking trails in the Alps"]
IN_SCOPE = {"How do I rotate my IAM access keys safely?": "cloud-credentials",
            "my aws cli says InvalidClientTokenId": "cloud-credentials",
            "how often should I rotate tires": "car-maintenance",
            "my brakes are squealing": "car-maintenance",
            "why did my cookies spread so much": "baking",
            "how long should bread dough proof": "baking"}


@pytest.fixture
def tdb(db):
    for name, docs in EXPERTS.items():
        db.add_expert(name, docs, description=name.replace("-", " "))
    return db


def test_calibrated_abstention_on_real_text(tdb):
    figs = tdb.router_figures()
    assert figs["heldout"] == 36 and 0 < figs["threshold"] < 1
    rs = tdb.route_many(list(IN_SCOPE), top_k=1, k=1, log=False)
    assert sum(r.abstained for r in rs) <= 1
    assert all(r.experts[0].name == IN_SCOPE[r.query] for r in rs if not r.abstained)
    out = tdb.route_many(UNRELATED, top_k=1, k=1, log=False)
    assert sum(r.abstained for r in out) >= 6, [(r.query, r.explanation) for r in out]
    assert all(r.experts == [] and r.hits == [] for r in out if r.abstained)
    # 0.0 never abstains
    assert not any(r.abstained for r in tdb.route_many(UNRELATED, top_k=1, k=0, min_confidence=0.0, log=False))


def test_context_routes_a_follow_up_using_the_conversation(tdb):
    follow = "and how do I rotate them?"
    alone = tdb.route(follow, top_k=3, min_confidence=0.0, log=False)
    conv = ["I need to create access keys for my IAM user in AWS", "ok, the CLI works with the new key now"]
    withc = tdb.route(follow, top_k=3, min_confidence=0.0, log=False, context=conv, explain=True)
    assert withc.experts[0].name == "cloud-credentials"
    conf = lambda r, n: next(e.confidence for e in r.experts if e.name == n)  # noqa: E731
    assert conf(withc, "cloud-credentials") > conf(alone, "cloud-credentials")
    assert withc.explanation["context_turns"] == 2 and withc.explanation["context_used"]
    # about tires, the same follow-up goes to the car expert
    tyres = tdb.route(follow, top_k=1, min_confidence=0.0, log=False,
                      context=["My car's front tires wear faster than the rear ones"])
    assert tyres.experts[0].name == "car-maintenance"
    # context must be a list of strings; an empty list is no context
    assert tdb.route(follow, context=[], log=False, min_confidence=0.0).experts[0].name == alone.experts[0].name
    with pytest.raises(moedb.InvalidInput, match="context must be a list of strings"):
        tdb.route(follow, context="I need AWS keys")


def test_short_documents_that_read_like_queries_leave_routing_to_the_gate(tdb):
    # each pseudo-query is most of its document, so its document is left out of its evidence, and the gate
    # (which saw the others like it) classifies them better than the nearest remaining documents do
    assert tdb.warm_router()["evidence"]["weight"] == 0.0


def test_a_question_that_changes_the_subject_is_read_alone(tdb):
    conv = ["I need to create access keys for my IAM user in AWS", "how do I rotate my IAM access keys?"]
    for q, want in IN_SCOPE.items():
        alone = tdb.route(q, top_k=1, k=1, min_confidence=0.0, log=False)
        r = tdb.route(q, top_k=1, k=1, min_confidence=0.0, log=False, context=conv, explain=True)
        assert r.experts[0].name == want == alone.experts[0].name
        if want != "cloud-credentials":  # off the conversation's subject: the conversation is not mixed in
            assert not r.explanation["context_used"], q
            assert [h.id for h in r.hits] == [h.id for h in alone.hits]
            assert r.experts[0].confidence == pytest.approx(alone.experts[0].confidence)


def test_explain_names_lexical_terms_and_components(tdb):
    r = tdb.route("rotate tires every 5000 miles", top_k=2, min_confidence=0.0, explain=True, log=False)
    assert r.experts[0].name == "car-maintenance"
    c = r.experts[0].components
    assert set(c) == {"centroid", "gate", "lexical", "bias"} and c["lexical"] > 0
    terms = [t for t, _ in r.explanation["lexical_terms"]]
    assert "tires" in terms and "every" not in terms[:1]  # as the query wrote it (issue 16), not the n-gram "tire"
    assert r.path == ["car-maintenance"]


def test_cli_route_explain_json_and_list_tree(tdb, db_path):
    tdb.add_expert("vehicles", description="parent of car topics")
    tdb.update_expert("car-maintenance", parent="vehicles")
    tdb.close()
    out = run_cli(["route", "my brakes squeal when stopping", "--explain", "--min-confidence", "0", "--json"], db_path)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["experts"][0]["name"] == "car-maintenance"
    assert set(d["experts"][0]["components"]) == {"centroid", "gate", "lexical", "bias"}
    assert d["path"] == ["vehicles", "car-maintenance"] and d["explanation"]["experts_total"] == 3
    out = run_cli(["route", "my brakes squeal when stopping", "--explain"], db_path)
    assert out.returncode == 0 and "lexical" in out.stdout and "vehicles > car-maintenance" in out.stdout
    out = run_cli(["route", "and how do I rotate them?", "--context", "I created AWS access keys for my IAM user",
                   "--min-confidence", "0", "--json"], db_path)
    assert out.returncode == 0 and json.loads(out.stdout)["experts"][0]["name"] == "cloud-credentials"
    out = run_cli(["route", "   "], db_path)
    assert out.returncode == 1 and "query is empty" in out.stderr
    out = run_cli(["route", "brakes", "--top-k", "0"], db_path)
    assert out.returncode == 1 and "top_k" in out.stderr
    out = run_cli(["list", "--tree"], db_path)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    parent = next(i for i, line in enumerate(lines) if "vehicles" in line)
    child = next(i for i, line in enumerate(lines) if "car-maintenance" in line)
    assert child == parent + 1 and lines[child].index("car-maintenance") > lines[parent].index("vehicles")
