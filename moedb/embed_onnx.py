"""The fast default embedder: all-MiniLM-L6-v2 run by onnxruntime + tokenizers.

Importing sentence-transformers (torch, transformers) costs seconds, which a shell command such as
``moedb route`` pays on every call. This module runs the same bundled model without them:

- On first use the model's ``model.safetensors`` is turned into an ONNX graph by a small builder
  written here (BERT encoder + attention-masked mean pooling; dynamic batch and sequence axes).
  It needs only NumPy: the ONNX protobuf is encoded directly, so neither torch nor the ``onnx``
  package is needed at run time.
- The graph is cached under ``$MOEDB_CACHE`` (default ``~/.cache/moedb``) in ``onnx/``, keyed by a
  SHA-256 of the model's weights and config, so a different model never reuses it. Writes are atomic
  (temporary file + rename) and serialised by a lock file, so two processes exporting at once are safe.
  The large tensors live in a `.weights` file beside the graph, which onnxruntime memory-maps.
  A sidecar records the export's size and CRC-32; a file that fails the check is rebuilt.
- Texts are tokenised with the model's own ``tokenizer.json`` (truncated to the sentence-transformers
  ``max_seq_length``, 256 word pieces here), batched by length with padding, embedded, mean-pooled
  over the attention mask and L2-normalised: vectors agree with sentence-transformers' within 1e-6
  cosine in practice (tests require 1e-3).

``default_fast_embedder()`` is what :func:`moedb.embed.resolve` uses for ``embedder=None``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import sys
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .embed import DEFAULT_DIM, DEFAULT_MODEL, check_texts, default_model_path
from .errors import ConfigError

BUILDER_VERSION = 1      # bump when the graph changes: old cache files are then ignored
OPSET = 17               # LayerNormalization is an ONNX op from opset 17
IR_VERSION = 8
EXPORTS = 0              # how many exports this process has built (tests check cache reuse)

# ====================================================================== protobuf encoding
# Just enough of the protobuf wire format to write an ONNX ModelProto (field numbers from onnx.proto).


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # negative int64 -> two's complement, 10 bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _int(field: int, v: int) -> bytes:
    return _varint(field << 3) + _varint(int(v))


def _len(field: int, payload: bytes | str) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _f32(field: int, v: float) -> bytes:
    return _varint((field << 3) | 5) + struct.pack("<f", float(v))


_ONNX_DTYPE = {np.dtype("float32"): 1, np.dtype("int64"): 7}


def _raw(a: np.ndarray) -> bytes:
    if a.dtype not in _ONNX_DTYPE:
        raise TypeError(f"unsupported tensor dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()


def _tensor(name: str, a: np.ndarray, external: Optional[tuple[str, int, int]] = None) -> bytes:
    """TensorProto: raw little-endian data inline, or ``external=(file, offset, length)``."""
    if a.dtype not in _ONNX_DTYPE:
        raise TypeError(f"unsupported tensor dtype {a.dtype}")
    head = b"".join(_int(1, d) for d in a.shape) + _int(2, _ONNX_DTYPE[a.dtype]) + _len(8, name)
    if external is None:
        return head + _len(9, _raw(a))
    loc, off, n = external
    entries = (("location", loc), ("offset", str(off)), ("length", str(n)))
    return head + b"".join(_len(13, _len(1, k) + _len(2, v)) for k, v in entries) + _int(14, 1)


def _attribute(name: str, v: Any) -> bytes:
    if isinstance(v, bool) or isinstance(v, (int, np.integer)):
        return _len(1, name) + _int(3, int(v)) + _int(20, 2)                       # INT
    if isinstance(v, float):
        return _len(1, name) + _f32(2, v) + _int(20, 1)                            # FLOAT
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, np.integer)) for x in v):
        return _len(1, name) + b"".join(_int(8, int(x)) for x in v) + _int(20, 7)  # INTS
    raise TypeError(f"unsupported attribute {name}={v!r}")


def _value_info(name: str, elem_type: int, dims: list[int | str]) -> bytes:
    shape = b"".join(_len(1, _int(1, d) if isinstance(d, int) else _len(2, d)) for d in dims)
    tensor_type = _int(1, elem_type) + _len(2, shape)
    return _len(1, name) + _len(2, _len(1, tensor_type))


class _Graph:
    """Collects ONNX nodes and initializers; :meth:`model` returns the serialised ModelProto."""

    def __init__(self) -> None:
        self.nodes: list[bytes] = []
        self.inits: list[tuple[str, np.ndarray]] = []
        self._n = 0

    def const(self, name: str, a: np.ndarray) -> str:
        self.inits.append((name, np.ascontiguousarray(a)))
        return name

    def op(self, op_type: str, *inputs: str, out: Optional[str] = None, **attrs: Any) -> str:
        self._n += 1
        out = out or f"{op_type.lower()}_{self._n}"
        node = (b"".join(_len(1, i) for i in inputs) + _len(2, out) + _len(3, f"n{self._n}_{op_type}")
                + _len(4, op_type) + b"".join(_len(5, _attribute(k, v)) for k, v in attrs.items()))
        self.nodes.append(node)
        return out

    def model(self, inputs: list[bytes], outputs: list[bytes], meta: dict[str, str],
              weights_file: Optional[str] = None) -> tuple[bytes, bytes]:
        """``(model_bytes, weights_bytes)``. With ``weights_file`` every tensor of 1 KiB or more goes to
        that file (``weights_bytes``, offsets aligned for mmap), which onnxruntime maps instead of
        parsing and copying: session creation is about twice as fast. Without it ``weights_bytes`` is empty.
        """
        inits, chunks, off = [], [], 0
        for name, a in self.inits:
            if weights_file is None or a.nbytes < 1024:
                inits.append(_tensor(name, a))
                continue
            pad = (-off) % (65536 if a.nbytes >= 1 << 20 else 64)
            raw = _raw(a)
            chunks += [b"\0" * pad, raw]
            inits.append(_tensor(name, a, (weights_file, off + pad, len(raw))))
            off += pad + len(raw)
        graph = (b"".join(_len(1, n) for n in self.nodes) + _len(2, "minilm")
                 + b"".join(_len(5, t) for t in inits)
                 + b"".join(_len(11, i) for i in inputs) + b"".join(_len(12, o) for o in outputs))
        props = b"".join(_len(14, _len(1, k) + _len(2, v)) for k, v in meta.items())
        model = (_int(1, IR_VERSION) + _len(2, "moedb") + _len(3, str(BUILDER_VERSION))
                 + _len(7, graph) + _len(8, _len(1, "") + _int(2, OPSET)) + props)
        return model, b"".join(chunks)


# ====================================================================== the BERT graph
def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file into ``{name: array}`` (float32 / int64 tensors only)."""
    dtypes = {"F32": "<f4", "I64": "<i8", "F16": "<f2", "BF16": None}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        body = f.read()
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dt = dtypes.get(spec["dtype"])
        if dt is None:
            raise ConfigError(f"{path}: tensor {name!r} has unsupported dtype {spec['dtype']}")
        s, e = spec["data_offsets"]
        a = np.frombuffer(body, dtype=dt, count=(e - s) // np.dtype(dt).itemsize, offset=s)
        out[name] = a.reshape(spec["shape"]).astype(np.float32 if dt != "<i8" else np.int64)
    return out


def build_bert_onnx(weights: dict[str, np.ndarray], config: dict[str, Any],
                    weights_file: Optional[str] = None) -> tuple[bytes, bytes]:
    """Serialise a BERT encoder with mean pooling as an ONNX model: ``(model_bytes, weights_bytes)``.

    Inputs ``input_ids`` and ``attention_mask``: int64 ``(batch, sequence)``. Output
    ``sentence_embedding``: float32 ``(batch, hidden)``, the attention-masked mean of the last hidden
    state (not normalised). Token types are all 0 (single sentences), as sentence-transformers uses.
    ``weights_file``: store the large tensors in that file, next to the model (see :meth:`_Graph.model`).
    """
    w = {k.removeprefix("bert."): v for k, v in weights.items()}
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim, eps = hidden // heads, float(config.get("layer_norm_eps", 1e-12))
    act = config.get("hidden_act", "gelu")
    if config.get("position_embedding_type", "absolute") != "absolute" or act not in ("gelu", "gelu_python"):
        raise ConfigError(f"ONNX builder: unsupported BERT variant ({act}, {config.get('position_embedding_type')})")
    g = _Graph()
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    i64 = lambda *v: np.asarray(v, dtype=np.int64)  # noqa: E731

    # embeddings: word[ids] + (position + token type 0)[:seq] -> LayerNorm
    word = g.const("word_emb", f32(w["embeddings.word_embeddings.weight"]))
    pos_type = g.const("pos_type_emb", f32(w["embeddings.position_embeddings.weight"]
                                           + w["embeddings.token_type_embeddings.weight"][0]))
    seq = g.op("Shape", "input_ids", start=1, end=2)
    pos = g.op("Slice", pos_type, g.const("zero_1d", i64(0)), seq, g.const("axis0_1d", i64(0)))
    x = g.op("Add", g.op("Gather", word, "input_ids", axis=0), pos)
    x = g.op("LayerNormalization", x, g.const("emb_ln_w", f32(w["embeddings.LayerNorm.weight"])),
             g.const("emb_ln_b", f32(w["embeddings.LayerNorm.bias"])), axis=-1, epsilon=eps)

    # additive attention mask (batch, 1, 1, seq): 0 where attended, -1e9 on padding
    maskf = g.op("Cast", "attention_mask", to=1)
    neg = g.op("Mul", g.op("Sub", g.const("one", f32(1.0)), maskf), g.const("neg_big", f32(-1e9)))
    add_mask = g.op("Unsqueeze", neg, g.const("axes_1_2", i64(1, 2)))
    split_heads = g.const("split_heads", i64(0, 0, heads, head_dim))
    merge_heads = g.const("merge_heads", i64(0, 0, hidden))
    scale = g.const("attn_scale", f32(1.0 / np.sqrt(head_dim)))
    half, one = g.const("half", f32(0.5)), "one"
    sqrt2 = g.const("sqrt2", f32(np.sqrt(2.0)))

    def dense(inp: str, prefix: str) -> str:
        wt = g.const(f"{prefix}.wT", f32(w[f"{prefix}.weight"]).T.copy())  # (in, out)
        return g.op("Add", g.op("MatMul", inp, wt), g.const(f"{prefix}.b", f32(w[f"{prefix}.bias"])))

    def layer_norm(inp: str, prefix: str) -> str:
        return g.op("LayerNormalization", inp, g.const(f"{prefix}.w", f32(w[f"{prefix}.weight"])),
                    g.const(f"{prefix}.b", f32(w[f"{prefix}.bias"])), axis=-1, epsilon=eps)

    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}"
        q = g.op("Transpose", g.op("Reshape", dense(x, f"{p}.attention.self.query"), split_heads), perm=[0, 2, 1, 3])
        k = g.op("Transpose", g.op("Reshape", dense(x, f"{p}.attention.self.key"), split_heads), perm=[0, 2, 3, 1])
        v = g.op("Transpose", g.op("Reshape", dense(x, f"{p}.attention.self.value"), split_heads), perm=[0, 2, 1, 3])
        scores = g.op("Add", g.op("Mul", g.op("MatMul", q, k), scale), add_mask)       # (b, h, s, s)
        ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)                        # (b, h, s, d)
        ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), merge_heads)    # (b, s, hidden)
        x = layer_norm(g.op("Add", dense(ctx, f"{p}.attention.output.dense"), x), f"{p}.attention.output.LayerNorm")
        h = dense(x, f"{p}.intermediate.dense")
        h = g.op("Mul", g.op("Mul", h, g.op("Add", g.op("Erf", g.op("Div", h, sqrt2)), one)), half)  # exact GELU
        x = layer_norm(g.op("Add", dense(h, f"{p}.output.dense"), x), f"{p}.output.LayerNorm")

    # mean pooling over the attention mask
    m3 = g.op("Unsqueeze", maskf, g.const("axes_2", i64(2)))                             # (b, s, 1)
    axis1 = g.const("axes_1", i64(1))
    total = g.op("ReduceSum", g.op("Mul", x, m3), axis1, keepdims=0)                     # (b, hidden)
    count = g.op("Max", g.op("ReduceSum", m3, axis1, keepdims=0), g.const("tiny", f32(1e-9)))
    g.op("Div", total, count, out="sentence_embedding")

    inputs = [_value_info("input_ids", 7, ["batch", "sequence"]),
              _value_info("attention_mask", 7, ["batch", "sequence"])]
    outputs = [_value_info("sentence_embedding", 1, ["batch", hidden])]
    return g.model(inputs, outputs, {"moedb.builder": str(BUILDER_VERSION), "moedb.pooling": "mean"}, weights_file)


