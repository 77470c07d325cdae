"""YAML expert files and ``moedb apply DIR``: experts described declaratively, one file each.

A file (``*.yaml`` / ``*.yml``) holds one mapping::

    name: sql                      # default: the file name without suffix
    description: SQL and query planning
    keywords: [sql, join, index]
    parent: databases              # an existing expert or one defined in the same folder
    metadata: {team: data}
    system_prompt: You answer SQL questions precisely.
    generator: {backend: llama, model: ../models/base.gguf, lora: sql-lora.gguf}
    documents: [docs/sql/, notes.md]   # files or folders (.txt, .md, .jsonl)
    chunk_tokens: 256              # passages by the embedder's tokens (default: 256, or its limit)
    overlap: 32                    # tokens repeated where a paragraph is cut (default 32)
    # chunk_size: 1000             # or: passages by characters, as before (not with chunk_tokens/overlap)

Relative paths are resolved against the file's folder; passage sources are stored relative to
it (``docs/sql/joins.md#0``), so applying from another working directory changes nothing.
``documents`` paths must lie inside that folder (an absolute path or a ``../`` out of it is refused; links
are followed only inside it); files that are not read are listed under ``skipped`` in the report.
A file whose YAML aliases expand beyond :data:`MAX_YAML_NODES` values is refused (alias amplification).
A key that is present is managed: ``documents`` makes the expert's documents exactly the listed
passages (new and changed ones are embedded and written, missing ones removed). A key that is
absent leaves that part of an existing expert alone. ``system_prompt`` goes into the generator
config (an overlay on the database default when the file has no ``generator``).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..engine.catalog import Catalog
from ..engine.experts import ExpertEditor, check_metadata, check_name, check_refuse, read_files
from ..errors import ConfigError, FileProblem, InvalidInput
from ..generate import validate_config
from ..ingest.files import Skipped, inside_folder, warn_skipped
from ..store import Store

KEYS = {"name", "description", "keywords", "parent", "metadata", "system_prompt", "generator", "documents",
        "chunk_size", "chunk_tokens", "overlap", "refuse"}


@dataclass
class ExpertPlan:
    """What applying one file will do."""

    name: str
    file: str
    action: str = "unchanged"            # created | updated | unchanged
    fields: dict[str, Any] = field(default_factory=dict)
    parent: Any = ...                    # ... = leave, None = detach, str = parent name
    new_rows: list[tuple] = field(default_factory=list)
    new_vectors: Any = None
    remove_ids: list[str] = field(default_factory=list)
    changed: int = 0
    skipped: list[Skipped] = field(default_factory=list)   # files of ``documents:`` not read, and why

    def summary(self) -> dict[str, Any]:
        return {"file": self.file, "action": self.action, "fields": sorted(self.fields) + (
            ["parent"] if self.parent is not ... and self.action == "updated" else []),
            "added": len(self.new_rows) - self.changed, "changed": self.changed, "removed": len(self.remove_ids),
            "skipped": [x.to_dict() for x in self.skipped]}


@dataclass
class DirPlan:
    experts: list[ExpertPlan]

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"created": [], "updated": [], "unchanged": [], "details": {}}
        for p in self.experts:
            out[p.action].append(p.name)
            out["details"][p.name] = p.summary()
        return out


def _err(file: str, msg: str) -> ConfigError:
    return ConfigError(f"{file}: {msg}")


MAX_YAML_NODES = 100_000   # values a file may hold once its aliases are expanded


def _expanded_nodes(node: Any, memo: dict[int, int]) -> int:
    """How many values the YAML node tree holds with every alias expanded (an alias shares its anchor's
    node, so 8 levels of 8 aliases are 8**8 values in a few hundred bytes)."""
    n = memo.get(id(node))
    if n is None:
        value = node.value
        if isinstance(value, list):
            items = [x for pair in value for x in pair] if value and isinstance(value[0], tuple) else value
            n = 1 + sum(_expanded_nodes(x, memo) for x in items)
        else:
            n = 1
        memo[id(node)] = n
    return n


@functools.lru_cache(maxsize=1)
def _loader() -> type:
    """yaml's SafeLoader, refusing a document whose aliases expand beyond :data:`MAX_YAML_NODES` values."""
    import yaml

    class BoundedSafeLoader(yaml.SafeLoader):
        def compose_document(self) -> Any:
            node = super().compose_document()
            if node is not None and _expanded_nodes(node, {}) > MAX_YAML_NODES:
                raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_NODES:,} values "
                                     "(alias amplification); write the values out instead")
            return node

    return BoundedSafeLoader


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_loader())
    except OSError as e:
        raise FileProblem(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise FileProblem(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise FileProblem(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise FileProblem(f"{path}: invalid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise _err(path, "must contain one mapping (name, description, documents, ...)")
    unknown = sorted(set(map(str, data)) - KEYS)
    if unknown:
        raise _err(path, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(KEYS))})")
    return data


def _passages(parts: "ExpertFiles", spec: dict, base: str, file: str) -> tuple[list[dict[str, Any]], list[Skipped]]:
    """The passages of a file's ``documents:`` (paths inside its folder only) and the files skipped."""
    docs = spec["documents"]
    if isinstance(docs, str):
        docs = [docs]
    if not isinstance(docs, list) or not all(isinstance(d, str) and d for d in docs):
        raise _err(file, "documents: must be a list of file or folder paths")
    try:
        size = parts.experts.sizes(*(spec.get(k) for k in ("chunk_size", "chunk_tokens", "overlap")))
    except InvalidInput as e:
        raise _err(file, str(e)) from None
    try:
        paths = [inside_folder(base, d, "documents") for d in docs]
        passages, skipped = read_files(paths, size, root=base)
    except (FileProblem, InvalidInput) as e:
        raise type(e)(f"{file}: {e}") from None
    out = []
    for p in passages:
        rel = os.path.relpath(p.source, base).replace(os.sep, "/")
        out.append({"id": p.id if p.id is not None else f"{rel}#{p.position}", "text": p.text,
                    "metadata": p.metadata, "source": rel, "position": p.position})
    ids = [d["id"] for d in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise _err(file, f"document id {dup!r} appears twice")
    return out, [Skipped(os.path.relpath(x.path, base).replace(os.sep, "/"), x.reason) for x in skipped]


def _spec_plan(parts: "ExpertFiles", path: str, data: dict) -> tuple[ExpertPlan, Optional[list[dict]]]:
    base = os.path.dirname(os.path.abspath(path))
    name = data.get("name", os.path.splitext(os.path.basename(path))[0])
    try:
        check_name(name)
    except InvalidInput as e:
        raise _err(path, f"name: {e}") from None
    plan = ExpertPlan(name=name, file=path)
    want: dict[str, Any] = {}
    if "description" in data:
        if not isinstance(data["description"], str):
            raise _err(path, "description: must be a string")
        want["description"] = data["description"]
    if "keywords" in data:
        kw = data["keywords"]
        if not isinstance(kw, list) or not all(isinstance(k, (str, int, float)) for k in kw):
            raise _err(path, "keywords: must be a list of strings")
        want["keywords"] = [str(k) for k in kw]
    if "metadata" in data:
        try:
            want["metadata"] = check_metadata(data["metadata"])
        except InvalidInput as e:
            raise _err(path, str(e)) from None
    if "refuse" in data:
        if not isinstance(data["refuse"], bool):
            raise _err(path, "refuse: must be true or false")
        want["refuse"] = data["refuse"]
    if "parent" in data:
        if data["parent"] is not None and not isinstance(data["parent"], str):
            raise _err(path, "parent: must be an expert name")
        plan.parent = data["parent"]
    if "generator" in data or "system_prompt" in data:
        gen = data.get("generator") or {}
        if not isinstance(gen, dict):
            raise _err(path, "generator: must be a mapping")
        if "system_prompt" in data:
            if not isinstance(data["system_prompt"], str):
                raise _err(path, "system_prompt: must be a string")
            gen = {**gen, "system_prompt": data["system_prompt"]}
        try:
            want["generator"] = validate_config(gen, base_dir=base, expert=name)
        except ConfigError as e:
            raise _err(path, str(e)) from None
    docs = None
    if "documents" in data:
        docs, plan.skipped = _passages(parts, data, base, path)
    plan.fields = want
    return plan, docs


def _order(plans: list[ExpertPlan], existing: set[str]) -> list[ExpertPlan]:
    """Parents before children; unknown parents and cycles are refused."""
    by = {p.name: p for p in plans}
    for p in plans:
        if isinstance(p.parent, str) and p.parent not in by and p.parent not in existing:
            raise _err(p.file, f"parent: unknown expert {p.parent!r} (not in the database nor in this folder)")
    out, state = [], {}

    def visit(p: ExpertPlan, chain: tuple) -> None:
        if state.get(p.name) == "done":
            return
        if p.name in chain:
            raise _err(p.file, "parent: cycle " + " > ".join(chain + (p.name,)))
        if isinstance(p.parent, str) and p.parent in by:
            visit(by[p.parent], chain + (p.name,))
        state[p.name] = "done"
        out.append(p)

    for p in plans:
        visit(p, ())
    return out


def plan_dir(parts: "ExpertFiles", folder: str) -> DirPlan:
    """Parse, validate and diff every YAML file of ``folder`` against the database (writes nothing)."""
    if not os.path.isdir(folder):
        raise FileProblem(f"{folder}: not a directory")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith((".yaml", ".yml")))
    if not files:
        raise FileProblem(f"{folder}: no .yaml or .yml expert files")
    parts.catalog.refresh()
    plans, docs_of, seen = [], {}, {}
    for f in files:
        plan, docs = _spec_plan(parts, f, _load_yaml(f))
        if plan.name in seen:
            raise _err(f, f"name: expert {plan.name!r} is also defined in {seen[plan.name]}")
        seen[plan.name] = f
        warn_skipped(Skipped(f"{f}: {x.path}", x.reason) for x in plan.skipped)
        plans.append(plan)
        docs_of[plan.name] = docs
    plans = _order(plans, set(parts.catalog.by_name))
    for p in plans:
        row = parts.catalog.by_name.get(p.name)
        cur = ({} if row is None else {"description": row["description"], "keywords": row["keywords"],
                                        "metadata": row["metadata"], "generator": row["generator"],
                                        "refuse": bool(row.get("refuse"))})
        if row is None:
            p.action = "created"
        else:
            p.fields = {k: v for k, v in p.fields.items() if cur.get(k) != v}
            if p.parent is not ... and row["parent"] == p.parent:
                p.parent = ...
            elif isinstance(p.parent, str) and p.parent in parts.catalog.by_name:
                try:  # an existing parent must not be a descendant of this expert
                    parts.experts.check_parent(p.parent, child=p.name)
                except InvalidInput as e:
                    raise _err(p.file, f"parent: {e}") from None
        _check_refusal_role(parts, p, row, plans)
        docs = docs_of[p.name]
        if docs is not None:
            old = {} if row is None else {d["id"]: d for d in parts.experts.documents(p.name)}
            new = [d for d in docs if d["id"] not in old or any(
                old[d["id"]][key] != d[key] for key in ("text", "metadata", "source", "position"))]
            p.changed = sum(1 for d in new if d["id"] in old)
            keep = {d["id"] for d in docs}
            p.remove_ids = [i for i in old if i not in keep]
            if new:
                p.new_rows, p.new_vectors = parts.experts.prepare(new, None, None)
        if row is not None and (p.fields or p.parent is not ... or p.new_rows or p.remove_ids):
            p.action = "updated"
    return DirPlan(plans)


def _check_refusal_role(parts: "ExpertFiles", p: ExpertPlan, row: Optional[dict], plans: list[ExpertPlan]) -> None:
    """A refusal expert has no parent and is nobody's parent (after the whole plan is applied)."""
    refuse = p.fields.get("refuse", bool(row.get("refuse")) if row is not None else False)
    parent = p.parent if p.parent is not ... else (row["parent"] if row is not None else None)
    try:
        check_refuse(refuse, parent)
    except InvalidInput as e:
        raise _err(p.file, f"refuse: {e}") from None
    if parent is not None:
        planned = {q.name: q for q in plans}
        q = planned.get(parent)
        prow = parts.catalog.by_name.get(parent)
        parent_refuses = (q.fields.get("refuse") if q is not None and "refuse" in q.fields
                          else bool(prow.get("refuse")) if prow is not None else False)
        if parent_refuses:
            raise _err(p.file, f"parent: {parent!r} is a refusal expert and cannot be a parent")


def apply_plan(parts: "ExpertFiles", plan: DirPlan) -> None:
    """Write a plan in one transaction (all files or none)."""
    todo = [p for p in plan.experts if p.action != "unchanged"]
    if not todo:
        return
    with parts.store.atomic():
        for p in todo:
            parent_id = ... if p.parent is ... else (None if p.parent is None else parts.store.experts.id_of(p.parent))
            if p.action == "created":
                f = p.fields
                eid = parts.store.experts.insert(p.name, f.get("description", ""), f.get("keywords", []),
                                             None if parent_id is ... else parent_id, f.get("metadata", {}),
                                             f.get("generator"), bool(f.get("refuse", False)))
            else:
                eid = parts.store.experts.id_of(p.name)
                fields = dict(p.fields)
                if "refuse" in fields:
                    fields["refuse"] = int(fields["refuse"])
                if parent_id is not ...:
                    fields["parent_id"] = parent_id
                parts.store.experts.update(eid, **fields)
            if p.remove_ids:
                parts.store.documents.delete(eid, p.remove_ids)
            if p.new_rows:
                parts.store.documents.insert(eid, p.new_rows, p.new_vectors, on_conflict="replace")
    parts.catalog.touch()


class ExpertFiles:
    """``apply_dir``: experts of one file created or updated from a folder of YAML files."""

    def __init__(self, store: Store, catalog: Catalog, experts: ExpertEditor):
        self.store = store
        self.catalog = catalog
        self.experts = experts

    def apply_dir(self, path: str, *, dry_run: bool = False) -> dict[str, Any]:
        """Create or update experts from a folder of YAML files (one expert per file).

        Idempotent: applying the same files twice changes nothing the second time. Every file is
        parsed and validated, and new passages embedded, before anything is written; the writes
        happen in one transaction. Returns ``{"created": [...], "updated": [...], "unchanged": [...],
        "details": {name: {...}}}``.
        """
        plan = plan_dir(self, path)
        if not dry_run:
            apply_plan(self, plan)
        return plan.report()
