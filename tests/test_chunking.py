"""Passages sized for answers: files split by the embedder's own tokens (real MiniLM tokenizer and model).

The chunker never exceeds the token limit and never loses text; a cut paragraph carries an overlap; markdown
heading paths become titles; re-ingesting gives the same ids; a question about one paragraph of a short
two-topic file gets that paragraph.
"""
from __future__ import annotations

import json
import re
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moedb
from moedb.embed import CallableEmbedder, VectorsOnly
from moedb.ingest.chunk import split_text
from moedb.ingest.passages import sizes_for, split_passages

from conftest import run_cli

ROUX = ("A roux is equal weights of flour and butter cooked together in a pan. Stir it over low heat for a few "
        "minutes for a white roux, or longer, until it is the colour of peanut butter, for gumbo. Whisk hot milk "
        "into a white roux to make a bechamel sauce.")
MAYO = ("Mayonnaise is an emulsion of oil in egg yolk. Whisk a yolk with a spoon of mustard and a little lemon "
        "juice, then add the oil drop by drop, whisking all the time, until it thickens. If it splits, whisk a "
        "fresh yolk in a clean bowl and slowly beat the split mixture into it.")


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


def counts(embedder, chunks) -> list[int]:
    return embedder.count_tokens([c.text for c in chunks])


# ---------------------------------------------------------------------- texts that are hard to cut
_word = st.sampled_from(["the", "roux", "emulsion", "internationalization", "don't", "e.g.", "naïve", "Straße",
                         "x1y2z3", "😀", "日本語", "mayonnaise", "(see", "below)", "a", "—", "3.14"])
_long_word = st.one_of(st.text(alphabet="abcdefghij", min_size=30, max_size=600),   # word pieces, or [UNK]
                       st.text(alphabet="ab.-/", min_size=30, max_size=900))        # punctuation: many tokens
_sentence = st.builds(lambda ws, end: " ".join(ws) + end, st.lists(_word, min_size=1, max_size=40),
                      st.sampled_from([".", "!", "?", "", "。", "..."]))
_paragraph = st.lists(_sentence, min_size=1, max_size=10).map(" ".join)
_no_punctuation = st.lists(st.sampled_from(["alpha", "beta", "gamma", "delta"]), min_size=40, max_size=400).map(
    " ".join)
_heading = st.builds(lambda n, ws: "#" * n + " " + " ".join(ws), st.integers(1, 4),
                     st.lists(_word, min_size=1, max_size=6))
_code = st.lists(st.sampled_from(["x = 1", "# a comment, not a heading", "", "for i in range(10):",
                                  "    print(i)  # ok."]), min_size=1, max_size=60).map(
    lambda lines: "```python\n" + "\n".join(lines) + "\n```")
_cjk = st.text(alphabet="日本語の文章です中文句子。！？、", min_size=1, max_size=400)
_list = st.lists(_sentence, min_size=2, max_size=12).map(lambda items: "\n".join("- " + i for i in items))
_text = st.lists(st.one_of(_paragraph, _no_punctuation, _heading, _code, _cjk, _long_word, _list),
                 min_size=1, max_size=8).map(lambda blocks: "\n\n".join(blocks))
_fast = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fast
@given(text=_text, chunk_tokens=st.integers(16, 96), markdown=st.booleans())
def test_never_over_the_limit_and_never_loses_text(embedder, text, chunk_tokens, markdown):
    s = sizes_for(embedder.count_tokens, embedder.max_tokens, chunk_tokens=chunk_tokens, overlap=0)
    chunks = split_passages(text, s, markdown=markdown)
    assert all(n <= chunk_tokens for n in counts(embedder, chunks))
    assert squeeze("".join(c.text for c in chunks)) == squeeze(text)
    assert all(c.text.strip() == c.text and c.text for c in chunks)


@_fast
@given(text=_text, chunk_tokens=st.integers(24, 96), share=st.floats(0.05, 0.5))
def test_with_overlap_still_within_the_limit_and_bodies_cover_the_text(embedder, text, chunk_tokens, share):
    overlap = int(chunk_tokens * share)
    s = sizes_for(embedder.count_tokens, embedder.max_tokens, chunk_tokens=chunk_tokens, overlap=overlap)
    chunks = split_passages(text, s, markdown=True)
    assert all(n <= chunk_tokens for n in counts(embedder, chunks))
    norm = text.replace("\r\n", "\n")
    assert all(c.text == norm[c.start:c.end] and c.start <= c.body < c.end for c in chunks)
    assert squeeze("".join(norm[c.body:c.end] for c in chunks)) == squeeze(text)


