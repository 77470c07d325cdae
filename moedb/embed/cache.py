"""The on-disk cache of ONNX exports: where it lives, the model fingerprint that keys it, and safe writes.

The cache is ``$MOEDB_CACHE`` (default ``~/.cache/moedb``); exports go to its ``onnx/`` folder, named
after a SHA-256 of the model's weights and config, so a different model never reuses one. An export is
written to a fresh temporary folder and renamed into place, under a lock file, so two processes
exporting at once are safe (``filelock``).

Integrity: a JSON sidecar records the source weights' SHA-256 and each exported file's size and SHA-256,
and is signed (HMAC-SHA256) with a per-user secret, ``onnx/.key`` (32 random bytes, mode 0600, owned by
the user; refused otherwise). An export whose files, source hash or signature do not match is rebuilt,
so a tampered graph or weights file is never loaded, even with its sidecar rewritten to match by whoever
cannot read the key. The remembered fingerprints (stamps) are signed the same way. A cache folder that
every user may write (mode 777) is not used: a warning says so and the export is built in memory.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import mmap
import os
import secrets
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError

BUILDER_VERSION = 3      # bump when the exported graph changes: old cache files are then ignored
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
    there under a stamp keyed by each file's path, size, inode and mtime (any change to the files gives
    a new stamp and a fresh hash) and signed with the cache's key (a stamp someone else wrote is ignored).
    """
    model_dir = Path(model_dir)
    stat_key = "\n".join(_stat_key(model_dir))
    onnx_dir = cache / "onnx" if cache is not None and usable(cache) else None
    key = _key(onnx_dir, create=False) if onnx_dir is not None else None
    stamp = None
    if onnx_dir is not None:
        stamp = onnx_dir / ("stamp-" + hashlib.sha1(stat_key.encode()).hexdigest()[:20])
        try:
            digest, _, mac = stamp.read_text().strip().partition(" ")
            if key is not None and len(digest) == 64 and hmac.compare_digest(mac, _mac(key, stat_key + digest)):
                return digest
        except OSError:
            pass
    digest = _sha256_files(model_dir)
    if stamp is not None:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            key = key or _key(stamp.parent, create=True)
            if key is not None:
                atomic_write(stamp, f"{digest} {_mac(key, stat_key + digest)}".encode())
        except OSError:
            pass
    return digest


# ---------------------------------------------------------------------- who may write the cache
_WARNED: set[str] = set()


def _warn_once(where: Path, msg: str) -> None:
    if str(where) not in _WARNED:
        _WARNED.add(str(where))
        print(f"moedb: {msg}", file=sys.stderr)


def usable(cache: Path) -> bool:
    """False (with a warning on stderr, once) when the cache folder or its ``onnx/`` folder is writable
    by every user: anyone could swap the files moedb loads there."""
    for d in (cache, cache / "onnx"):
        try:
            mode = d.stat().st_mode
        except OSError:
            continue
        if mode & stat.S_IWOTH:
            _warn_once(d, f"ONNX cache {d} is writable by every user (mode {stat.S_IMODE(mode):o}); not used "
                          f"(building the export in memory): run `chmod o-w {d}` or set MOEDB_CACHE")
            return False
    return True


