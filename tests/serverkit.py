"""Helpers of the server tests: a small real database and a real ``moedb serve`` process on 127.0.0.1.

The server is the command users run (``python -m moedb.cli --db FILE serve``) in a subprocess, on a free
port, with the API key in an environment variable; :func:`running_server` waits until ``/v1/health``
answers and stops the process (by its own pid) afterwards.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from typing import Iterator, Optional

import httpx
from processes import free_port, stop

KEY_ENV = "MOEDB_TEST_API_KEY"
KEY = "test-key-6f1c0e"

EXPERTS = {
    "billing": ["Invoices are sent on the first day of each month by email.",
                "Refunds take five business days to reach your credit card.",
                "You can change your payment method in the account settings.",
                "A late payment adds a fee of five dollars to the next invoice."],
    "security": ["JWT access tokens expire after one hour; refresh them with the refresh token.",
                 "Enable two-factor authentication to protect your account from takeover.",
                 "Rotate API keys every ninety days and never commit them to git.",
                 "Passwords are hashed with argon2 before they are stored."],
    "cooking": ["Boil pasta in plenty of salted water for nine minutes.",
                "Bake the bread at 220 degrees Celsius for thirty minutes.",
                "Whisk eggs with sugar until pale to make a sponge cake.",
                "Caramelise onions slowly over low heat for forty minutes."],
}


def make_db(path: str) -> str:
    """A database with three small experts (the real MiniLM embedder), the gate fitted."""
    import moedb

    with moedb.connect(path) as db:
        for name, docs in EXPERTS.items():
            db.add_expert(name, docs, description=f"questions about {name}")
        db.warm_router()
    return path


@contextlib.contextmanager
def running_server(db_path: str, key: Optional[str] = KEY, *args: str, timeout: float = 120.0,
                   log_path: Optional[str] = None) -> Iterator[str]:
    """``moedb serve`` on a free port of 127.0.0.1; yields its base URL (``http://127.0.0.1:PORT``)."""
    port = free_port()
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "moedb.cli", "--db", db_path, "serve", "--port", str(port), "--log-level", "warning",
           *args]
    if key is not None:
        env[KEY_ENV] = key
        cmd += ["--api-key-env", KEY_ENV]
    log = open(log_path or os.devnull, "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moedb serve exited with {proc.returncode} (log: {log_path})")
            try:
                if httpx.get(url + "/v1/health", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("moedb serve did not answer in time")
            time.sleep(0.2)
        yield url
    finally:
        stop(proc, timeout=20)
        log.close()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
