"""The embedders of moedb.embed: the ONNX runtime of the bundled all-MiniLM-L6-v2 (and of tuned BERT
folders), its torch-free export and cache, the choice between runtimes, and the ``tune`` extra.

Everything here is real: the bundled model, onnx, onnxruntime, tokenizers and sentence-transformers as
the reference (tests needing it skip when it is not installed). Exports go to temporary cache directories.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moedb
from moedb.embed import (OnnxMiniLMEmbedder, SentenceTransformerEmbedder, cache_dir, default_model_path,
                         model_fingerprint, resolve)
from moedb.embed import cache as ec
from moedb.embed import onnx_export as ox
from moedb.embed import resolver as rs
from moedb.errors import ConfigError, InvalidInput

HAS_ST = importlib.util.find_spec("sentence_transformers") is not None
needs_st = pytest.mark.skipif(not HAS_ST, reason="sentence-transformers (the moedb[tune] extra) is not "
                                                 "installed: no reference vectors")
MAX_COSINE_GAP = 1e-6   # 1 - cosine(ONNX vector, sentence-transformers vector), per text
HEAVY = ("torch", "transformers", "sentence_transformers")


UNICODE = [
    "Crème brûlée à la façon de grand-mère, déjà prête ?", "Straße, Äpfel und Öl für die Küche",
    "東京で一番おいしいラーメン屋はどこですか", "如何在数据库中轮换加密密钥", "서울에서 부산까지 기차로 얼마나 걸리나요",
    "Как сбросить пароль от учётной записи?", "كيف يمكنني تغيير كلمة المرور", "שלום, מה שלומך היום?",
    "🔑🔐 rotate the keys 🚀🚀 now!!", "naïve café résumé coöperate", "e\u0301te\u0301 (combining accents)",
    "ℌ𝔢𝔩𝔩𝔬 𝔴𝔬𝔯𝔩𝔡 in fraktur", "tab\tseparated\tvalues\nand new lines", "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ",
    "मैं हिंदी में प्रश्न पूछ रहा हूँ", "Ελληνικά: πώς είστε;", "x² + y² = z², ∑ᵢ aᵢ ≤ ∞",
]


def varied_texts(n_doc: int = 220) -> list[str]:
    """Real English from the standard library's docstrings, plus unicode, tiny and long texts."""
    import collections
    import json as _json
    import os as _os
    import pathlib as _pathlib
    import re as _re
    import statistics
    import textwrap

    docs = []
    for mod in (_os, _json, collections, _re, _pathlib, statistics, textwrap, inspect, random):
        for _, obj in inspect.getmembers(mod):
            d = inspect.getdoc(obj)
            if d and len(d.split()) >= 3 and d not in docs:
                docs.append(d)
    rng = random.Random(7)
    rng.shuffle(docs)
    texts = [d.split("\n\n")[0] for d in docs[:n_doc]]               # first paragraphs: short to medium
    long_doc = " ".join(d.replace("\n", " ") for d in docs[:60])
    texts += [long_doc[:n] for n in (1200, 1500, 3000, 8000)]          # past 256 word pieces: truncated
    texts += [" ".join(rng.choice(UNICODE) for _ in range(40))]        # long and unicode
    texts += UNICODE + ["a", "?", "OK", "42", "   padded with spaces   ", "SELECT * FROM experts;",
                        "def f(x):\n    return x ** 2", "https://example.com/a?b=c&d=e#frag"]
    return texts


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    """The default cache of these tests is a temporary folder (never the user's home)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEDB_CACHE", str(tmp_path_factory.mktemp("moedb-cache")))
        yield


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return varied_texts()


@pytest.fixture(scope="module")
def onnx_emb(tmp_path_factory):
    return OnnxMiniLMEmbedder(cache=str(tmp_path_factory.mktemp("onnx-cache")))


@pytest.fixture(scope="module")
def st_emb():
    """The reference: the same bundled model run by sentence-transformers (loaded once)."""
    if not HAS_ST:
        pytest.skip("sentence-transformers (the moedb[tune] extra) is not installed: no reference vectors")
    return SentenceTransformerEmbedder(batch_size=64)


@pytest.fixture(scope="module")
def st_vectors(texts, st_emb):
    """sentence-transformers' vectors for ``texts``, computed once."""
    return st_emb.embed(texts)


