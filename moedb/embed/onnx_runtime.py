"""The fast embedder: a sentence-transformers BERT folder (by default the bundled all-MiniLM-L6-v2)
run by onnxruntime + tokenizers, with no torch, transformers or sentence-transformers import.

Importing sentence-transformers costs seconds, which a shell command such as ``moedb route`` pays on
every call. Here the folder's export (see :mod:`.onnx_export`) is loaded from the cache (:mod:`.cache`),
texts are tokenised with the folder's own ``tokenizer.json`` (truncated to the sentence-transformers
``max_seq_length``, 256 word pieces for the bundled model), batched by length with padding, embedded,
mean-pooled over the attention mask and L2-normalised: vectors agree with sentence-transformers' within
1e-6 cosine. ``max_tokens`` and ``count_tokens`` tell how many word pieces a text has before that
truncation (the chunker in :mod:`moedb.ingest.passages` keeps passages within the limit).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import ConfigError, InvalidInput
from .base import DEFAULT_DIM, check_texts, default_model_path, model_name
from .cache import cached_model


# ---------------------------------------------------------------------- the folder
def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def hidden_size(folder: Path) -> int:
    """The vector size of the BERT folder (``hidden_size`` of its ``config.json``)."""
    try:
        return int(_read_json(folder / "config.json")["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"ONNX embedder: cannot read hidden_size from {folder / 'config.json'}: {e}") from None


def _pooling_modes(cfg: dict[str, Any]) -> list[str]:
    """The pooling modes a sentence-transformers ``Pooling`` config turns on."""
    if isinstance(cfg.get("pooling_mode"), str):  # sentence-transformers >= 6 writes one string
        modes = [] if cfg["pooling_mode"] == "mean" else [cfg["pooling_mode"]]
        modes += [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
        return modes or ["pooling_mode_mean_tokens"]
    return sorted(k for k, v in cfg.items() if k.startswith("pooling_mode") and v)


def check_pipeline(folder: Path) -> None:
    """The folder must be transformer -> mean pooling (-> normalize): what the ONNX graph computes.
    Raises :class:`ConfigError` otherwise."""
    try:
        modules = _read_json(folder / "modules.json")
    except (OSError, ValueError):
        return  # a bare transformers folder: sentence-transformers also defaults to mean pooling
    for m in modules:
        kind = m.get("type", "")
        if kind.endswith("Pooling"):
            try:
                cfg = _read_json(folder / m.get("path", "") / "config.json")
            except (OSError, ValueError):
                continue
            modes = _pooling_modes(cfg)
            if modes != ["pooling_mode_mean_tokens"]:
                raise ConfigError(f"ONNX embedder: {folder} pools with {modes}; only mean pooling is supported")
        elif not kind.endswith(("Transformer", "Normalize")):
            raise ConfigError(f"ONNX embedder: {folder} has a {m.get('type')} module; not supported")


def _json_field(path: Path, key: str) -> Any:
    """``key`` of the JSON object in ``path``; None when the file, the key or the JSON is missing."""
    try:
        data = _read_json(path)
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def st_max_length(folder: Path) -> int:
    """Word pieces per text, as sentence-transformers decides: ``max_seq_length`` of
    ``sentence_bert_config.json`` (256 for the bundled model; sentence-transformers >= 6 no longer
    writes it), else the tokenizer's ``model_max_length`` capped by the model's
    ``max_position_embeddings`` (else 512, BERT's limit)."""
    explicit = _json_field(folder / "sentence_bert_config.json", "max_seq_length")
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    limits = [_json_field(folder / "tokenizer_config.json", "model_max_length"),
              _json_field(folder / "config.json", "max_position_embeddings")]
    limits = [int(n) for n in limits if isinstance(n, (int, float)) and n > 0]
    return min(limits, default=512)


def st_lowercases(folder: Path) -> bool:
    """Whether sentence-transformers lowercases texts first (``do_lower_case`` of ``sentence_bert_config.json``)."""
    return _json_field(folder / "sentence_bert_config.json", "do_lower_case") is True


# ---------------------------------------------------------------------- onnxruntime
def _session(source: str | bytes, threads: Optional[int]) -> Any:
    """An onnxruntime CPU session on a model path or serialised model."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # no busy-waiting worker threads after a run: they steal the core from whatever runs next
    # (a generator, the gate) on small machines
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
    return ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"])


def _tokenizer(folder: Path, max_length: int) -> Any:
    """The folder's ``tokenizer.json``, truncating to ``max_length`` word pieces, without padding, and
    lowercasing first when sentence-transformers does (it adds the same normalizer)."""
    from tokenizers import Tokenizer, normalizers

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.no_padding()
    if st_lowercases(folder) and not _has_lowercase(tok.normalizer):
        tok.normalizer = normalizers.Sequence([normalizers.Lowercase()] + ([tok.normalizer] if tok.normalizer else []))
    return tok


def _has_lowercase(normalizer: Any) -> bool:
    from tokenizers import normalizers

    parts = list(normalizer) if isinstance(normalizer, normalizers.Sequence) else [normalizer]
    return any(isinstance(n, normalizers.Lowercase) for n in parts)


def _padded(encs: list[Any], idx: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask``, int64 ``(len(idx), longest)``, of the encodings ``idx``."""
    width = int(lengths[idx].max())
    ids = np.zeros((len(idx), width), dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    for r, j in enumerate(idx):
        n = lengths[j]
        ids[r, :n] = encs[j].ids
        mask[r, :n] = 1
    return ids, mask


class OnnxMiniLMEmbedder:
    """all-MiniLM-L6-v2 (or another sentence-transformers BERT folder with mean pooling) on onnxruntime.

    ``model_path``: the sentence-transformers folder (default: the bundled model); ``cache``: the cache
    directory (default :func:`~moedb.embed.cache_dir`); ``batch_size``: texts per forward pass;
    ``max_length``: word pieces per text, default the folder's ``max_seq_length`` (256); ``threads``:
    onnxruntime intra-op threads (default: onnxruntime's choice). The model is loaded on the first
    :meth:`embed`; ``model_file_`` is then the cached export (None when it was built in memory).
    """

    kind = "onnx-minilm"

    def __init__(self, model_path: Optional[str] = None, cache: Optional[str] = None, batch_size: int = 32,
                 max_length: Optional[int] = None, threads: Optional[int] = None):
        self.model_path = model_path
        self.cache = cache
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self.threads = threads
        self.name = model_name(model_path)
        self.dim = DEFAULT_DIM if model_path is None else hidden_size(Path(model_path))
        if model_path is not None:
            # files record "onnx-minilm" as the bundled model; another folder is a custom embedder
            self.kind = "onnx"
        self.model_file_: Optional[Path] = None
        self._session = None
        self._tokenizer = None
        self._counter = None      # the tokenizer without truncation
        self._lock = threading.Lock()

    def _source(self, folder: Path) -> str | bytes:
        """The cached export's path, or the serialised export when the cache is not writable."""
        self.model_file_ = cached_model(folder, None if self.cache is None else Path(self.cache))
        if self.model_file_ is not None:
            return str(self.model_file_)
        from .onnx_export import export_model

        return export_model(folder).SerializeToString()

    def _folder(self) -> Path:
        return Path(default_model_path() if self.model_path is None else self.model_path)

    @property
    def max_tokens(self) -> int:
        """Word pieces a text may hold, [CLS] and [SEP] included (``max_length``, else the folder's
        ``max_seq_length``: 256 for the bundled model); :meth:`embed` cuts longer texts off."""
        return int(self.max_length or st_max_length(self._folder()))

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Word pieces of each text as :meth:`embed` tokenises it, before truncation, [CLS] and [SEP]
        included (``""`` has 2). ``(n,)``; loads only the tokenizer, not the model."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInput(f"text #{i} is {type(t).__name__}, expected str")
        with self._lock:
            if self._counter is None:
                tok = _tokenizer(self._folder(), self.max_tokens)
                tok.no_truncation()
                self._counter = tok
            counter = self._counter
        return [len(e.ids) for e in counter.encode_batch(texts)] if texts else []

    def _load(self) -> tuple[Any, Any]:
        """``(onnxruntime session, tokenizer)``, loaded once (thread-safe)."""
        with self._lock:
            if self._session is None:
                folder = self._folder()
                check_pipeline(folder)
                session = _session(self._source(folder), self.threads)
                dim = session.get_outputs()[0].shape[-1]
                if isinstance(dim, int):
                    self.dim = dim
                self._tokenizer = _tokenizer(folder, self.max_length or st_max_length(folder))
                self._session = session
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
            ids, mask = _padded(encs, idx, lengths)
            (pooled,) = session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})
            out[idx] = pooled
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)

    def __repr__(self) -> str:
        return f"<OnnxMiniLMEmbedder {self.name!r} dim={self.dim}>"