def test_default_sizes_follow_the_embedder_and_a_long_file_fits_its_256_word_pieces(embedder):
    assert embedder.max_tokens == 256
    s = sizes_for(embedder.count_tokens, embedder.max_tokens)
    assert (s.chunk_tokens, s.overlap) == (256, 32)
    text = "\n\n".join([ROUX * 6, MAYO, "word " * 900, "字" * 700])
    chunks = split_passages(text, s)
    n = counts(embedder, chunks)
    assert max(n) <= 256 and max(n) > 200  # filled up to the limit, not beyond (nothing is cut off)
    assert len(chunks) >= 2 + 900 // 256 + 700 // 256


def test_paragraphs_then_sentences_are_preferred(embedder):
    s = sizes_for(embedder.count_tokens, embedder.max_tokens, chunk_tokens=128, overlap=0)
    chunks = split_passages(ROUX + "\n\n" + MAYO + " " + MAYO + " " + MAYO, s)
    assert chunks[0].text == ROUX  # a paragraph is a passage of its own
    # the long paragraph is cut at sentence ends only
    sentences = set(re.split(r"(?<=[.])\s+", MAYO))
    for c in chunks[1:]:
        assert set(re.split(r"(?<=[.])\s+", c.text)) <= sentences


def test_overlap_repeats_the_end_of_the_cut_paragraph_from_a_boundary(embedder):
    long = " ".join(f"Sentence number {i} talks about sauce {i}." for i in range(40))
    s = sizes_for(embedder.count_tokens, embedder.max_tokens, chunk_tokens=64, overlap=16)
    lead = "A roux of flour and butter thickens sauces and soups in many cuisines."
    chunks = split_passages(lead + "\n\n" + long, s)
    assert chunks[0].text == lead and chunks[1].body == chunks[1].start  # no overlap across paragraphs
    cut = chunks[1:]
    assert len(cut) >= 4
    for before, after in zip(cut, cut[1:]):
        repeated = after.text[:after.body - after.start].strip()
        assert repeated and before.text.endswith(repeated)
        assert embedder.count_tokens([repeated])[0] <= 16 + 2
        assert repeated.startswith("Sentence number")  # from a sentence start
    s0 = sizes_for(embedder.count_tokens, embedder.max_tokens, chunk_tokens=64, overlap=0)
    assert all(c.body == c.start for c in split_passages(long, s0))


def test_markdown_heading_path_is_the_title_and_code_is_not_a_heading(embedder):
    md = textwrap.dedent("""\
        Intro before any heading.

        # Install

        ## Linux
        Use the package manager. """ + "Then check the version. " * 40 + """

        ```sh
        # this is a shell comment
        apt install moedb
        ```

        ## macOS

        Use Homebrew.

        Setext heading
        ==============

        Plain text under it.
        """)
    s = sizes_for(embedder.count_tokens, embedder.max_tokens, chunk_tokens=64, overlap=8)
    chunks = split_passages(md, s, markdown=True)
    titles = [c.title for c in chunks]
    assert titles[0] is None and chunks[0].text == "Intro before any heading."
    assert chunks[1].text.startswith("# Install\n\n## Linux\nUse the package manager.")  # headings lead in
    assert set(titles[1:-2]) == {"Install > Linux"} and titles.count("Install > Linux") >= 3
    assert any("apt install moedb" in c.text and c.title == "Install > Linux" for c in chunks)
    assert titles[-2:] == ["Install > macOS", "Setext heading"]
    assert chunks[-1].text == "Setext heading\n==============\n\nPlain text under it."
    # a .txt file has no headings
    assert {c.title for c in split_passages(md, s, markdown=False)} == {None}


