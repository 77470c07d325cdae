"""Build five experts from the sample text in examples/data, say by example what is out of scope
(a refusal expert), and route a few questions.

Run:  python examples/quickstart.py  [--db PATH]   (default: a fresh temporary file)
"""
from __future__ import annotations

import argparse
import os
import tempfile

import moedb

HERE = os.path.dirname(os.path.abspath(__file__))

EXPERTS = {
    "security": ("Authentication, tokens, keys and web security", ["jwt", "oauth", "password", "token"]),
    "databases": ("Running SQLite and PostgreSQL", ["sqlite", "postgres", "index", "wal"]),
    "cooking": ("Bread, sauces and kitchen technique", ["bread", "sauce", "dough"]),
    "astronomy": ("Planets, stars and telescopes", ["planet", "star", "telescope"]),
    "gardening": ("Soil, watering and garden pests", ["soil", "compost", "aphids"]),
}

# examples of questions none of the experts should answer: a refusal expert
OFF_TOPIC = ["Tell me a joke", "Who won the football match last night?", "What is the weather tomorrow?",
             "Translate thank you into Spanish", "What time is it in Tokyo?", "Recommend a good movie",
             "How tall is the Eiffel tower?", "What is the population of Canada?"]

QUESTIONS = [
    "How do I fix a JWT auth bug where the signature is invalid?",
    "Why does my sqlite database say it is locked?",
    "My mayonnaise split, what can I do?",
    "Which planet has the biggest storm?",
    "How often should I water tomatoes?",
    "What is the capital of Australia?",
    "Who is playing in the football final?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--db", default=None, help="database file (default: a new temporary file)")
    args = ap.parse_args()
    path = args.db or os.path.join(tempfile.mkdtemp(prefix="moedb-example-"), "experts.db")
    with moedb.connect(path) as db:
        for name, (description, keywords) in EXPERTS.items():
            if name in {e.name for e in db.experts()}:
                continue
            db.add_expert(name, description=description, keywords=keywords)
            db.add_files(name, [os.path.join(HERE, "data", name)], chunk_size=200)
        if "off-topic" not in {e.name for e in db.experts()}:
            db.add_expert("off-topic", OFF_TOPIC, refuse=True, description="out of scope, by example")
        print(f"database: {path}")
        for e in db.experts():
            role = "refuses" if e.refuse else "passages"
            print(f"  expert {e.name:<10} {e.size:>3} {role:<8}  ({e.description})")
        for q in QUESTIONS:
            r = db.route(q, top_k=2, k=2)
            print(f"\nQ: {q}")
            if r.refused_by:
                print(f"   -> refused: looks like the examples in {r.refused_by!r} (abstained)")
            elif r.abstained:
                print(f"   -> looks like none of the experts (abstained; scope {r.scope:.2f})")
            for e in r.experts:
                print(f"   expert {e.name:<10} confidence {e.confidence:.2f}")
            for h in r.hits:
                print(f"   [{h.expert}] cosine {h.score:.3f}  {h.text[:110]!r}  ({os.path.relpath(h.source or '', HERE)})")


if __name__ == "__main__":
    main()