def _key(onnx_dir: Path, create: bool) -> Optional[bytes]:
    """The secret that signs this cache's sidecars and stamps (``onnx/.key``: 32 bytes, mode 0600, owned by
    this user), created when ``create``; None when it is missing or not private (with a warning)."""
    path = onnx_dir / ".key"
    if create and not os.path.lexists(path):
        fd, tmp = tempfile.mkstemp(prefix=".key.", dir=onnx_dir)  # (mode 0600)
        try:
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
            os.close(fd)
            os.link(tmp, path)  # atomic: two processes creating it at once agree on one key
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        data = os.read(fd, 64)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077 or len(data) != 32:
        _warn_once(path, f"ONNX cache key {path} is not a private file of this user; the cache is not used "
                         "(remove the key to start a fresh cache)")
        return None
    return data


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------- validity
def hash_file(path: Path) -> Optional[tuple[int, str]]:
    """``(size, sha256 hex)`` of a file, read through mmap (no copy); None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return 0, hashlib.sha256(b"").hexdigest()
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return size, hashlib.sha256(mm).hexdigest()
    except (OSError, ValueError):
        return None


def _signed(meta: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in meta.items() if k != "mac"}, sort_keys=True)


def _valid(paths: dict[str, Any], key: Optional[bytes]) -> bool:
    """True when the sidecar is signed with this cache's ``key``, names the source weights' SHA-256, and
    the graph's and the weights' size and SHA-256 match it."""
    if key is None:
        return False
    try:
        meta = json.loads(paths["json"].read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("builder") != BUILDER_VERSION or \
            meta.get("model_sha256") != paths["digest"] or \
            not hmac.compare_digest(str(meta.get("mac", "")), _mac(key, _signed(meta))):
        return False
    for name in ("onnx", "weights"):
        got = hash_file(paths[name])
        if got is None or [got[0], got[1]] != meta.get(name):
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


def _export_into_cache(model_dir: Path, paths: dict[str, Any], key: bytes) -> None:
    """Export ``model_dir`` in a fresh temporary folder, then rename the graph and its weights into place
    and write the sidecar, signed with ``key``, last (a crash leaves no sidecar, hence a rebuild)."""
    from .onnx_export import save_export  # imports onnx: only on a cache miss

    paths["json"].unlink(missing_ok=True)  # readers stop trusting the old files before they change
    tmp = Path(tempfile.mkdtemp(prefix=paths["onnx"].name + ".", suffix=".tmp", dir=paths["onnx"].parent))
    try:
        graph, weights = tmp / paths["onnx"].name, tmp / paths["weights"].name
        save_export(model_dir, graph, weights.name, {"moedb.builder": str(BUILDER_VERSION)})
        sizes = {}
        for name, src in (("weights", weights), ("onnx", graph)):
            _fsync_file(src)
            os.chmod(src, 0o644)
            os.replace(src, paths[name])
            sizes[name] = list(hash_file(paths[name]) or (-1, ""))
        meta = {"builder": BUILDER_VERSION, **sizes, "model_sha256": paths["digest"], "model_dir": str(model_dir)}
        meta["mac"] = _mac(key, _signed(meta))
        atomic_write(paths["json"], json.dumps(meta).encode())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_model(model_dir: str | os.PathLike, cache: Optional[Path] = None) -> Optional[Path]:
    """Path of the cached ONNX export of ``model_dir`` (weights in a ``.weights`` file beside it).

    A valid cache is used as is; a missing, corrupt or tampered one is (re)built under a lock file.
    Returns None when the cache directory is not writable or every user may write it (the caller then
    builds the export in memory).
    """
    cache = cache_dir() if cache is None else Path(cache)
    if not usable(cache):
        return None
    paths = cache_paths(model_dir, cache)
    if _valid(paths, _key(paths["onnx"].parent, create=False)):
        return paths["onnx"]
    from filelock import FileLock  # (imported only on a cache miss)

    lock = FileLock(paths["lock"])
    try:
        paths["onnx"].parent.mkdir(parents=True, exist_ok=True)
        if not usable(cache):
            return None
        key = _key(paths["onnx"].parent, create=True)
        if key is None:
            return None
        lock.acquire()
    except OSError as e:
        print(f"moedb: ONNX cache {paths['onnx'].parent} is not writable ({e}); building the export in memory",
              file=sys.stderr)
        return None
    try:
        if not _valid(paths, key):  # else another process finished the export while we waited
            _export_into_cache(Path(model_dir), paths, key)
    finally:
        lock.release()
    return paths["onnx"]
