"""Files moedb reads (issue 15, items 8 and 9): only regular files inside the paths given; links leading
outside, /proc, FIFOs and devices refused; empty and binary files skipped and reported; YAML ``documents:``
kept inside the folder; ``add-expert NAME`` without input refused; YAML alias amplification refused."""
from __future__ import annotations

import json
import os
import time
import warnings

import pytest

from moedb.errors import FileProblem, InvalidInput, SkippedFile

from conftest import run_cli

SECRET = "moedb-test-secret-4e1f"


def _hostile_folder(root):
    """A folder of one good file, a link inside it, and every kind of file that must not be read."""
    d = root / "docs"
    d.mkdir()
    (d / "good.md").write_text("JWT tokens expire; refresh them with the rotation endpoint.\n")
    os.symlink(d / "good.md", d / "alias.md")                 # inside the folder: followed
    os.symlink("/proc/self/environ", d / "env.txt")
    os.symlink("/etc/passwd", d / "users.md")
    os.symlink("/dev/zero", d / "zero.txt")
    os.mkfifo(d / "pipe.md")
    (d / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (d / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / "empty.md").write_text("")
    (d / "blank.txt").write_text("  \n\n ")
    os.symlink(root, d / "loop")                              # a link to a folder: not followed
    return d


SKIPPED = {"env.txt": "outside", "users.md": "outside", "zero.txt": "outside", "pipe.md": "FIFO",
           "blob.txt": "binary", "latin.txt": "not UTF-8", "empty.md": "empty", "blank.txt": "empty",
           "loop": "link to a folder"}


@pytest.mark.timeout(120)
def test_add_files_reads_only_regular_files_inside_the_folder(db, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEDB_TEST_API_KEY", SECRET)
    d = _hostile_folder(tmp_path)
    db.add_expert("sec", ["placeholder text about security"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n = db.add_files("sec", [str(d)])
    assert n == 2  # good.md and the link to it
    skipped = {os.path.basename(w.message.path): w.message.reason for w in caught
               if issubclass(w.category, SkippedFile)}
    assert set(skipped) == set(SKIPPED), skipped
    for name, word in SKIPPED.items():
        assert word in skipped[name], (name, skipped[name])
    texts = " ".join(x["text"] for x in db.documents("sec"))
    assert SECRET not in texts and "root:" not in texts
    raw = open(db.path, "rb").read() + (open(db.path + "-wal", "rb").read() if os.path.exists(db.path + "-wal") else b"")
    assert SECRET.encode() not in raw


@pytest.mark.timeout(60)
def test_a_path_given_explicitly_that_is_not_a_safe_file_is_an_error(db, tmp_path):
    d = _hostile_folder(tmp_path)
    db.add_expert("sec", ["placeholder text about security"])
    before = db.expert("sec").size
    for name, word in [("env.txt", "outside"), ("users.md", "outside"), ("pipe.md", "FIFO"),
                       ("zero.txt", "outside")]:
        with pytest.raises(FileProblem, match=word):
            db.add_files("sec", [str(d / name)])
    with pytest.raises(FileProblem, match="system file"):
        db.add_files("sec", ["/proc/self/environ"])
    with pytest.raises(FileProblem, match="empty file"):
        db.add_files("sec", [str(d / "empty.md")])
    with pytest.raises(FileProblem, match="binary"):
        db.add_expert("bin", files=[str(d / "blob.txt")])
    hollow = tmp_path / "hollow"
    hollow.mkdir()
    (hollow / "empty.md").write_text("")
    with pytest.raises(InvalidInput, match="skipped.*empty file"):  # nothing left in a folder: the error says why
        db.add_files("sec", [str(hollow)])
    assert db.expert("sec").size == before and [e.name for e in db.experts()] == ["sec"]


def _write_yaml(folder, name, text):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)


@pytest.mark.parametrize("docs, word", [("[/etc/passwd]", "absolute"), ("[../outside.md]", "outside"),
                                        ("[sub/../../outside.md]", "outside"), ("[out]", "outside")])
def test_yaml_documents_stay_inside_the_folder(db, tmp_path, docs, word):
    (tmp_path / "outside.md").write_text("A file beside the expert folder, not in it.\n")
    exp = tmp_path / "experts"
    _write_yaml(exp, "a.yaml", f"name: a\ndocuments: {docs}\n")
    os.symlink(tmp_path, exp / "out")  # a link to a folder outside
    (exp / "sub").mkdir()
    with pytest.raises(FileProblem, match=word):
        db.apply_dir(str(exp))
    assert db.experts() == []


def test_yaml_documents_skips_are_reported(db, tmp_path):
    exp = tmp_path / "experts"
    (exp / "docs").mkdir(parents=True)
    (exp / "docs" / "ok.md").write_text("Indexes speed up joins on large tables.\n")
    os.symlink("/etc/passwd", exp / "docs" / "users.md")
    (exp / "docs" / "empty.txt").write_text("")
    _write_yaml(exp, "sql.yaml", "documents: [docs/]\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = db.apply_dir(str(exp))
    assert rep["created"] == ["sql"] and db.expert("sql").size == 1
    got = {s["file"]: s["reason"] for s in rep["details"]["sql"]["skipped"]}
    assert set(got) == {"docs/users.md", "docs/empty.txt"} and "outside" in got["docs/users.md"]
    assert sum(issubclass(w.category, SkippedFile) for w in caught) == 2


def test_yaml_alias_amplification_is_refused_quickly(db, tmp_path):
    """413 bytes with 8 levels of 8 aliases stored 236 MB before; now refused before anything is built."""
    lines, prev = ['a: &a ["xxxxxxxxxxxxxxxx", "x", "x", "x", "x", "x", "x", "x"]'], "a"
    for n in "bcdefgh":
        lines.append(f"{n}: &{n} [" + ", ".join([f"*{prev}"] * 8) + "]")
        prev = n
    text = "name: bomb\nmetadata:\n" + "\n".join("  " + x for x in lines) + "\n"  # (a known key holds it)
    assert len(text) < 600
    exp = tmp_path / "experts"
    _write_yaml(exp, "bomb.yaml", text)
    size = os.path.getsize(db.path)
    t = time.perf_counter()
    with pytest.raises(FileProblem, match="alias"):
        db.apply_dir(str(exp))
    assert time.perf_counter() - t < 10 and os.path.getsize(db.path) == size and db.experts() == []
    # a modest use of aliases still works
    _write_yaml(exp, "bomb.yaml", "name: ok\nkeywords: &k [sql, joins]\nmetadata: {tags: *k}\n")
    assert db.apply_dir(str(exp))["created"] == ["ok"]
    assert db.expert("ok").metadata == {"tags": ["sql", "joins"]}


def test_cli_add_expert_needs_input_and_reports_skipped_files(tmp_path):
    path = str(tmp_path / "cli.db")
    p = run_cli(["add-expert", "lonely"], path)
    assert p.returncode == 1 and p.stderr.startswith("error:") and "Traceback" not in p.stderr
    assert not os.path.exists(path)
    d = _hostile_folder(tmp_path)
    p = run_cli(["add-expert", "sec", str(d), "--no-refit", "--json"], path, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["size"] == 2 and {os.path.basename(s["file"]) for s in out["skipped"]} == set(SKIPPED)
    lines = [x for x in p.stderr.splitlines() if x.startswith("skipped: ")]
    assert len(lines) == len(SKIPPED)