def test_files_get_titles_and_reingesting_gives_the_same_ids(db, tmp_path):
    f = tmp_path / "guide.md"
    f.write_text("# Install\n\n## Debian\n\n" + "Run the installer and answer its questions. " * 30 +
                 "\n\n## Windows\n\nDouble-click the setup file.\n")
    db.add_expert("guide")
    n = db.add_files("guide", [str(f)], chunk_tokens=64, overlap=16)
    docs = db.documents("guide")
    assert n == len(docs) >= 4
    assert [d["id"] for d in docs] == [f"{f}#{i}" for i in range(n)]
    assert {d["metadata"].get("title") for d in docs} == {"Install > Debian", "Install > Windows"}
    assert db.store.text.search("debian", 50)[0].size == n - 1  # the title is indexed for every passage
    assert db.add_files("guide", [str(f)], chunk_tokens=64, overlap=16, on_conflict="skip") == 0
    with pytest.raises(moedb.DuplicateDocument):
        db.add_files("guide", [str(f)], chunk_tokens=64, overlap=16)
    assert db.documents("guide") == docs
    db.add_expert("again", files=[str(f)], chunk_tokens=64, overlap=16)
    assert [(d["id"], d["text"], d["metadata"]) for d in db.documents("again")] == \
        [(d["id"], d["text"], d["metadata"]) for d in docs]


def test_a_jsonl_line_over_the_limit_becomes_parts_within_it_and_loses_nothing(db, embedder, tmp_path):
    long = " ".join(f"Clause {i} of the pension rules sets the contribution for year {1990 + i}." for i in range(90))
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"id": "short", "text": "A short passage on pensions."}) + "\n" +
                 json.dumps({"id": "rules", "text": long, "metadata": {"kind": "law"}}) + "\n" +
                 json.dumps({"text": long}) + "\n")
    assert embedder.count_tokens([long])[0] > embedder.max_tokens  # (it would be cut short when embedded)
    db.add_expert("pensions", files=[str(f)], overlap=0)
    docs = {d["id"]: d for d in db.documents("pensions")}
    assert docs["short"]["text"] == "A short passage on pensions." and docs["short"]["metadata"] == {}
    parts = [docs[f"rules#{k}"] for k in range(1, 1 + docs["rules#1"]["metadata"]["parts"])]
    assert len(parts) >= 2 and "rules" not in docs
    assert all(p["metadata"] == {"kind": "law", "part_of": "rules", "part": k, "parts": len(parts)}
               for k, p in enumerate(parts, 1))
    assert max(embedder.count_tokens([p["text"] for p in parts])) <= embedder.max_tokens
    assert " ".join(p["text"] for p in parts).split() == long.split()  # no overlap asked: nothing lost or repeated
    anonymous = sorted((d for d in docs.values() if d["metadata"].get("part_of", "") is None),
                       key=lambda d: d["metadata"]["part"])
    assert [d["id"] for d in anonymous] == [f"{f}#2#{k}" for k in range(1, len(parts) + 1)]
    # the last clause, only in the tail of the line, is found
    hit = db.search("the contribution for year 2079", k=1, experts=["pensions"])[0]
    assert hit.id.startswith(("rules#", f"{f}#2#")) and "2079" in hit.text
    db.add_expert("again", files=[str(f)], overlap=0)  # the same parts and ids again
    assert sorted(d["id"] for d in db.documents("again")) == sorted(docs)