# ====================================================================== cache
def cache_dir() -> Path:
    """``$MOEDB_CACHE`` or ``~/.cache/moedb``."""
    env = os.environ.get("MOEDB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moedb"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache holds no secrets
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class _FileLock:
    """An exclusive lock on ``path`` (POSIX ``flock``; a no-op where unavailable)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: Optional[int] = None

    def __enter__(self) -> "_FileLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


_FINGERPRINT_FILES = ("model.safetensors", "config.json")


def model_fingerprint(model_dir: str | os.PathLike, cache: Optional[Path] = None) -> str:
    """SHA-256 (hex) of the model's weights and config.

    Hashing 90 MB on every cold start would cost ~0.2 s, so the digest is remembered in the cache
    under a stamp keyed by each file's path, size, inode and mtime: any change to the files gives a new
    stamp and a fresh hash.
    """
    model_dir = Path(model_dir)
    stat_key = []
    for name in _FINGERPRINT_FILES:
        p = model_dir / name
        try:
            st = p.stat()
        except OSError:
            raise ConfigError(f"ONNX embedder: {p} not found (expected a sentence-transformers BERT folder)") from None
        stat_key.append(f"{p.resolve()}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}")
    stamp = None
    if cache is not None:
        stamp = cache / "onnx" / ("stamp-" + hashlib.sha1("\n".join(stat_key).encode()).hexdigest()[:20])
        try:
            digest = stamp.read_text().strip()
            if len(digest) == 64:
                return digest
        except OSError:
            pass
    h = hashlib.sha256()
    for name in _FINGERPRINT_FILES:
        with open(model_dir / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    if stamp is not None:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(stamp, digest.encode())
        except OSError:
            pass
    return digest


def _crc_file(path: Path) -> Optional[tuple[int, int]]:
    """``(size, crc32)`` of a file, read through mmap (no copy); None when it cannot be read."""
    import mmap

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return 0, zlib.crc32(b"")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return size, zlib.crc32(mm)
    except (OSError, ValueError):
        return None


def _valid(files: dict[str, Path], meta_path: Path) -> bool:
    """True when every file's size and CRC-32 match the sidecar written after the export."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("builder") != BUILDER_VERSION:
        return False
    for key, path in files.items():
        got = _crc_file(path)
        if got is None or [got[0], got[1]] != meta.get(key):
            return False
    return True


def export_model(model_dir: str | os.PathLike, weights_file: Optional[str] = None) -> tuple[bytes, bytes]:
    """Build the ONNX export of a sentence-transformers BERT folder (no cache): see :func:`build_bert_onnx`."""
    global EXPORTS
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"ONNX embedder: cannot read {model_dir / 'config.json'}: {e}") from None
    if config.get("model_type", "bert") != "bert":
        raise ConfigError(f"ONNX embedder: {model_dir} is a {config.get('model_type')!r} model, not BERT")
    out = build_bert_onnx(read_safetensors(model_dir / "model.safetensors"), config, weights_file)
    EXPORTS += 1
    return out


