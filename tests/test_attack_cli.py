"""Attack suite: the CLI with typos and bad arguments (issue 15). Every case ends with exit code 1 and one
``error:`` line, or typer's usage message and exit code 2, never a traceback; a failing command leaves the
database's content unchanged. The real ``moedb`` console script runs each case.

A short list runs by default; the whole list is marked ``slow``. Counts are printed (attack_tally)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from attack_tally import Tally, content_digest, integrity_ok
from conftest import run_cli

BAD = "\udcff\udcfe"  # invalid UTF-8 bytes as the shell hands them over (surrogateescape)

CASES = [  # the first ones run by default
    ["show"], ["route", "jwt", "--top-k", "abc"], ["nosuchcommand"], ["add-expert", "lonely"],
    ["add-docs", "sec", "{tmp}/notes.md", "--on-conflict", "bogus"], ["apply", "{tmp}/yaml"],
    ["add-expert", "x", "{tmp}/fifo.md"], ["ingest-feedback", "{tmp}/bad.jsonl"],
    ["route"], ["route", "x", "--bogus"], ["add-docs", "nobody", "{tmp}/notes.md"],
    ["add-docs", "sec", "{tmp}/missing.md"], ["split", "sec", "--n", "1"], ["merge", "sec", "--into", "sec"],
    ["feedback", "abc", "sec"],
    # the rest: the long run
    ["show", BAD], ["route", BAD], ["add-expert", BAD, "--text", "x"], ["rename", "sec", ""], ["rename", "sec", " x"],
    ["remove-expert", "ghost"], ["route", "x", "--top-k", "0"], ["route", "x", "--top-k", "-1"], ["route", "x", "-k", "nan"],
    ["route", "x", "--min-confidence", "2"], ["route", "x", "--min-confidence", "nan"], ["search", "x", "-k", "0"],
    ["search", ""], ["route", ""], ["route", "   "], ["split", "ghost"], ["split", "sec", "--n", "99999"],
    ["merge", "ghost", "--into", "x"], ["merge", "--into", "x"], ["feedback", "999999", "sec", "--good"],
    ["feedback", "1", "ghost", "--good"], ["feedback", "1", "sec", "--good", "--bad"], ["feedback", "1", "sec",
                                                                                      "--reward", "7"],
    ["ingest-feedback", "{tmp}"], ["ingest-feedback", "/dev/null"], ["retrain", "--holdout", "1.5"],
    ["retrain", "--holdout", "x"], ["stats", "--since", "yesterday-ish"], ["stats", "--since", "2024-13-45"],
    ["optimize", "--apply", "--bogus"], ["set-generator", "sec", "--backend", "nope"],
    ["set-generator", "ghost", "--backend", "llama"], ["set-strategy", "nope"], ["ask", "x", "--strategy", "nope"],
    ["add-expert", "big", "--text", "x", "--chunk-size", "10"], ["add-expert", "x", "/proc/self/environ"],
    ["add-expert", "x", "/dev/zero"], ["add-docs", "sec", "{tmp}/empty.md"],
    ["apply", "{tmp}/notes.md"], ["apply", "/nonexistent"], ["list", "--tree", "--json", "--extra"],
    ["show", "sec", "--docs", "x"], ["show", "sec", "--docs", "-5"], ["tune-embedder", "--epochs", "abc"],
    ["--db"], ["--db", "/dev/null", "list"], ["--db", "{tmp}/nodir/x.db", "init"], ["--db", "{tmp}", "list"],
    ["--db", "{tmp}/notes.md", "list"], ["init", "extra-arg"], ["route", "x" * 20000, "--json"],
]
SHORT = 8


def _setup(tmp):
    (tmp / "notes.md").write_text("JWT tokens expire; rotate the signing keys.\n")
    (tmp / "empty.md").write_text("")
    os.mkfifo(tmp / "fifo.md")
    (tmp / "bad.jsonl").write_bytes(b'{"query": 1}\n\xff\xfe\n' + b"[" * 50_000 + b"\n")
    (tmp / "yaml").mkdir()
    (tmp / "yaml" / "x.yaml").write_text("name: x\ndocuments: [/etc/passwd]\n")


def _case(args, db, tmp):
    args = [a.replace("{tmp}", str(tmp)) for a in args]
    if args and args[0] == "--db":  # the case names its own --db
        import subprocess
        import sys
        import shutil

        exe = shutil.which("moedb")
        cmd = ([exe] if exe else [sys.executable, "-m", "moedb.cli"]) + args
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, errors="surrogateescape")
    return run_cli(args, db)


@pytest.mark.parametrize("n", [pytest.param(SHORT, id="short"), pytest.param(len(CASES), id="long",
                                                                            marks=pytest.mark.slow)])
@pytest.mark.timeout(1800)
def test_attack_cli_typos_and_bad_arguments(tmp_path, n):
    db = str(tmp_path / "cli.db")
    _setup(tmp_path)
    assert run_cli(["add-expert", "sec", str(tmp_path / "notes.md"), "--no-refit"], db).returncode == 0
    import apsw

    def digest():
        c = apsw.Connection(db)
        try:
            return content_digest(c)
        finally:
            c.close()

    before = digest()
    tally = Tally("CLI typos and bad arguments")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda a: (a, _case(a, db, tmp_path)), CASES[:n]))
    for args, p in results:
        tally.tried += 1
        out = (p.stdout or "") + (p.stderr or "")
        if "Traceback" in out:
            tally.tracebacks += 1
            tally.note(f"{args[:3]}: {out[-300:]}")
        elif p.returncode == 1 and p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1:
            tally.clean += 1
        elif p.returncode == 2 and ("Usage" in p.stderr or "Error" in p.stderr):
            tally.clean += 1  # typer's own usage message
        elif p.returncode == 0:
            tally.ok += 1
            tally.note(f"{args[:3]}: succeeded")
        else:
            tally.tracebacks += 1
            tally.note(f"{args[:3]}: exit {p.returncode}: {out[-300:]}")
    after = digest()
    # only the successful cases may have changed the file; here they are all read-only or refused
    if after != before and tally.ok == 0:
        tally.lost += 1
        tally.note("a failing command changed the database")
    tally.corrupted = 0 if integrity_ok(db) else 1
    tally.report()
    assert tally.tracebacks == 0 and tally.corrupted == 0 and tally.lost == 0, tally.notes
