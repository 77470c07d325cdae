"""What keeps a cold ``moedb route`` fast: no heavy import on its path (speed itself is in benches/)."""
from __future__ import annotations

import json
import subprocess
import sys

import moedb

# The embedding stack a cold `moedb route` must never load: ONNX does the embedding instead.
TORCH_STACK = ("torch", "sentence_transformers", "transformers")
HEAVY = TORCH_STACK + ("sklearn", "scipy", "matplotlib", "llama_cpp", "httpx", "mlx", "onnx")


def _heavy(modules, names=HEAVY) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in names)


def _imported(args: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``python -X importtime -m moedb.cli ARGS``; the process and the modules it imported."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "moedb.cli"] + args, capture_output=True,
                         text=True, timeout=300)
    mods = [ln.split("|")[-1].strip() for ln in out.stderr.splitlines() if ln.startswith("import time:")]
    return out, mods


def test_importing_moedb_and_its_cli_is_light():
    code = ("import sys, moedb, moedb.cli; from moedb.cli import common, experts, routing, lifecycle, stats, "
            "generation; print('\\n'.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert _heavy(out.stdout.split(), TORCH_STACK) == []
    assert _heavy(out.stdout.split()) == []


def test_warm_route_uses_onnx_and_imports_nothing_heavy(db_path, embedder):
    with moedb.connect(db_path, embedder=embedder) as db:
        db.add_expert("security", ["JWT tokens expire after an hour; rotate signing keys monthly.",
                                   "Use OAuth scopes to limit what a token can do."])
        db.add_expert("cooking", ["Simmer the tomato sauce for twenty minutes.", "Knead the dough until smooth."])
    query = ["route", "how do I rotate the signing keys?", "--min-confidence", "0", "--json"]
    first, mods = _imported(["--db", db_path] + query)  # the first route may fit and persist the router
    assert first.returncode == 0, first.stderr
    assert _heavy(mods, TORCH_STACK) == [], "torch/transformers imported by the first route"
    out, mods = _imported(["--db", db_path] + query)
    assert out.returncode == 0, out.stderr
    assert "onnxruntime" in mods and "tokenizers" in mods          # the ONNX runtime did the embedding
    assert _heavy(mods, TORCH_STACK) == [], "torch/transformers imported on the warm route path"
    assert _heavy(mods) == [], "heavy imports on the warm route path"
    r = json.loads(out.stdout)
    assert r["experts"][0]["name"] == "security"
