"""The real `moedb` console script on a temporary file."""
from __future__ import annotations

import json
import pathlib

import pytest

from conftest import run_cli

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(scope="module")
def cli_db(tmp_path_factory):
    """A database built through the CLI once for this module."""
    path = str(tmp_path_factory.mktemp("cli") / "cli.db")
    r = run_cli(["init"], path)
    assert r.returncode == 0, r.stderr
    for name in ("security", "cooking", "astronomy"):
        r = run_cli(["add-expert", name, str(EXAMPLES / name), "--description", f"{name} notes",
                     "--keyword", name, "--chunk-size", "400"], path)
        assert r.returncode == 0, r.stderr
        assert f"added expert '{name}'" in r.stdout
    r = run_cli(["add-expert", "inline", "--text", "Sourdough starters need daily feeding.", "--text",
                 "Tomatoes need deep watering.", "--parent", "cooking"], path)
    assert r.returncode == 0, r.stderr
    return path


def test_list_and_show_json(cli_db):
    r = run_cli(["list", "--json"], cli_db)
    assert r.returncode == 0, r.stderr
    experts = {e["name"]: e for e in json.loads(r.stdout)}
    assert set(experts) == {"security", "cooking", "astronomy", "inline"}
    assert experts["inline"]["parent"] == "cooking" and experts["inline"]["size"] == 2
    assert experts["security"]["keywords"] == ["security"] and experts["security"]["size"] >= 4
    r = run_cli(["show", "security", "--json", "--docs", "2"], cli_db)
    shown = json.loads(r.stdout)
    assert shown["name"] == "security" and len(shown["documents"]) == 2
    assert shown["documents"][0]["source"].endswith(".md")
    r = run_cli(["list"], cli_db)
    assert "security" in r.stdout and r.returncode == 0


def test_route_json_and_human(cli_db):
    r = run_cli(["route", "How do I fix a JWT auth bug?", "--top-k", "2", "-k", "3", "--json"], cli_db)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["experts"][0]["name"] == "security"
    assert len(out["hits"]) == 3 and out["hits"][0]["expert"] == "security"
    assert isinstance(out["query_id"], int) and out["abstained"] is False
    assert {"name", "score", "confidence"} <= set(out["experts"][0])
    assert {"expert", "id", "text", "score", "metadata", "source"} <= set(out["hits"][0])
    r = run_cli(["route", "Which planet has the biggest storm?", "--min-confidence", "0"], cli_db)
    assert r.returncode == 0, r.stderr
    assert "astronomy" in r.stdout and "█" in r.stdout  # confidence bar
    assert "Jupiter" in r.stdout


def test_search_json(cli_db):
    r = run_cli(["search", "mayonnaise egg yolk", "-k", "4", "--json"], cli_db)
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert len(hits) == 4 and hits[0]["expert"] == "cooking"
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_add_docs_and_remove(cli_db, tmp_path):
    f = tmp_path / "extra.md"
    f.write_text("Neutron stars are the collapsed cores of massive stars.\n")
    r = run_cli(["add-docs", "astronomy", str(f), "--json"], cli_db)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["added"] == 1
    r = run_cli(["add-expert", "tmp", "--text", "temporary"], cli_db)
    assert r.returncode == 0
    r = run_cli(["remove-expert", "tmp"], cli_db)
    assert r.returncode == 0
    names = [e["name"] for e in json.loads(run_cli(["list", "--json"], cli_db).stdout)]
    assert "tmp" not in names


@pytest.mark.parametrize("args, message", [
    (["show", "nope"], "unknown expert: 'nope'"),
    (["add-docs", "nope", "x.md"], "unknown expert"),
    (["add-expert", "security", "--text", "dup"], "already exists"),
    (["add-expert", "fresh", "/definitely/missing.md"], "no such file"),
    (["add-expert", "orphan", "--text", "x", "--parent", "ghost"], "parent expert: 'ghost'"),
    (["route", "   "], "query is empty"),
    (["route", "hello", "--top-k", "0"], "top_k"),
    (["remove-expert", "nope"], "unknown expert"),
])
def test_user_errors_are_one_line_and_exit_1(cli_db, args, message):
    before = run_cli(["list", "--json"], cli_db).stdout
    r = run_cli(args, cli_db)
    assert r.returncode == 1, (r.stdout, r.stderr)
    err = r.stderr.strip()
    assert message in err
    assert "Traceback" not in r.stderr and len(err.splitlines()) == 1
    assert run_cli(["list", "--json"], cli_db).stdout == before


