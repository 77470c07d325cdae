"""Shared fixtures. Tests run on temporary databases and never touch the user's home."""
from __future__ import annotations

import os
import pathlib
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("MOEDB_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep moedb's caches (e.g. the ONNX export) out of the user's home."""
    if "MOEDB_CACHE" not in os.environ:
        os.environ["MOEDB_CACHE"] = str(tmp_path_factory.mktemp("moedb-cache"))
    yield


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED} (data for this test is not part of the repository)")
    return SHARED


@pytest.fixture(scope="session")
def embedder():
    """The real bundled all-MiniLM-L6-v2, loaded once per test session."""
    from moedb.embed import resolve

    return resolve(None)


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "test.db")


@pytest.fixture
def db(db_path, embedder):
    import moedb

    d = moedb.connect(db_path, embedder=embedder)
    yield d
    d.close()


def run_cli(args, db_path, env=None, input=None, timeout=300):
    """Run the real `moedb` console script; returns CompletedProcess."""
    import shutil
    import subprocess

    exe = shutil.which("moedb") or [sys.executable, "-m", "moedb.cli"]
    cmd = ([exe] if isinstance(exe, str) else exe) + ["--db", db_path] + list(args)
    e = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=e, input=input, timeout=timeout)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# tests that drive an optional part skip with the extra that brings it
needs_openai = pytest.mark.skipif(not _has("openai"), reason="the openai backend needs the openai extra: "
                                  "pip install 'moedb[openai]'")
has_matplotlib = _has("matplotlib")


@pytest.fixture(scope="module")
def stories(shared_dir):
    """The path of ../shared/models/stories260K.gguf (a real tiny Llama model in GGUF)."""
    p = shared_dir / "models" / "stories260K.gguf"
    if not p.exists():
        pytest.skip(f"{p} not found")
    return str(p)
