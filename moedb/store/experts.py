"""The ``experts`` table: rows, stamps, inserts, updates, deletes, children."""
from __future__ import annotations

import json
import time
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import DuplicateExpert, UnknownExpert
from .connection import Connection, dumps as _dumps


class ExpertTable:
    """Experts: one row each (name, description, keywords, parent, metadata, generator, running vector sum)."""

    def __init__(self, db: Connection):
        self.db = db

    _EXPERT_COLS = (
        "e.id, e.name, e.description, e.keywords, p.name, e.metadata, e.generator, e.n_docs, "
        "e.vec_sum, e.version, e.created_at, e.updated_at, e.parent_id, e.refuse"
    )

    @staticmethod
    def _expert_dict(row: tuple) -> dict[str, Any]:
        (id_, name, desc, kw, parent, md, gen, n, vec_sum, version, created, updated, parent_id, refuse) = row
        return {
            "id": id_, "name": name, "description": desc, "keywords": json.loads(kw),
            "parent": parent, "parent_id": parent_id, "metadata": json.loads(md),
            "generator": json.loads(gen) if gen else None, "size": n,
            "vec_sum": np.frombuffer(vec_sum, dtype="<f8") if vec_sum else None,
            "version": version, "created_at": created, "updated_at": updated, "refuse": bool(refuse),
        }

    def rows(self, ids: Optional[Sequence[int]] = None) -> list[dict[str, Any]]:
        """Every expert (``ids``: only these), in id order."""
        sql = f"SELECT {self._EXPERT_COLS} FROM experts e LEFT JOIN experts p ON p.id = e.parent_id"
        if ids is None:
            return [self._expert_dict(r) for r in self.db.q(sql + " ORDER BY e.id")]
        out = self.db.in_chunks(sql + " WHERE e.id IN ({marks})", list(ids))
        return [self._expert_dict(r) for r in sorted(out)]

    def stamps(self) -> list[tuple[int, int, float, Optional[int]]]:
        """``(id, version, updated_at, parent_id)`` of every expert in id order: what tells a cached row
        from a changed one (every change of a row moves its version and updated_at; deleting its parent
        moves parent_id)."""
        return self.db.q("SELECT id, version, updated_at, parent_id FROM experts ORDER BY id")

    def row(self, name: str) -> dict[str, Any]:
        row = self.db.q1(
            f"SELECT {self._EXPERT_COLS} FROM experts e LEFT JOIN experts p ON p.id = e.parent_id WHERE e.name=?",
            (name,),
        )
        if row is None:
            raise UnknownExpert(name)
        return self._expert_dict(row)

    def id_of(self, name: str) -> int:
        row = self.db.q1("SELECT id FROM experts WHERE name=?", (name,))
        if row is None:
            raise UnknownExpert(name)
        return row[0]

    def insert(self, name: str, description: str, keywords: list[str], parent_id: Optional[int],
                      metadata: dict, generator: Optional[dict], refuse: bool = False) -> int:
        now = time.time()
        with self.db.atomic():
            if self.db.q1("SELECT 1 FROM experts WHERE name=?", (name,)):
                raise DuplicateExpert(f"expert {name!r} already exists")
            self.db.conn.execute(
                "INSERT INTO experts(name, description, keywords, parent_id, metadata, generator, "
                "created_at, updated_at, refuse) VALUES (?,?,?,?,?,?,?,?,?)",
                (name, description, _dumps(keywords), parent_id, _dumps(metadata),
                 _dumps(generator) if generator is not None else None, now, now, int(bool(refuse))),
            )
            return self.db.conn.last_insert_rowid()

    _UPDATABLE = {"name", "description", "keywords", "parent_id", "metadata", "generator", "refuse"}

    def update(self, expert_id: int, **fields: Any) -> None:
        bad = set(fields) - self._UPDATABLE
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        if not fields:
            return
        enc = {
            k: (_dumps(v) if k in ("keywords", "metadata") or (k == "generator" and v is not None) else v)
            for k, v in fields.items()
        }
        sets = ", ".join(f"{k}=:{k}" for k in enc)
        enc["id"] = expert_id
        enc["now"] = time.time()
        with self.db.atomic():
            if "name" in fields and self.db.q1("SELECT 1 FROM experts WHERE name=? AND id<>?", (fields["name"], expert_id)):
                raise DuplicateExpert(f"expert {fields['name']!r} already exists")
            # the version says "what routing learns from changed" (documents, name, description, keywords, parent,
            # refusal role): a new generator or metadata moves only updated_at, so the gate is not refitted
            bump = ", version=version+1" if set(fields) - {"generator", "metadata"} else ""
            self.db.conn.execute(f"UPDATE experts SET {sets}{bump}, updated_at=:now WHERE id=:id", enc)

    def delete(self, expert_id: int) -> None:
        with self.db.atomic():
            self.db.conn.execute("DELETE FROM documents WHERE expert_id=?", (expert_id,))
            self.db.conn.execute("DELETE FROM experts WHERE id=?", (expert_id,))

    def children(self, expert_id: int) -> list[int]:
        return [r[0] for r in self.db.q("SELECT id FROM experts WHERE parent_id=?", (expert_id,))]