def test_missing_database_is_an_error(tmp_path):
    r = run_cli(["list"], str(tmp_path / "none.db"))
    assert r.returncode == 1 and "no database" in r.stderr


def test_db_from_environment(cli_db, tmp_path):
    import os
    import shutil
    import subprocess

    r = subprocess.run([shutil.which("moedb"), "list", "--json"], capture_output=True, text=True,
                       env={**os.environ, "MOEDB_DB": cli_db}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) >= 4


def test_add_expert_chunks_files_in_the_library(cli_db, tmp_path):
    """``add-expert NAME PATHS`` hands the paths to the library: no passages is a one-line error."""
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli(["add-expert", "hollow", str(empty)], cli_db)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    (empty / "blank.md").write_text("\n\n")
    r = run_cli(["add-expert", "hollow", str(empty)], cli_db)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: no passages found in") and len(r.stderr.splitlines()) == 1, r.stderr
    assert "hollow" not in run_cli(["list"], cli_db).stdout
    d = tmp_path / "notes"
    d.mkdir()
    (d / "a.md").write_text("Comets have icy nuclei.\n\nTheir tails point away from the Sun.\n")
    r = run_cli(["add-expert", "comets", str(d), "--text", "Halley returns every 76 years.", "--no-refit",
                 "--json"], cli_db)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["size"] >= 2
    assert run_cli(["remove-expert", "comets"], cli_db).returncode == 0


def test_set_generator_default_and_clear(cli_db):
    r = run_cli(["set-generator", "--default", "--backend", "extractive", "--json"], cli_db)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["target"] == "default" and out["generator"]["backend"] == "extractive"
    r = run_cli(["set-generator", "--default", "--clear", "--json"], cli_db)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"target": "default", "generator": None}
    r = run_cli(["set-generator", "--default", "--clear"], cli_db)
    assert r.returncode == 0 and "default: generator cleared" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["route"], "Missing argument"),                    # a missing argument
    (["route", "q", "--top-k", "abc"], "--top-k"),      # a value of the wrong type
    (["no-such-command"], "No such command"),           # an unknown command
    (["route", "q", "--no-such-option"], "No such option"),  # an unknown option
])
def test_usage_errors_print_usage_and_exit_2(cli_db, args, message):
    r = run_cli(args, cli_db)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert "Usage:" in r.stderr and message in r.stderr


def test_python_dash_m_runs_the_same_command(cli_db):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "moedb.cli", "--db", cli_db, "list", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert {"security", "cooking"} <= {e["name"] for e in json.loads(r.stdout)}
    r = subprocess.run([sys.executable, "-m", "moedb.cli", "--db", cli_db, "route"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_every_command_is_registered():
    from moedb.cli import app

    names = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    assert names == {"init", "add-expert", "add-docs", "list", "show", "remove-expert", "route", "search",
                     "feedback", "ingest-feedback", "retrain", "split", "merge", "rename", "optimize", "stats",
                     "tune-embedder", "ask", "set-generator", "set-strategy", "apply", "serve"}


def test_a_failing_first_command_leaves_no_file(tmp_path):
    """``add-expert`` on a file that does not exist yet, failing (an empty folder), creates nothing; an
    existing file that a command fails on is left alone."""
    path = tmp_path / "new.db"
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli(["add-expert", "hollow", str(empty)], str(path))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "empty" in r.stderr, r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("new.db")]
    assert run_cli(["init"], str(path)).returncode == 0
    assert run_cli(["add-expert", "hollow", str(empty)], str(path)).returncode == 1
    assert path.exists() and run_cli(["list", "--json"], str(path)).returncode == 0