def _worst_gap(v: np.ndarray, ref: np.ndarray, texts: list[str]) -> tuple[float, str]:
    gap = 1.0 - np.sum(v.astype(np.float64) * ref, axis=1)
    worst = int(np.argmax(gap))
    return float(gap[worst]), texts[worst][:60]


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=e)


# ---------------------------------------------------------------------- vectors
def test_vectors_agree_with_sentence_transformers(texts, onnx_emb, st_vectors):
    assert len(texts) >= 200
    tok = onnx_emb._load()[1]
    lengths = [len(e.ids) for e in tok.encode_batch(texts)]
    assert max(lengths) == 256 and sum(n == 256 for n in lengths) >= 4   # truncation is exercised
    assert min(lengths) <= 3                                             # and very short texts
    v = onnx_emb.embed(texts)
    assert v.shape == (len(texts), 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    gap, text = _worst_gap(v, st_vectors, texts)
    assert gap <= MAX_COSINE_GAP, f"text {text!r}: 1 - cosine = {gap}"
    # the same texts differently batched (alone; in batches mixing very different lengths) agree too
    picks = [texts.index(t) for t in texts if len(t) > 1000][:2] + [0, 1, len(texts) - 1]
    alone = np.stack([onnx_emb.embed([texts[i]])[0] for i in picks])
    np.testing.assert_allclose(alone, v[picks], atol=1e-5)
    mixed = OnnxMiniLMEmbedder(cache=onnx_emb.cache, batch_size=3).embed([texts[i] for i in picks])
    np.testing.assert_allclose(mixed, v[picks], atol=1e-5)


@needs_st
def test_a_folder_saved_by_sentence_transformers_runs_on_onnx(tmp_path, texts, st_emb):
    """A tuned embedder is a BERT folder written by ``SentenceTransformer.save``: resolve() runs it on
    onnxruntime, with sentence-transformers' vectors."""
    folder = tmp_path / "saved-model"
    st_emb._load().save(str(folder))
    emb = resolve(str(folder))
    assert isinstance(emb, OnnxMiniLMEmbedder)
    assert (emb.name, emb.dim, emb.kind, emb.model_path) == ("saved-model", 384, "onnx", str(folder))
    sample = texts[:220:8] + texts[220:]                 # some short, all long (truncated) and unicode
    ref = SentenceTransformerEmbedder(str(folder)).embed(sample)
    gap, text = _worst_gap(emb.embed(sample), ref, sample)
    assert gap <= MAX_COSINE_GAP, f"text {text!r}: 1 - cosine = {gap}"


def test_embedder_interface(onnx_emb):
    assert (onnx_emb.name, onnx_emb.dim, onnx_emb.kind) == ("all-MiniLM-L6-v2", 384, "onnx-minilm")
    assert onnx_emb.model_path is None
    assert onnx_emb.embed([]).shape == (0, 384)
    with pytest.raises(InvalidInput, match="#1 is empty"):
        onnx_emb.embed(["fine", "   "])
    with pytest.raises(InvalidInput, match="int"):
        onnx_emb.embed(["fine", 3])
    # semantics: a paraphrase is closer than an unrelated sentence
    a, b, c = onnx_emb.embed(["How do I reset my password?", "I forgot my password, how can I change it?",
                              "The recipe needs two cups of flour."])
    assert a @ b > a @ c + 0.3


@settings(max_examples=8, deadline=None)
@given(st.lists(st.sampled_from(UNICODE + ["short", "a somewhat longer sentence about databases and keys",
                                           " ".join(["word"] * 300)]), min_size=1, max_size=6),
       st.randoms(use_true_random=False))
def test_order_and_batching_do_not_change_vectors(onnx_emb, batch, rnd):
    v = onnx_emb.embed(batch)
    perm = list(range(len(batch)))
    rnd.shuffle(perm)
    w = onnx_emb.embed([batch[i] for i in perm])
    np.testing.assert_allclose(w, v[perm], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------- the export
def test_export_is_a_valid_onnx_model(onnx_emb):
    import onnx

    onnx_emb._load()
    path = onnx_emb.model_file_
    assert path is not None and path.with_suffix(".weights").stat().st_size > 80_000_000
    onnx.checker.check_model(str(path))                  # external weights resolved beside the graph
    m = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input]
    assert dims == [["batch", "sequence"]] * 2
    assert [o.name for o in m.graph.output] == ["sentence_embedding"]
    props = {p.key: p.value for p in m.metadata_props}
    assert props == {"moedb.pooling": "mean", "moedb.builder": str(ec.BUILDER_VERSION)}
    external = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) > 50
    for t in external:                                   # large tensors aligned for memory mapping
        info = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
        assert info["offset"] % (65536 if info["length"] >= 1 << 20 else 64) == 0
    inline = ox.export_model(default_model_path())       # the in-memory export: every tensor inline
    assert not [t for t in inline.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert inline.ByteSize() > 80_000_000
    onnx.checker.check_model(inline)


def test_weights_are_read_with_safetensors(tmp_path):
    from safetensors.numpy import save_file

    save_file({"half": np.arange(6, dtype=np.float16).reshape(2, 3), "ids": np.arange(4, dtype=np.int64)},
              str(tmp_path / "w.safetensors"))
    w = ox.load_weights(tmp_path / "w.safetensors")
    assert w["half"].dtype == np.float32 and w["half"].shape == (2, 3) and w["ids"].dtype == np.int64
    np.testing.assert_array_equal(w["half"], np.arange(6).reshape(2, 3))
    with pytest.raises(ConfigError, match="cannot read the weights"):
        ox.load_weights(tmp_path / "missing.safetensors")


def test_non_bert_folders_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ConfigError, match="not BERT"):
        ox.read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_act": "relu"}))
    with pytest.raises(ConfigError, match="unsupported BERT variant"):
        ox.read_config(tmp_path)


