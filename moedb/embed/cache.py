"""The on-disk cache of ONNX exports: where it lives, the model fingerprint that keys it, and safe writes.

The cache is ``$MOEDB_CACHE`` (default ``~/.cache/moedb``); exports go to its ``onnx/`` folder, named
after a SHA-256 of the model's weights and config, so a different model never reuses one. An export is
written to a fresh temporary folder and renamed into place, under a lock file, so two processes
exporting at once are safe (``filelock``). A JSON sidecar records each file's size and CRC-32; a file that fails the
check is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError

BUILDER_VERSION = 2      # bump when the exported graph changes: old cache files are then ignored
_FINGERPRINT_FILES = ("model.safetensors", "config.json")


def cache_dir() -> Path:
    """``$MOEDB_CACHE`` or ``~/.cache/moedb``."""
    env = os.environ.get("MOEDB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moedb"


# ---------------------------------------------------------------------- safe writes
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (readers never see half a file)."""
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


# ---------------------------------------------------------------------- fingerprint
def _stat_key(model_dir: Path) -> list[str]:
    """Path, size, inode and mtime of each fingerprinted file (changes whenever a file does)."""
    key = []
    for name in _FINGERPRINT_FILES:
        p = model_dir / name
        try:
            st = p.stat()
        except OSError:
            raise ConfigError(f"ONNX embedder: {p} not found (expected a sentence-transformers BERT folder)") from None
        key.append(f"{p.resolve()}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}")
    return key


def _sha256_files(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in _FINGERPRINT_FILES:
        with open(model_dir / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def model_fingerprint(model_dir: str | os.PathLike, cache: Optional[Path] = None) -> str:
    """SHA-256 (hex) of the model's ``model.safetensors`` followed by its ``config.json``.

    Hashing 90 MB on every cold start would cost ~0.2 s, so with ``cache`` the digest is remembered
    there under a stamp keyed by each file's path, size, inode and mtime: any change to the files gives
    a new stamp and a fresh hash.
    """
    model_dir = Path(model_dir)
    stat_key = _stat_key(model_dir)
    stamp = None
    if cache is not None:
        stamp = cache / "onnx" / ("stamp-" + hashlib.sha1("\n".join(stat_key).encode()).hexdigest()[:20])
        try:
            digest = stamp.read_text().strip()
            if len(digest) == 64:
                return digest
        except OSError:
            pass
    digest = _sha256_files(model_dir)
    if stamp is not None:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(stamp, digest.encode())
        except OSError:
            pass
    return digest


# ---------------------------------------------------------------------- validity
def crc_file(path: Path) -> Optional[tuple[int, int]]:
    """``(size, crc32)`` of a file, read through mmap (no copy); None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return 0, zlib.crc32(b"")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return size, zlib.crc32(mm)
    except (OSError, ValueError):
        return None


def _valid(paths: dict[str, Any]) -> bool:
    """True when the graph's and the weights' size and CRC-32 match the sidecar written after the export."""
    try:
        meta = json.loads(paths["json"].read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("builder") != BUILDER_VERSION:
        return False
    for key in ("onnx", "weights"):
        got = crc_file(paths[key])
        if got is None or [got[0], got[1]] != meta.get(key):
            return False
    return True


# ---------------------------------------------------------------------- the cached export
def cache_paths(model_dir: str | os.PathLike, cache: Optional[Path] = None) -> dict[str, Any]:
    """Where the export of ``model_dir`` lives: paths ``onnx``, ``weights``, ``json`` (sidecar), ``lock``,
    and ``digest`` (the model's SHA-256)."""
    cache = cache_dir() if cache is None else Path(cache)
    digest = model_fingerprint(model_dir, cache)
    base = cache / "onnx" / f"minilm-{digest[:16]}-b{BUILDER_VERSION}"
    return {k: base.with_suffix("." + k) for k in ("onnx", "weights", "json", "lock")} | {"digest": digest}


def _export_into_cache(model_dir: Path, paths: dict[str, Any]) -> None:
    """Export ``model_dir`` in a fresh temporary folder, then rename the graph and its weights into place
    and write the sidecar last (a crash leaves no sidecar, hence a rebuild)."""
    from .onnx_export import save_export  # imports onnx: only on a cache miss

    paths["json"].unlink(missing_ok=True)  # readers stop trusting the old files before they change
    tmp = Path(tempfile.mkdtemp(prefix=paths["onnx"].name + ".", suffix=".tmp", dir=paths["onnx"].parent))
    try:
        graph, weights = tmp / paths["onnx"].name, tmp / paths["weights"].name
        save_export(model_dir, graph, weights.name, {"moedb.builder": str(BUILDER_VERSION)})
        sizes = {}
        for key, src in (("weights", weights), ("onnx", graph)):
            _fsync_file(src)
            os.chmod(src, 0o644)
            os.replace(src, paths[key])
            sizes[key] = list(crc_file(paths[key]) or (-1, -1))
        meta = {"builder": BUILDER_VERSION, **sizes, "model_sha256": paths["digest"], "model_dir": str(model_dir)}
        atomic_write(paths["json"], json.dumps(meta).encode())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_model(model_dir: str | os.PathLike, cache: Optional[Path] = None) -> Optional[Path]:
    """Path of the cached ONNX export of ``model_dir`` (weights in a ``.weights`` file beside it).

    A valid cache is used as is; a missing or corrupt one is (re)built under a lock file. Returns None
    when the cache directory is not writable (the caller then builds the export in memory).
    """
    paths = cache_paths(model_dir, cache)
    if _valid(paths):
        return paths["onnx"]
    from filelock import FileLock  # (imported only on a cache miss)

    lock = FileLock(paths["lock"])
    try:
        paths["onnx"].parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as e:
        print(f"moedb: ONNX cache {paths['onnx'].parent} is not writable ({e}); building the export in memory",
              file=sys.stderr)
        return None
    try:
        if not _valid(paths):  # else another process finished the export while we waited
            _export_into_cache(Path(model_dir), paths)
    finally:
        lock.release()
    return paths["onnx"]
