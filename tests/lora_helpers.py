"""Helpers shared by the LoRA tests and benches: adapter files written with ``gguf``, and real llama.cpp
``llama-server`` processes on free 127.0.0.1 ports (the binary built by scripts/build_llama_server.sh).

Not a test module (pytest collects ``test_*.py`` only); tests import it as ``lora_helpers``, benches
put ``tests/`` on ``sys.path`` first.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence

import numpy as np
from processes import free_port, stop

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build_llama_server.sh"


def write_lora(base: str, out: str, seed: int, rank: int = 4, alpha: float = 8.0, std: float = 0.3,
               targets=("attn_q", "attn_v", "ffn_up")) -> int:
    """Write a LoRA adapter GGUF for ``base``: ``<tensor>.lora_a`` (rank, n_in) and ``.lora_b`` (n_out, rank)
    for the targeted weights of every block, random normal values. Returns the number of adapted weights."""
    import gguf

    r = gguf.GGUFReader(base)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(out, arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    rng = np.random.default_rng(seed)
    n = 0
    for t in r.tensors:
        if any(t.name.endswith(f".{x}.weight") for x in targets):
            n_in, n_out = int(t.shape[0]), int(t.shape[1])  # ggml order: ne0 = input features
            w.add_tensor(t.name + ".lora_a", rng.normal(0, std, (rank, n_in)).astype(np.float32))
            w.add_tensor(t.name + ".lora_b", rng.normal(0, std, (n_out, rank)).astype(np.float32))
            n += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n


def llama_server_binary() -> tuple[Optional[str], str]:
    """``(path, "")`` of the built llama-server, or ``(None, why)`` when it has not been built (the build
    script is asked with ``--print-path``, which never builds)."""
    try:
        r = subprocess.run(["bash", str(BUILD_SCRIPT), "--print-path"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"cannot run {BUILD_SCRIPT}: {e}"
    path = r.stdout.strip()
    if r.returncode != 0:
        return None, (f"llama-server is not built ({path} absent); build it once with scripts/build_llama_server.sh "
                      "(.ci/run does)")
    return path, ""


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class LlamaServer:
    """A real ``llama-server`` on a free 127.0.0.1 port serving ``model`` with ``args`` (e.g.
    ``["--lora", a, "--lora", b, "--lora-init-without-apply"]``); started by :meth:`start`, stopped by
    :meth:`stop` (or as a context manager). ``url`` is the server root (``http://127.0.0.1:port``)."""

    def __init__(self, binary: str, model: str, args: Sequence[str] = (), port: Optional[int] = None,
                 threads: int = 1, parallel: int = 4, ctx: int = 2048, log: Optional[str] = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads),
                    "-tb", str(threads), "-c", str(ctx), "-np", str(parallel), *args]
        self.log = log
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> "LlamaServer":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: {' '.join(self.cmd)}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama-server did not become healthy within {timeout} s: {' '.join(self.cmd)}")

    def adapters(self) -> list[dict]:
        """``GET /lora-adapters``."""
        with urllib.request.urlopen(self.url + "/lora-adapters", timeout=10) as r:
            return json.loads(r.read())

    def rss_mb(self) -> float:
        assert self.proc is not None
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
        self.proc = None

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