# ---------------------------------------------------------------------- cache
def _files(cache: pathlib.Path) -> dict[str, pathlib.Path]:
    p = ec.cache_paths(default_model_path(), cache)
    return {k: p[k] for k in ("onnx", "weights", "json")}


def test_cache_dir_follows_moedb_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEDB_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MOEDB_CACHE")
    assert cache_dir() == pathlib.Path.home() / ".cache" / "moedb"


def test_fingerprint_is_the_sha256_of_weights_then_config(tmp_path):
    """Files record this digest for tuned models: it must never change for the same folder."""
    import hashlib

    src = pathlib.Path(default_model_path())
    want = hashlib.sha256((src / "model.safetensors").read_bytes() + (src / "config.json").read_bytes())
    assert model_fingerprint(src) == want.hexdigest()
    assert model_fingerprint(src, tmp_path) == want.hexdigest()           # computed, then stamped
    assert model_fingerprint(src, tmp_path) == want.hexdigest()           # read from the stamp
    assert len(list((tmp_path / "onnx").glob("stamp-*"))) == 1
    with pytest.raises(ConfigError, match="not found"):
        model_fingerprint(tmp_path)


def test_cache_is_reused_not_re_exported(tmp_path):
    probe = ["rotate the signing keys"]
    first = OnnxMiniLMEmbedder(cache=str(tmp_path))
    before = ox.EXPORTS
    v1 = first.embed(probe)
    assert ox.EXPORTS == before + 1
    files = _files(tmp_path)
    assert all(p.exists() for p in files.values()) and first.model_file_ == files["onnx"]
    mtimes = {k: p.stat().st_mtime_ns for k, p in files.items()}
    v2 = OnnxMiniLMEmbedder(cache=str(tmp_path)).embed(probe)
    assert ox.EXPORTS == before + 1                       # same process: no second export
    code = ("import moedb.embed.onnx_export as ox, moedb.embed as me; "
            "me.OnnxMiniLMEmbedder(cache=%r).embed(['x']); print(ox.EXPORTS)" % str(tmp_path))
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"                      # another process: no export either
    assert {k: p.stat().st_mtime_ns for k, p in files.items()} == mtimes
    np.testing.assert_array_equal(v1, v2)


@pytest.mark.parametrize("damage", ["flip-weight-byte", "truncate-graph", "garbage-sidecar", "missing-weights"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, damage):
    probe = ["How do I rotate JWT signing keys?", "knead the dough"]
    ref = OnnxMiniLMEmbedder(cache=str(tmp_path)).embed(probe)
    files = _files(tmp_path)
    if damage == "flip-weight-byte":
        with open(files["weights"], "r+b") as f:       # same size, one byte of a weight changed
            f.seek(files["weights"].stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x40]))
    elif damage == "truncate-graph":
        files["onnx"].write_bytes(files["onnx"].read_bytes()[:1000])
    elif damage == "garbage-sidecar":
        files["json"].write_text("{not json")
    else:
        files["weights"].unlink()
    before = ox.EXPORTS
    v = OnnxMiniLMEmbedder(cache=str(tmp_path)).embed(probe)
    assert ox.EXPORTS == before + 1
    np.testing.assert_array_equal(v, ref)
    meta = json.loads(files["json"].read_text())
    assert meta["weights"][0] == files["weights"].stat().st_size
    assert not [p for p in (tmp_path / "onnx").iterdir() if p.name.endswith(".tmp")]