def cache_paths(model_dir: str | os.PathLike, cache: Optional[Path] = None) -> dict[str, Any]:
    """Where the export of ``model_dir`` lives: paths ``onnx``, ``weights``, ``json`` (sidecar), ``lock``,
    and ``digest`` (the model's SHA-256)."""
    cache = cache_dir() if cache is None else Path(cache)
    digest = model_fingerprint(model_dir, cache)
    base = cache / "onnx" / f"minilm-{digest[:16]}-b{BUILDER_VERSION}"
    return {k: base.with_suffix("." + k) for k in ("onnx", "weights", "json", "lock")} | {"digest": digest}


def cached_model(model_dir: str | os.PathLike, cache: Optional[Path] = None) -> Optional[Path]:
    """Path of the cached ONNX export of ``model_dir`` (weights in a ``.weights`` file beside it).

    A valid cache is used as is; a missing or corrupt one is (re)built under a lock file. Returns None
    when the cache directory is not writable (the caller then builds the export in memory).
    """
    p = cache_paths(model_dir, cache)
    files = {"onnx": p["onnx"], "weights": p["weights"]}
    if _valid(files, p["json"]):
        return p["onnx"]
    try:
        p["onnx"].parent.mkdir(parents=True, exist_ok=True)
        lock = _FileLock(p["lock"]).__enter__()
    except OSError as e:
        print(f"moedb: ONNX cache {p['onnx'].parent} is not writable ({e}); building the export in memory",
              file=sys.stderr)
        return None
    try:
        if _valid(files, p["json"]):  # another process finished the export while we waited
            return p["onnx"]
        model, weights = export_model(model_dir, p["weights"].name)
        _atomic_write(p["weights"], weights)
        _atomic_write(p["onnx"], model)
        meta = {"builder": BUILDER_VERSION, "onnx": [len(model), zlib.crc32(model)],
                "weights": [len(weights), zlib.crc32(weights)], "model_sha256": p["digest"],
                "model_dir": str(model_dir)}
        _atomic_write(p["json"], json.dumps(meta).encode())
        return p["onnx"]
    finally:
        lock.__exit__()

