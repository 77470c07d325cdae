"""Export a sentence-transformers BERT folder to ONNX, without torch.

The weights are read from ``model.safetensors`` with ``safetensors`` and the graph (BERT encoder +
attention-masked mean pooling, dynamic batch and sequence axes) is built with ``onnx.helper``. The
result computes what sentence-transformers computes before normalising: vectors agree within 1e-6 cosine.

This module imports ``onnx``, which the warm embedding path does not need: import it only to export.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from ..errors import ConfigError

OPSET = 17               # LayerNormalization is an ONNX op from opset 17
IR_VERSION = 8
EXTERNAL_MIN_BYTES = 1024  # tensors this large go to the external weights file
EXPORTS = 0              # how many exports this process has built (tests check cache reuse)


# ---------------------------------------------------------------------- reading the folder
def load_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{name: array}`` of a ``.safetensors`` file, floating tensors as float32."""
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(path))
    except Exception as e:  # a missing file, or a dtype NumPy lacks (bfloat16)
        raise ConfigError(f"ONNX embedder: cannot read the weights {path}: {e}") from None
    return {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in raw.items()}


def read_config(model_dir: Path) -> dict[str, Any]:
    """The folder's ``config.json``; a :class:`ConfigError` unless it describes a BERT model."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"ONNX embedder: cannot read {model_dir / 'config.json'}: {e}") from None
    if config.get("model_type", "bert") != "bert":
        raise ConfigError(f"ONNX embedder: {model_dir} is a {config.get('model_type')!r} model, not BERT")
    act, pos = config.get("hidden_act", "gelu"), config.get("position_embedding_type", "absolute")
    if pos != "absolute" or act not in ("gelu", "gelu_python"):
        raise ConfigError(f"ONNX builder: unsupported BERT variant ({act}, {pos})")
    return config


# ---------------------------------------------------------------------- graph building
class _Graph:
    """Collects ``onnx.helper`` nodes and NumPy initializers, naming every intermediate output."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, a: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    def op(self, op_type: str, *inputs: str, out: Optional[str] = None, **attrs: Any) -> str:
        n = len(self.nodes) + 1
        out = out or f"{op_type.lower()}_{n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"n{n}_{op_type}", **attrs))
        return out


def _f32(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _i64(*v: int) -> np.ndarray:
    return np.asarray(v, dtype=np.int64)


def _embeddings(g: _Graph, w: dict[str, np.ndarray], eps: float) -> str:
    """word[input_ids] + (position + token type 0)[:sequence] -> LayerNorm: ``(batch, sequence, hidden)``."""
    word = g.const("word_emb", _f32(w["embeddings.word_embeddings.weight"]))
    pos_type = g.const("pos_type_emb", _f32(w["embeddings.position_embeddings.weight"]
                                            + w["embeddings.token_type_embeddings.weight"][0]))
    seq = g.op("Shape", "input_ids", start=1, end=2)
    pos = g.op("Slice", pos_type, g.const("zero_1d", _i64(0)), seq, g.const("axis0_1d", _i64(0)))
    x = g.op("Add", g.op("Gather", word, "input_ids", axis=0), pos)
    return g.op("LayerNormalization", x, g.const("emb_ln_w", _f32(w["embeddings.LayerNorm.weight"])),
                g.const("emb_ln_b", _f32(w["embeddings.LayerNorm.bias"])), axis=-1, epsilon=eps)


def _dense(g: _Graph, w: dict[str, np.ndarray], inp: str, prefix: str) -> str:
    """``inp @ W.T + b`` for the torch Linear ``prefix`` (weight ``(out, in)``)."""
    wt = g.const(f"{prefix}.wT", _f32(w[f"{prefix}.weight"]).T.copy())  # (in, out)
    return g.op("Add", g.op("MatMul", inp, wt), g.const(f"{prefix}.b", _f32(w[f"{prefix}.bias"])))


def _layer_norm(g: _Graph, w: dict[str, np.ndarray], inp: str, prefix: str, eps: float) -> str:
    return g.op("LayerNormalization", inp, g.const(f"{prefix}.w", _f32(w[f"{prefix}.weight"])),
                g.const(f"{prefix}.b", _f32(w[f"{prefix}.bias"])), axis=-1, epsilon=eps)


def _attention(g: _Graph, w: dict[str, np.ndarray], x: str, p: str, consts: dict[str, str]) -> str:
    """Multi-head self-attention of layer ``p`` (before the output dense): ``(batch, sequence, hidden)``."""
    def heads(name: str, perm: list[int]) -> str:
        return g.op("Transpose", g.op("Reshape", _dense(g, w, x, f"{p}.attention.self.{name}"),
                                      consts["split"]), perm=perm)

    q, k, v = heads("query", [0, 2, 1, 3]), heads("key", [0, 2, 3, 1]), heads("value", [0, 2, 1, 3])
    scores = g.op("Add", g.op("Mul", g.op("MatMul", q, k), consts["scale"]), consts["mask"])  # (b, h, s, s)
    ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)                                # (b, h, s, d)
    return g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), consts["merge"])       # (b, s, hidden)