def test_two_processes_exporting_at_once(tmp_path):
    code = ("import moedb.embed.onnx_export as ox, moedb.embed as me; "
            "v = me.OnnxMiniLMEmbedder(cache=%r).embed(['a b c']); print(ox.EXPORTS, float(v[0, :4].sum()))"
            % str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    exports, sums = zip(*[o[0].split() for o in outs])
    assert sorted(exports) == ["0", "1"]                  # the lock made the second one wait and reuse
    assert sums[0] == sums[1]
    assert not [p for p in (tmp_path / "onnx").iterdir() if p.name.endswith(".tmp")]


def test_a_different_model_gets_a_different_cache_key(tmp_path):
    src = pathlib.Path(default_model_path())
    other = tmp_path / "other-model"
    other.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "sentence_bert_config.json"):
        (other / name).symlink_to(src / name)
    cfg = json.loads((src / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "layer_norm_eps": 1e-6}))
    a = ec.cache_paths(src, tmp_path / "cache")
    b = ec.cache_paths(other, tmp_path / "cache")
    assert a["digest"] != b["digest"] and a["onnx"] != b["onnx"]
    assert model_fingerprint(src, tmp_path / "cache") == a["digest"]   # stamped digest is stable


def test_unwritable_cache_builds_in_memory(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    before = ox.EXPORTS
    emb = OnnxMiniLMEmbedder(cache=str(blocker / "cache"))
    v = emb.embed(["knead the dough"])
    assert emb.model_file_ is None and ox.EXPORTS == before + 1
    assert "not writable" in capsys.readouterr().err
    assert v.shape == (1, 384)


def test_other_model_folders(tmp_path):
    src = pathlib.Path(default_model_path())
    other = tmp_path / "cls-model"
    (other / "1_Pooling").mkdir(parents=True)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "modules.json"):
        (other / name).symlink_to(src / name)
    pool = json.loads((src / "1_Pooling" / "config.json").read_text())
    (other / "1_Pooling" / "config.json").write_text(
        json.dumps({**pool, "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}))
    emb = OnnxMiniLMEmbedder(model_path=str(other), cache=str(tmp_path / "cache"))
    assert (emb.name, emb.dim, emb.kind) == ("cls-model", 384, "onnx")   # not recorded as the bundled model
    with pytest.raises(ConfigError, match="only mean pooling"):
        emb.embed(["hello"])
    assert rs.fast_folder(str(other)) is None            # resolve() leaves it to sentence-transformers


# ---------------------------------------------------------------------- selection
def test_default_fast_embedder_and_the_override(monkeypatch):
    monkeypatch.delenv("MOEDB_EMBEDDER", raising=False)
    assert isinstance(rs.default_fast_embedder(), OnnxMiniLMEmbedder)
    assert resolve(None).kind == "onnx-minilm"
    monkeypatch.setenv("MOEDB_EMBEDDER", "sentence-transformers")
    assert rs.default_fast_embedder() is None
    if HAS_ST:
        assert isinstance(resolve(None), SentenceTransformerEmbedder)
    monkeypatch.setenv("MOEDB_EMBEDDER", "tensorflow")
    with pytest.raises(ConfigError, match="MOEDB_EMBEDDER"):
        rs.default_fast_embedder()


def test_missing_runtime_falls_back(monkeypatch):
    """onnxruntime cannot be uninstalled for a test: its absence is simulated at the find_spec lookup."""
    real = importlib.util.find_spec
    monkeypatch.delenv("MOEDB_EMBEDDER", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    assert rs.default_fast_embedder() is None
    monkeypatch.setenv("MOEDB_EMBEDDER", "onnx")
    with pytest.raises(ConfigError, match="onnxruntime"):
        rs.default_fast_embedder()


def test_default_embedder_imports_no_torch(tmp_path):
    """``import moedb`` and the default embedder (export, then a warm run) never import torch,
    transformers or sentence-transformers; the warm run does not import onnx either."""
    code = ("import sys, moedb.embed; v = moedb.embed.resolve(None).embed(['x']); assert v.shape == (1, 384); "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    env = {"MOEDB_CACHE": str(tmp_path), "MOEDB_EMBEDDER": ""}
    for run in ("cold", "warm"):
        out = _run(code, env)
        assert out.returncode == 0, out.stderr
        loaded = set(out.stdout.split())
        assert {"onnxruntime", "tokenizers"} <= loaded
        assert not loaded & set(HEAVY), f"{run} run imported {sorted(loaded & set(HEAVY))}"
        assert ("onnx" in loaded) == (run == "cold"), run


WITHOUT_ST = """
import sys
sys.modules["sentence_transformers"] = None   # simulates a missing extra: the import raises ImportError
import moedb.embed as me
from moedb.errors import ConfigError


def message(make):
    try:
        make()
    except ConfigError as e:
        return str(e)
    raise AssertionError("no ConfigError")
"""


def test_missing_tune_extra_is_a_config_error_naming_it(tmp_path):
    """Without sentence-transformers the default embedder still works, and whatever needs
    sentence-transformers raises ConfigError naming the ``tune`` extra."""
    env = {"MOEDB_CACHE": str(tmp_path / "cache"), "MOEDB_EMBEDDER": ""}
    code = WITHOUT_ST + f"""
assert me.resolve(None).embed(["x"]).shape == (1, 384)
print(message(lambda: me.SentenceTransformerEmbedder()))
print(message(lambda: me.resolve("some-hub-model")))
print(message(lambda: me.resolve({str(tmp_path)!r})))     # a folder that is not a BERT model
"""
    out = _run(code, env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all('pip install "moedb[tune]"' in ln for ln in lines), lines
    out = _run(WITHOUT_ST + "print(message(lambda: me.resolve(None)))",
               {**env, "MOEDB_EMBEDDER": "sentence-transformers"})
    assert out.returncode == 0, out.stderr
    assert 'pip install "moedb[tune]"' in out.stdout


@needs_st
def test_sentence_transformers_embedder_leaves_the_environment_alone(st_emb):
    before = dict(os.environ)
    emb = SentenceTransformerEmbedder()
    assert (emb.name, emb.dim, emb.model) == ("all-MiniLM-L6-v2", 384, None)
    assert emb.embed(["hello"]).shape == (1, 384)
    assert dict(os.environ) == before


# ---------------------------------------------------------------------- files built either way
EXPERTS = {
    "security": ["JWT tokens expire after one hour; rotate signing keys every month.",
                 "Use OAuth scopes to limit what a token can access.", "Passwords are hashed with argon2."],
    "cooking": ["Simmer the tomato sauce for twenty minutes.", "Knead the dough until it is smooth.",
                "Season the soup with salt and pepper."],
    "travel": ["The train from Paris to Lyon takes two hours.", "Book flights early for lower fares.",
               "Pack light for a weekend trip."],
}
QUERIES = ["how do I rotate keys", "what temperature for bread", "cheap flights to Lyon", "argon2 or bcrypt?",
           "soup recipe", "weekend in Paris"]


def _routes(db) -> list[tuple[list[str], list[float]]]:
    out = []
    for q in QUERIES:
        r = db.route(q, top_k=3, min_confidence=0.0)
        out.append(([e.name for e in r.experts], [e.score for e in r.experts]))
    return out


@pytest.mark.parametrize("builder", ["sentence-transformers", "onnx"])
def test_files_open_with_either_runtime_and_route_identically(tmp_path, embedder, st_emb, builder):
    """Build with one runtime, copy the file, route on each copy with one runtime: same decisions.

    Routing from two copies keeps any state that routing itself updates (load balancing, logs) equal.
    """
    import shutil

    path, copy = str(tmp_path / "x.db"), str(tmp_path / "copy.db")
    with moedb.connect(path, embedder=st_emb if builder == "sentence-transformers" else embedder) as db:
        for name, docs in EXPERTS.items():
            db.add_expert(name, docs)
    shutil.copyfile(path, copy)
    with moedb.connect(path, embedder=st_emb) as db:
        expected = _routes(db)
    with moedb.connect(copy) as db:                       # no embedder: the file's record -> ONNX runtime
        assert db.embedder.kind == "onnx-minilm"
        got = _routes(db)
    for (names_a, scores_a), (names_b, scores_b) in zip(expected, got):
        assert names_a == names_b
        np.testing.assert_allclose(scores_a, scores_b, atol=1e-3)
