"""Counts kept by the attack suites (tests/test_attack_*.py), per class of attack: cases tried, clean errors
(a moedb error), tracebacks (any other exception), corrupted files (integrity_check is not ok) and lost or
partial writes. Each suite prints its line (``pytest -s``) and, when ``MOEDB_ATTACK_REPORT`` names a file,
appends it there as one JSON object per line (the issue's closing table is made from those)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field


@dataclass
class Tally:
    """The counts of one class of attack; ``notes`` keeps the first few surprises for the report."""

    name: str
    tried: int = 0
    clean: int = 0
    ok: int = 0
    tracebacks: int = 0
    corrupted: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.notes) < 5:
            self.notes.append(text[:300])

    def report(self) -> None:
        line = {k: v for k, v in asdict(self).items()}
        print(f"\nATTACK {self.name}: tried {self.tried}, clean errors {self.clean}, successes {self.ok}, "
              f"tracebacks {self.tracebacks}, corrupted {self.corrupted}, lost {self.lost}"
              + (f"; notes: {self.notes}" if self.notes else ""))
        out = os.environ.get("MOEDB_ATTACK_REPORT")
        if out:
            with open(out, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")


def content_digest(conn) -> str:
    """SHA-256 of every row of every table of an apsw connection (what a failing call must not change)."""
    h = hashlib.sha256()
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
        "AND sql NOT LIKE 'CREATE VIRTUAL%' ORDER BY name")]
    for t in tables:
        h.update(t.encode())
        for row in conn.execute(f'SELECT * FROM "{t}" ORDER BY rowid' if _has_rowid(conn, t) else f'SELECT * FROM "{t}"'):
            h.update(repr(row).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _has_rowid(conn, table: str) -> bool:
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name=?", (table,)).fetchone()[0] or ""
    return "WITHOUT ROWID" not in sql.upper()


def integrity_ok(path: str) -> bool:
    import apsw

    c = apsw.Connection(path)
    try:
        return c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        c.close()