def test_yaml_expert_files_take_chunk_tokens_and_overlap_and_reapply_is_unchanged(db, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("# Sauces\n\n" + (ROUX + " ") * 4 + "\n\n" + MAYO + "\n")
    (tmp_path / "sauces.yaml").write_text("documents: [docs/]\nchunk_tokens: 96\noverlap: 12\n")
    out = db.apply_dir(str(tmp_path))
    assert out["created"] == ["sauces"]
    docs = db.documents("sauces")
    n = db.store.documents.count()
    assert len(docs) >= 3 and all(d["metadata"] == {"title": "Sauces"} for d in docs)
    assert max(db.embedding.embedder.count_tokens([d["text"] for d in docs])) <= 96
    assert db.apply_dir(str(tmp_path))["unchanged"] == ["sauces"]
    assert db.documents("sauces") == docs and db.store.documents.count() == n
    (tmp_path / "sauces.yaml").write_text("documents: [docs/]\nchunk_tokens: many\n")
    with pytest.raises(moedb.ConfigError, match="chunk_tokens must be an integer"):
        db.apply_dir(str(tmp_path))


def test_a_question_about_one_paragraph_gets_that_paragraph(db, tmp_path):
    f = tmp_path / "cooking.txt"
    f.write_text(ROUX + "\n\n" + MAYO + "\n")
    db.add_expert("cooking", files=[str(f)])
    assert [d["text"] for d in db.documents("cooking")] == [ROUX, MAYO]
    assert db.search("What do I do when my mayonnaise separates?", k=2)[0].text == MAYO
    assert db.search("How do I start a bechamel sauce?", k=2)[0].text == ROUX
    # by characters (the old default) the whole note was one passage, whatever the question
    db.add_expert("by-chars", files=[str(f)], chunk_size=1000)
    assert len(db.documents("by-chars")) == 1


def test_chunk_size_splits_by_characters_but_never_over_the_token_limit(db, embedder, tmp_path):
    f = tmp_path / "dense.txt"
    f.write_text(" ".join(f"id-{i}/x.{i}" for i in range(500)) + "\n\nshort tail\n")
    db.add_expert("e", files=[str(f)], chunk_size=3000)
    texts = [d["text"] for d in db.documents("e")]
    assert max(embedder.count_tokens(texts)) <= 256
    assert squeeze("".join(texts)) == squeeze(f.read_text())
    assert split_text(f.read_text(), 3000)[0] != texts[0]  # the character piece was over the limit: cut again


@pytest.mark.parametrize("kwargs, field", [
    ({"chunk_tokens": 300}, "chunk_tokens must be between 16 and 256"),
    ({"chunk_tokens": 8}, "chunk_tokens must be between 16 and 256"),
    ({"chunk_tokens": 64, "overlap": 40}, "overlap must be between 0 and 32"),
    ({"overlap": -1}, "overlap must be between"),
    ({"chunk_tokens": "64"}, "chunk_tokens must be an integer"),
    ({"chunk_size": 500, "chunk_tokens": 64}, "chunk_size: give chunk_size"),
    ({"chunk_size": 10}, "chunk_size must be at least 50"),
])
def test_bad_sizes_name_the_field(db, tmp_path, kwargs, field):
    f = tmp_path / "a.md"
    f.write_text("Some text.\n")
    db.add_expert("e")
    with pytest.raises(moedb.InvalidInput, match=field):
        db.add_files("e", [str(f)], **kwargs)
    assert db.expert("e").size == 0


def test_embedders_without_a_tokenizer_estimate_tokens():
    v = VectorsOnly(8)
    assert v.max_tokens is None
    assert v.count_tokens(["two words", "日本語", "a" * 25, ""]) == [2, 3, 3, 0]

    class Plain:
        dim = 4

        def embed(self, texts):
            return [[1.0, 0, 0, 0] for _ in texts]

    class Counting(Plain):
        max_tokens = 20

        def count_tokens(self, texts):
            return [len(t) for t in texts]

    assert CallableEmbedder(Plain()).max_tokens is None
    assert CallableEmbedder(Plain()).count_tokens(["two words"]) == [2]
    c = CallableEmbedder(Counting())
    assert (c.max_tokens, c.count_tokens(["abc"])) == (20, [3])
    s = sizes_for(c.count_tokens, c.max_tokens)
    assert s.chunk_tokens == 20
    assert all(len(x.text) <= 20 for x in split_passages("word " * 100, s))


def test_cli_flags_set_the_sizes(db_path, tmp_path):
    f = tmp_path / "notes.md"
    f.write_text("# Sauces\n\n" + (ROUX + " ") * 4 + "\n")
    r = run_cli(["add-expert", "sauces", str(f), "--chunk-tokens", "64", "--overlap", "8", "--no-refit",
                 "--json"], db_path)
    assert r.returncode == 0, r.stderr
    with moedb.connect(db_path) as d:
        docs = d.documents("sauces")
        assert len(docs) >= 4 and max(d.embedding.embedder.count_tokens([x["text"] for x in docs])) <= 64
    r = run_cli(["add-docs", "sauces", str(f), "--chunk-tokens", "999"], db_path)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "chunk_tokens" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_sentence_transformers_counts_the_same_word_pieces(embedder):
    pytest.importorskip("sentence_transformers", reason="the tune extra (sentence-transformers) is not installed")
    from moedb.embed import SentenceTransformerEmbedder

    st_emb = SentenceTransformerEmbedder()
    texts = ["", "Hello World", "naïve Straße 日本語 😀 " * 50, "x." * 400, ROUX]
    assert st_emb.max_tokens == embedder.max_tokens == 256
    assert st_emb.count_tokens(texts) == embedder.count_tokens(texts)