def _layer(g: _Graph, w: dict[str, np.ndarray], x: str, i: int, consts: dict[str, str], eps: float) -> str:
    """Encoder layer ``i``: attention + residual + LayerNorm, exact-GELU MLP + residual + LayerNorm."""
    p = f"encoder.layer.{i}"
    ctx = _attention(g, w, x, p, consts)
    x = _layer_norm(g, w, g.op("Add", _dense(g, w, ctx, f"{p}.attention.output.dense"), x),
                    f"{p}.attention.output.LayerNorm", eps)
    h = _dense(g, w, x, f"{p}.intermediate.dense")
    erf = g.op("Erf", g.op("Div", h, consts["sqrt2"]))
    h = g.op("Mul", g.op("Mul", h, g.op("Add", erf, consts["one"])), consts["half"])  # exact GELU
    return _layer_norm(g, w, g.op("Add", _dense(g, w, h, f"{p}.output.dense"), x), f"{p}.output.LayerNorm", eps)


def _shared_constants(g: _Graph, hidden: int, heads: int, maskf: str) -> dict[str, str]:
    """Constants every layer uses, and the additive attention mask ``(batch, 1, 1, sequence)``:
    0 where attended, -1e9 on padding."""
    head_dim = hidden // heads
    one = g.const("one", _f32(1.0))
    neg = g.op("Mul", g.op("Sub", one, maskf), g.const("neg_big", _f32(-1e9)))
    return {"one": one, "mask": g.op("Unsqueeze", neg, g.const("axes_1_2", _i64(1, 2))),
            "split": g.const("split_heads", _i64(0, 0, heads, head_dim)),
            "merge": g.const("merge_heads", _i64(0, 0, hidden)),
            "scale": g.const("attn_scale", _f32(1.0 / np.sqrt(head_dim))),
            "half": g.const("half", _f32(0.5)), "sqrt2": g.const("sqrt2", _f32(np.sqrt(2.0)))}


def _mean_pool(g: _Graph, x: str, maskf: str) -> str:
    """Mean of ``x`` ``(batch, sequence, hidden)`` over the attention mask -> ``sentence_embedding``
    ``(batch, hidden)``."""
    m3 = g.op("Unsqueeze", maskf, g.const("axes_2", _i64(2)))                            # (b, s, 1)
    axis1 = g.const("axes_1", _i64(1))
    total = g.op("ReduceSum", g.op("Mul", x, m3), axis1, keepdims=0)                    # (b, hidden)
    count = g.op("Max", g.op("ReduceSum", m3, axis1, keepdims=0), g.const("tiny", _f32(1e-9)))
    return g.op("Div", total, count, out="sentence_embedding")


def build_bert_onnx(weights: dict[str, np.ndarray], config: dict[str, Any],
                    props: Optional[dict[str, str]] = None) -> onnx.ModelProto:
    """A BERT encoder with mean pooling as an ONNX model (every tensor inline).

    Inputs ``input_ids`` and ``attention_mask``: int64 ``(batch, sequence)``. Output
    ``sentence_embedding``: float32 ``(batch, hidden)``, the attention-masked mean of the last hidden
    state (not normalised). Token types are all 0 (single sentences), as sentence-transformers uses.
    ``props``: metadata stored in the model.
    """
    w = {k.removeprefix("bert."): v for k, v in weights.items()}
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    g = _Graph()
    x = _embeddings(g, w, eps)
    maskf = g.op("Cast", "attention_mask", to=TensorProto.FLOAT)
    consts = _shared_constants(g, hidden, heads, maskf)
    for i in range(int(config["num_hidden_layers"])):
        x = _layer(g, w, x, i, consts, eps)
    _mean_pool(g, x, maskf)
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
              for n in ("input_ids", "attention_mask")]
    outputs = [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden])]
    graph = helper.make_graph(g.nodes, "minilm", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="moedb")
    helper.set_model_props(model, {"moedb.pooling": "mean", **(props or {})})
    return model


# ---------------------------------------------------------------------- export
def export_model(model_dir: str | os.PathLike, props: Optional[dict[str, str]] = None) -> onnx.ModelProto:
    """The ONNX export of a sentence-transformers BERT folder, every tensor inline (no cache)."""
    global EXPORTS
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    model = build_bert_onnx(load_weights(model_dir / "model.safetensors"), config, props)
    EXPORTS += 1
    return model


def _aligned(offset: int, nbytes: int) -> int:
    """``offset`` rounded up so a tensor can be memory-mapped: 64 KiB for 1 MiB and more, else 64 bytes."""
    align = 65536 if nbytes >= 1 << 20 else 64
    return offset + (-offset) % align


def place_external(model: onnx.ModelProto, location: str) -> None:
    """Mark every initializer of ``EXTERNAL_MIN_BYTES`` or more as stored in the file ``location``, at
    aligned offsets (onnxruntime maps them instead of copying);
    :func:`onnx.save_model` then writes that file beside the model."""
    offset = 0
    for t in model.graph.initializer:
        n = len(t.raw_data)
        if n < EXTERNAL_MIN_BYTES:
            continue
        offset = _aligned(offset, n)
        set_external_data(t, location, offset, n)
        offset += n


def save_export(model_dir: str | os.PathLike, path: str | os.PathLike, weights_name: str,
                props: Optional[dict[str, str]] = None) -> None:
    """Export ``model_dir`` to ``path``, its large tensors to the file ``weights_name`` beside it.

    Both files must not exist yet (onnx appends to an existing weights file).
    """
    model = export_model(model_dir, props)
    place_external(model, weights_name)
    onnx.save_model(model, str(path))
