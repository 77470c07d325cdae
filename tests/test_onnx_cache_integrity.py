"""The ONNX export cache is checked against a cryptographic hash (issue 15, item 7): a tampered export is
rebuilt even when whoever tampered with it also rewrote the sidecar's checks; a forged fingerprint stamp is
ignored; a cache folder every user may write is not used (a warning says so).

Real parts throughout: the bundled model, its export, onnxruntime, temporary cache folders."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import zlib

import numpy as np

from moedb.embed import OnnxMiniLMEmbedder, default_model_path, model_fingerprint
from moedb.embed import cache as ec
from moedb.embed import onnx_export as ox

PROBE = ["How do I rotate JWT signing keys?", "knead the dough"]


def _files(cache: pathlib.Path) -> dict[str, pathlib.Path]:
    p = ec.cache_paths(default_model_path(), cache)
    return {k: p[k] for k in ("onnx", "weights", "json")}


def _forge_sidecar(path: pathlib.Path, files: dict[str, pathlib.Path]) -> None:
    """What a tamperer without the key does: recompute every check the sidecar holds, in its own format
    (``[size, crc32]`` or ``[size, sha256]``), and write it back."""
    meta = json.loads(path.read_text())
    for name in ("onnx", "weights"):
        data = files[name].read_bytes()
        old = meta[name][1]
        meta[name] = [len(data), zlib.crc32(data) if isinstance(old, int) else hashlib.sha256(data).hexdigest()]
    path.write_text(json.dumps(meta))


def _flip_a_weight(weights: pathlib.Path) -> None:
    with open(weights, "r+b") as f:  # same size; a float in the middle of a matrix changed
        f.seek(weights.stat().st_size // 2)
        b = f.read(4)
        f.seek(-4, 1)
        f.write(bytes([b[0], b[1], b[2], b[3] ^ 0x20]))


def test_a_tampered_export_with_a_rewritten_sidecar_is_rebuilt(tmp_path):
    ref = OnnxMiniLMEmbedder(cache=str(tmp_path)).embed(PROBE)
    files = _files(tmp_path)
    _flip_a_weight(files["weights"])
    _forge_sidecar(files["json"], files)
    tampered = files["weights"].read_bytes()
    before = ox.EXPORTS
    emb = OnnxMiniLMEmbedder(cache=str(tmp_path))
    v = emb.embed(PROBE)
    assert ox.EXPORTS == before + 1, "the tampered export was loaded instead of rebuilt"
    np.testing.assert_array_equal(v, ref)
    assert files["weights"].read_bytes() != tampered and emb.model_file_ == files["onnx"]
    meta = json.loads(files["json"].read_text())
    assert meta["model_sha256"] == model_fingerprint(default_model_path())
    assert meta["weights"][1] == hashlib.sha256(files["weights"].read_bytes()).hexdigest()


def test_a_sidecar_naming_other_source_weights_is_rebuilt(tmp_path):
    OnnxMiniLMEmbedder(cache=str(tmp_path)).embed(PROBE)
    files = _files(tmp_path)
    meta = json.loads(files["json"].read_text())
    files["json"].write_text(json.dumps({**meta, "model_sha256": "0" * 64}))
    before = ox.EXPORTS
    OnnxMiniLMEmbedder(cache=str(tmp_path)).embed(PROBE)
    assert ox.EXPORTS == before + 1


def test_a_forged_fingerprint_stamp_is_ignored(tmp_path):
    src = pathlib.Path(default_model_path())
    true = model_fingerprint(src)
    assert model_fingerprint(src, tmp_path) == true
    (stamp,) = (tmp_path / "onnx").glob("stamp-*")
    stamp.write_text("f" * 64)  # a digest pointing at an export the tamperer prepared
    assert model_fingerprint(src, tmp_path) == true


def test_a_world_writable_cache_is_not_used(tmp_path, capsys):
    cache = tmp_path / "shared-cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    before = ox.EXPORTS
    emb = OnnxMiniLMEmbedder(cache=str(cache))
    v = emb.embed(PROBE)
    assert emb.model_file_ is None and ox.EXPORTS == before + 1  # built in memory
    err = capsys.readouterr().err
    assert "writable by every user" in err and "chmod o-w" in err
    assert not (cache / "onnx").exists()
    assert v.shape == (2, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)


def test_a_key_others_can_read_is_not_trusted(tmp_path, capsys):
    OnnxMiniLMEmbedder(cache=str(tmp_path)).embed(PROBE)
    os.chmod(tmp_path / "onnx" / ".key", 0o644)
    emb = OnnxMiniLMEmbedder(cache=str(tmp_path))
    emb.embed(PROBE)
    assert emb.model_file_ is None and "not a private file" in capsys.readouterr().err
