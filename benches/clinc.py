"""CLINC150 for the benches: a loader and an on-disk embedding cache (shared by several benches).

``load_clinc(shared_dir)`` returns the splits as lists; ``embed_cached(texts, key)`` embeds with the
bundled all-MiniLM-L6-v2 once and keeps the ``(n, 384)`` float32 matrix under ``benches/out/``.
Run ``python benches/clinc.py`` to warm the cache (about 23k short texts).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
from typing import Any, Optional

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmark the working tree's moedb, not whatever copy is installed
    sys.path.insert(0, str(ROOT))
OUT = ROOT / "benches" / "out"
DEFAULT_SHARED = pathlib.Path(os.environ.get("MOEDB_SHARED", ROOT.parent / "shared"))
SPLITS = ("train", "val", "test", "oos_train", "oos_val", "oos_test")


def find_shared(shared_dir: Optional[os.PathLike] = None) -> Optional[pathlib.Path]:
    """The ``shared`` directory if it holds CLINC150, else ``None``."""
    p = pathlib.Path(shared_dir) if shared_dir is not None else DEFAULT_SHARED
    return p if (p / "data" / "clinc150" / "data_full.json").is_file() else None


def load_clinc(shared_dir: Optional[os.PathLike] = None) -> dict[str, Any]:
    """CLINC150 as plain lists.

    Returns ``{split: {"texts": [str], "labels": [str]}}`` for the six splits, plus
    ``"intents"`` (150 names, sorted), ``"domains"`` ``{domain: [intent]}`` and
    ``"domain_of"`` ``{intent: domain}``. Raises FileNotFoundError when the data is absent.
    """
    base = find_shared(shared_dir)
    if base is None:
        raise FileNotFoundError(f"CLINC150 not found under {shared_dir or DEFAULT_SHARED}/data/clinc150")
    d = base / "data" / "clinc150"
    raw = json.loads((d / "data_full.json").read_text())
    domains = json.loads((d / "domains.json").read_text())
    out: dict[str, Any] = {}
    for s in SPLITS:
        out[s] = {"texts": [t for t, _ in raw[s]], "labels": [lab for _, lab in raw[s]]}
    out["intents"] = sorted(set(out["train"]["labels"]))
    out["domains"] = {k: list(v) for k, v in domains.items()}
    out["domain_of"] = {i: dom for dom, ints in domains.items() for i in ints}
    return out


_EMBEDDER = None


def _embedder():
    global _EMBEDDER
    if _EMBEDDER is None:
        from moedb.embed import resolve

        _EMBEDDER = resolve(None)
    return _EMBEDDER


def embed_cached(texts: list[str], key: str, batch: int = 256, embedder=None) -> np.ndarray:
    """Unit MiniLM vectors ``(len(texts), 384)`` float32, cached as ``benches/out/emb_<key>_<hash>.npy``.

    The hash covers the texts, so a changed input never reuses a stale cache.
    """
    h = hashlib.sha1("\n".join(texts).encode("utf-8")).hexdigest()[:12]
    path = OUT / f"emb_{key}_{h}.npy"
    if path.is_file():
        return np.load(path)
    OUT.mkdir(parents=True, exist_ok=True)
    emb = embedder or _embedder()
    parts = [np.asarray(emb.embed(texts[s:s + batch]), dtype=np.float32) for s in range(0, len(texts), batch)]
    m = np.concatenate(parts) if parts else np.zeros((0, 384), np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, m)
    os.replace(tmp, path)
    return m


def clinc_embedded(shared_dir: Optional[os.PathLike] = None) -> dict[str, Any]:
    """:func:`load_clinc` plus ``"X"`` (the split's vectors) in every split entry."""
    data = load_clinc(shared_dir)
    for s in SPLITS:
        data[s]["X"] = embed_cached(data[s]["texts"], f"clinc_{s}")
    return data


def vector_table(data: dict[str, Any], splits: tuple[str, ...] = SPLITS) -> dict[str, np.ndarray]:
    """``{text: vector}`` over the embedded ``splits`` (what the benches' lookup embedders serve)."""
    return {t: v for s in splits for t, v in zip(data[s]["texts"], data[s]["X"])}


def add_replica_experts(db, data: dict[str, Any], replicas: int, seed: int = 0) -> None:
    """Deal every intent's train utterances at random into ``replicas`` near-equivalent experts
    ``"<intent>#<r>"`` (their precomputed vectors), one ``add_expert`` call each."""
    rng = np.random.default_rng(seed)
    tr = data["train"]
    lab = np.array(tr["labels"])
    for n in data["intents"]:
        rows = rng.permutation(np.flatnonzero(lab == n))
        for r in range(replicas):
            part = rows[r::replicas]
            db.add_expert(f"{n}#{r}", [{"text": tr["texts"][i], "id": str(i)} for i in part], vectors=tr["X"][part])


if __name__ == "__main__":
    if find_shared() is None:
        print(f"skip: CLINC150 not found under {DEFAULT_SHARED}")
        sys.exit(0)
    import time

    t = time.time()
    d = clinc_embedded()
    print({s: d[s]["X"].shape for s in SPLITS}, f"{time.time() - t:.1f}s")