# ====================================================================== the embedder
class OnnxMiniLMEmbedder:
    """all-MiniLM-L6-v2 (or another sentence-transformers BERT folder with mean pooling) on onnxruntime.

    ``model_path``: the sentence-transformers folder (default: the bundled model); ``cache``: the cache
    directory (default :func:`cache_dir`); ``batch_size``: texts per forward pass; ``max_length``: word
    pieces per text, default the folder's ``max_seq_length`` (256); ``threads``: onnxruntime intra-op
    threads (default: onnxruntime's choice). The model is loaded on the first :meth:`embed`.
    """

    kind = "onnx-minilm"

    def __init__(self, model_path: Optional[str] = None, cache: Optional[str] = None, batch_size: int = 32,
                 max_length: Optional[int] = None, threads: Optional[int] = None):
        self.model_path = model_path
        self.cache = cache
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self.threads = threads
        self.name = DEFAULT_MODEL if model_path is None else os.path.basename(str(model_path).rstrip("/"))
        self.dim = DEFAULT_DIM if model_path is None else _hidden_size(Path(model_path))
        if model_path is not None:
            # files record "onnx-minilm" as the bundled model; another folder is a custom embedder
            self.kind = "onnx"
        self.model_file_: Optional[Path] = None
        self._session = None
        self._tokenizer = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._session is None:
                import onnxruntime as ort
                from tokenizers import Tokenizer

                folder = Path(default_model_path() if self.model_path is None else self.model_path)
                _check_pipeline(folder)
                self.model_file_ = cached_model(folder, None if self.cache is None else Path(self.cache))
                source = str(self.model_file_) if self.model_file_ else export_model(folder)[0]
                max_len = self.max_length or _st_max_length(folder)
                tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
                tok.enable_truncation(max_length=max_len)
                tok.no_padding()
                so = ort.SessionOptions()
                so.log_severity_level = 3
                # no busy-waiting worker threads after a run: they steal the core from whatever
                # runs next (a generator, the gate) on small machines
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
                if self.threads:
                    so.intra_op_num_threads = int(self.threads)
                self._session = ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"])
                dim = self._session.get_outputs()[0].shape[-1]
                if isinstance(dim, int):
                    self.dim = dim
                self._tokenizer = tok
            return self._session, self._tokenizer

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` -> float32 ``(n, dim)`` unit rows."""
        texts = check_texts(list(texts))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        session, tok = self._load()
        encs = tok.encode_batch(texts)
        lengths = np.array([len(e.ids) for e in encs])
        order = np.argsort(-lengths, kind="stable")  # similar lengths share a batch: little padding
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            width = int(lengths[idx].max())
            ids = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for r, j in enumerate(idx):
                n = lengths[j]
                ids[r, :n] = encs[j].ids
                mask[r, :n] = 1
            (pooled,) = session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})
            out[idx] = pooled
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)

    def __repr__(self) -> str:
        return f"<OnnxMiniLMEmbedder {self.name!r} dim={self.dim}>"


def _hidden_size(folder: Path) -> int:
    try:
        return int(json.loads((folder / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"ONNX embedder: cannot read hidden_size from {folder / 'config.json'}: {e}") from None


def _check_pipeline(folder: Path) -> None:
    """The folder must be transformer -> mean pooling (-> normalize): what the ONNX graph computes."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return  # a bare transformers folder: sentence-transformers also defaults to mean pooling
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            try:
                cfg = json.loads((folder / m.get("path", "") / "config.json").read_text())
            except (OSError, ValueError):
                continue
            if isinstance(cfg.get("pooling_mode"), str):  # sentence-transformers >= 6 writes one string
                modes = [] if cfg["pooling_mode"] == "mean" else [cfg["pooling_mode"]]
                modes += [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
                modes = modes or ["pooling_mode_mean_tokens"]
            else:
                modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode") and v)
            if modes != ["pooling_mode_mean_tokens"]:
                raise ConfigError(f"ONNX embedder: {folder} pools with {modes}; only mean pooling is supported")
        elif not m.get("type", "").endswith(("Transformer", "Normalize")):
            raise ConfigError(f"ONNX embedder: {folder} has a {m.get('type')} module; not supported")


def _st_max_length(folder: Path) -> int:
    """The sentence-transformers ``max_seq_length`` of the folder (else 512, BERT's limit)."""
    try:
        return int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return 512


def onnx_runtime_chosen() -> bool:
    """Whether models should run on onnxruntime: False when ``MOEDB_EMBEDDER=sentence-transformers`` is
    set or onnxruntime / tokenizers are missing (the caller then uses sentence-transformers, which gives
    the same vectors); ``MOEDB_EMBEDDER=onnx`` makes missing packages an error instead."""
    choice = os.environ.get("MOEDB_EMBEDDER", "").strip().lower()
    if choice in ("sentence-transformers", "sentence_transformers", "st", "torch"):
        return False
    if choice not in ("", "onnx", "auto"):
        raise ConfigError(f"MOEDB_EMBEDDER={choice!r}: expected 'onnx' or 'sentence-transformers'")
    missing = [m for m in ("onnxruntime", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing and choice == "onnx":
        raise ConfigError(f"MOEDB_EMBEDDER=onnx needs the package(s) {', '.join(missing)} (pip install ...)")
    return not missing


def default_fast_embedder() -> Optional[OnnxMiniLMEmbedder]:
    """The ONNX embedder for the bundled model, or None when it cannot or should not be used
    (see :func:`onnx_runtime_chosen`)."""
    return OnnxMiniLMEmbedder() if onnx_runtime_chosen() else None
