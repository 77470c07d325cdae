"""The shape of the code: the layering contract, no import cycles, small modules, and a base install that
never imports torch."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "sentence_transformers")


def test_import_contracts_are_kept():
    """`lint-imports` checks the layers (cli > database > lifecycle|analytics|ask > engine >
    routing|store|embed|generate|ingest > settings|text|timeparse|vectors|types > errors) and that no package's
    modules import each other in a circle (pyproject.toml, [tool.importlinter])."""
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    p = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "0 broken" in p.stdout


def test_a_broken_layer_would_be_caught(tmp_path):
    """The contract is not vacuous: a copy of the package where the store imports the engine fails it."""
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    shutil.copytree(ROOT / "moedb", tmp_path / "moedb")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bad = tmp_path / "moedb" / "store" / "experts.py"
    bad.write_text(bad.read_text() + "\nfrom ..engine import catalog  # noqa: E402,F401\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    p = subprocess.run([exe, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 0 and "BROKEN" in p.stdout, p.stdout[-2000:]


def test_modules_stay_small():
    """One module per idea: none over 500 lines."""
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / "moedb").rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not big, big


def _modules_after(code: str, tmp_path: Path) -> set[str]:
    env = {**os.environ, "MOEDB_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    return set(p.stdout.split())


def test_import_moedb_loads_no_torch(tmp_path):
    mods = _modules_after("import sys, moedb; print(' '.join(sys.modules))", tmp_path)
    assert not [m for m in HEAVY if m in mods]


def test_a_route_on_the_default_embedder_loads_no_torch(tmp_path):
    """The library path a `moedb route` takes (open a file, add an expert, route) never imports torch,
    transformers or sentence_transformers: the bundled model runs on onnxruntime."""
    code = ("import sys, moedb\n"
            "db = moedb.connect('t.db')\n"
            "db.add_expert('a', ['The roux thickens the sauce.', 'Whisk the yolk.'])\n"
            "db.add_expert('b', ['Jupiter is a gas giant.', 'Mars is red.'])\n"
            "r = db.route('How do I thicken a sauce?', min_confidence=0.0)\n"
            "assert r.experts[0].name == 'a', r.experts\n"
            "print(' '.join(sys.modules))\n")
    mods = _modules_after(code, tmp_path)
    assert not [m for m in HEAVY if m in mods]


def test_no_part_reads_another_objects_private_state():
    """Parts talk through public methods: no ``other._name`` outside ``self``/``cls`` (llama.py alone reaches
    into llama-cpp-python's own objects, which offer no public handle for LoRA adapters)."""
    import re

    pat = re.compile(r"(\.?)\b(\w+)\._[a-z]\w*")
    found = []
    for p in (ROOT / "moedb").rglob("*.py"):
        if p.name == "llama.py":
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            for m in pat.finditer(code):
                own = m.group(1) == "" and m.group(2) in ("self", "cls")
                if not own and m.group(2) not in ("os", "sys", "typer"):
                    found.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)
