"""Experts over time: split (k-means), merge, rename, and optimize (proposed merges, splits and a retrain,
each with its evidence).

Every public call that writes validates its input before the first write and changes the experts in one
short transaction, so a reader in another process sees the old experts or the new ones. The long work
runs with no write lock held, so other writers never wait on it: split's k-means reads one snapshot and the
transaction first checks that the expert did not change meanwhile (else it is computed again, up to
:data:`TRIES` times, then :class:`~moedb.errors.ConcurrentChange`); the gate is refitted after the commit by
:meth:`GateService.refit` (fitted with no lock held, stored in a short transaction of its own; until then a
route that sees the new experts fits it itself).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..engine.catalog import Catalog
from ..engine.experts import check_name
from ..engine.gate import GateService
from ..errors import ConcurrentChange, DuplicateExpert, InvalidInput
from ..routing.kmeans import choose_clusters, unit_rows
from ..store import Store
from .feedback import FeedbackService

TRIES = 3   # k-means runs of a split while another process keeps changing the expert


class Evolution:
    """Split, merge, rename and optimize the experts of one file."""

    def __init__(self, store: Store, catalog: Catalog, gate: GateService, feedback: FeedbackService):
        self.store = store
        self.catalog = catalog
        self.gate = gate
        self.feedback = feedback

    def split_expert(self, name: str, n: Optional[int] = None, *, names: Optional[Sequence[str]] = None,
                     max_n: Optional[int] = None, seed: int = 0) -> dict[str, Any]:
        """Split an expert by k-means over its document vectors (``n=None``: k by silhouette).

        Every document moves to exactly one child; children are named ``NAME/1``, ``NAME/2``…
        (the first free numbers) unless ``names`` are given, and take the original as parent,
        which stays as a pure parent without documents. Feedback on the original follows the
        child nearest to its query. k-means runs with no lock held; the gate is refitted after the
        commit. Returns ``{"expert", "n", "chosen_by", "silhouette", "children": [{"name", "size"}]}``.
        """
        for _ in range(TRIES):
            plan = self.plan_split(name, n, names, max_n, seed)   # k-means: no lock held
            try:
                with self.store.atomic():
                    out = self.apply_split(plan)
            except ConcurrentChange:
                continue
            self.gate.refit()
            return out
        raise ConcurrentChange(f"expert {name!r} kept changing while it was being split ({TRIES} tries); "
                               "nothing was written: run the split again")

    def split(self, name: str, n: Optional[int], names: Optional[Sequence[str]], max_n: Optional[int],
              seed: int) -> dict[str, Any]:
        """The document moves of :meth:`split_expert` without the refit (k-means, then one transaction)."""
        plan = self.plan_split(name, n, names, max_n, seed)
        with self.store.atomic():
            return self.apply_split(plan)

    def plan_split(self, name: str, n: Optional[int], names: Optional[Sequence[str]], max_n: Optional[int],
                   seed: int) -> dict[str, Any]:
        """Check a split and cluster the expert's documents (read from one snapshot; writes nothing)."""
        with self.store.snapshot():
            row = self.catalog.require(name)
            ids, X = self.catalog.expert_docs(row)
        if row.get("refuse"):
            raise InvalidInput(f"{name!r} is a refusal expert: it is not split (it has no children)")
        if names is not None:
            names = [check_name(x, "child name") for x in names]
            if n is not None and n != len(names):
                raise InvalidInput(f"n={n} but {len(names)} child names given")
            n = len(names)
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2):
            raise InvalidInput(f"n must be an integer >= 2, got {n!r}")
        if max_n is not None and (not isinstance(max_n, (int, np.integer)) or max_n < 2):
            raise InvalidInput(f"max_n must be an integer >= 2, got {max_n!r}")
        if len(ids) < 2:
            raise InvalidInput(f"expert {name!r} has {len(ids)} document(s); a split needs at least 2")
        if n is not None and n > len(ids):
            raise InvalidInput(f"cannot split {len(ids)} documents of {name!r} into {n} experts")
        labels, k, sil = choose_clusters(X, None if n is None else int(n), max_n, seed)
        groups = [j for j in range(k) if (labels == j).any()]
        child_names = list(names) if names is not None else self._free_child_names(name, len(groups))
        if len(set(child_names)) != len(child_names):
            raise InvalidInput("child names must be different")
        taken = [c for c in child_names if c in self.catalog.by_name]
        if taken:
            raise DuplicateExpert(f"expert {taken[0]!r} already exists")
        return {"row": row, "ids": ids, "X": X, "labels": labels, "groups": groups, "names": child_names,
                "silhouette": sil, "chosen_by": "given" if n is not None else "silhouette"}

    def apply_split(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Write a :meth:`plan_split` (call inside a write transaction); :class:`ConcurrentChange` if the
        expert changed since the plan read it."""
        row, ids, X, labels, groups = plan["row"], plan["ids"], plan["X"], plan["labels"], plan["groups"]
        self.catalog.refresh()
        now = self.catalog.by_name.get(row["name"])
        if now is None or now["id"] != row["id"] or now["version"] != row["version"]:
            raise ConcurrentChange(f"expert {row['name']!r} changed while it was being split; nothing was written")
        taken = [c for c in plan["names"] if c in self.catalog.by_name]
        if taken:
            raise DuplicateExpert(f"expert {taken[0]!r} already exists")
        children = []
        with self.store.atomic():
            for i, (cname, j) in enumerate(zip(plan["names"], groups)):
                members = labels == j
                desc = f"{row['description']} (part {i + 1} of {len(groups)})" if row["description"] else ""
                cid = self.store.experts.insert(cname, desc, list(row["keywords"]), row["id"],
                                               {"split_from": row["name"]}, row["generator"])
                self.store.documents.move(row["id"], cid, [int(x) for x in ids[members]])
                children.append((cname, cid, int(members.sum()), unit_rows(X[members].sum(axis=0, keepdims=True))[0]))
            fids, FV = self.store.feedback.of_expert(row["id"])
            if len(fids):
                C = np.stack([c[3] for c in children])
                nearest = np.argmax(FV @ C.T, axis=1)
                for j, c in enumerate(children):
                    self.store.feedback.set_expert(fids[nearest == j], c[1])
        self.catalog.touch()
        return {"expert": row["name"], "n": len(children), "chosen_by": plan["chosen_by"],
                "silhouette": plan["silhouette"], "children": [{"name": c[0], "size": c[2]} for c in children]}

    def _free_child_names(self, name: str, k: int) -> list[str]:
        out, i = [], 1
        while len(out) < k:
            cand = f"{name}/{i}"
            if cand not in self.catalog.by_name:
                out.append(cand)
            i += 1
        return out

    def merge_experts(self, names: Sequence[str], into: str, *, description: Optional[str] = None) -> dict[str, Any]:
        """Merge experts into ``into`` (an existing expert, possibly one of ``names``, or a new one).

        Documents are conserved (a clashing document id gets a ``~N`` suffix), feedback and
        logged choices of the merged experts are pointed at the target, their children move
        under it, and the centroid is updated in the same transaction; the gate is refitted after it.
        Returns ``{"into", "merged", "size", "moved": {"documents", "feedback", "log_choices"}, "created"}``.
        """
        with self.store.atomic():  # (cheap: moves rows; read and written in one transaction)
            out = self.merge(names, into, description)
        self.gate.refit()
        return out

    def merge(self, names: Sequence[str], into: str, description: Optional[str]) -> dict[str, Any]:
        """The document moves of :meth:`merge_experts` without the refit (the caller refits after its commit)."""
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise InvalidInput("names must be a non-empty list of expert names")
        check_name(into, "target name")
        rows = [self.catalog.require(x) for x in names]  # (first: a name that is not a string names no expert)
        if len(set(names)) != len(names):
            raise InvalidInput("an expert is named twice in the merge")
        roles = {bool(r.get("refuse")) for r in rows}
        if into in self.catalog.by_name:
            roles.add(bool(self.catalog.by_name[into].get("refuse")))
        if len(roles) > 1:
            raise InvalidInput("cannot merge refusal experts with experts that answer")
        sources = [r for r in rows if r["name"] != into]
        if not sources:
            raise InvalidInput(f"nothing to merge: the only expert given is the target {into!r}")
        target = self.catalog.by_name.get(into)
        gone = {r["id"] for r in sources}
        parent_of = {r["id"]: r["parent_id"] for r in self.catalog.rows}

        def alive_ancestor(pid: Optional[int]) -> Optional[int]:
            while pid is not None and pid in gone:
                pid = parent_of.get(pid)
            return pid

        if target is None:
            parents = {alive_ancestor(r["parent_id"]) for r in sources}
            new_parent = parents.pop() if len(parents) == 1 else None
        else:
            # if the target sits below a merged expert, lift it above the topmost one
            top, pid = None, target["parent_id"]
            while pid is not None:
                if pid in gone:
                    top = pid
                pid = parent_of.get(pid)
            new_parent = alive_ancestor(parent_of[top]) if top is not None else target["parent_id"]
        moved = {"documents": 0, "feedback": 0, "log_choices": 0}
        with self.store.atomic():
            if target is None:
                descs = [r["description"] for r in sources if r["description"]]
                kws: list[str] = []
                for r in sources:
                    kws += [k for k in r["keywords"] if k not in kws]
                gens = {str(r["generator"]) for r in sources}
                tid = self.store.experts.insert(
                    into, description if description is not None else "; ".join(dict.fromkeys(descs)), kws,
                    new_parent, {"merged_from": [r["name"] for r in sources]},
                    sources[0]["generator"] if len(gens) == 1 else None, bool(sources[0].get("refuse")))
            else:
                tid = target["id"]
                fields: dict[str, Any] = {}
                if new_parent != target["parent_id"]:
                    fields["parent_id"] = new_parent
                if description is not None:
                    fields["description"] = description
                if fields:
                    self.store.experts.update(tid, **fields)
            for r in sources:
                moved["documents"] += self.store.documents.move(r["id"], tid)
                nf, nc = self.store.reassign_references(r["id"], tid)
                moved["feedback"] += nf
                moved["log_choices"] += nc
                for child in self.store.experts.children(r["id"]):
                    if child != tid and child not in gone:
                        self.store.experts.update(child, parent_id=tid)
            for r in sources:
                self.store.experts.delete(r["id"])
            self.catalog.touch()
            size = self.catalog.require(into)["size"]
        return {"into": into, "merged": [r["name"] for r in sources], "size": size, "moved": moved,
                "created": target is None}

    def rename_expert(self, old: str, new: str) -> dict[str, Any]:
        """Rename an expert; its id, documents, children, feedback and log references stay."""
        row = self.catalog.require(old)
        check_name(new, "new name")
        if new != old:
            self.store.experts.update(row["id"], name=new)
            self.catalog.touch()
        return {"old": old, "new": new, "id": row["id"]}

    def optimize(self, apply: bool = False, *, merge_similarity: float = 0.95, confusion_ratio: float = 0.5,
                 confusion_rate: float = 0.3, min_confused: int = 10, incoherence: float = 2.0, overload: float = 2.0,
                 min_load: int = 50, min_split_size: int = 8, min_silhouette: float = 0.1,
                 seed: int = 0) -> dict[str, Any]:
        """Propose merges, splits and a retrain, each with the evidence behind it.

        - merge: two experts whose centroids have cosine >= ``merge_similarity``, or that the
          log shows the router confusing (second confidence >= ``confusion_ratio`` x the first
          on at least ``min_confused`` routes and ``confusion_rate`` of their combined top routes);
        - split: an incoherent expert (its spread, 1 - mean cosine of its documents to its
          centroid, is >= ``incoherence`` x the median expert's) or an overloaded one (top-route
          share >= ``overload`` x the even share, once the log holds ``min_load`` top routes),
          with at least ``min_split_size`` documents, whose k-means split reaches a silhouette
          >= ``min_silhouette``;
        - retrain: feedback arrived since the last retrain.

        ``apply=True`` carries the merges and splits out in one transaction, then refits (or retrains).
        Returns ``{"proposals": [{"action", ..., "reason", "evidence"}], "applied", "results"}``.
        """
        self.catalog.refresh()
        leaves = self.catalog.answering()
        proposals: list[dict[str, Any]] = []
        load = self.store.loads.by_expert(None, None)
        tops = {r["id"]: int(load.get(r["id"], {}).get("top", 0)) for r in leaves}
        used: set[int] = set()
        if len(leaves) >= 2:
            C = unit_rows(np.stack([r["vec_sum"] for r in leaves]).astype(np.float32))
            S = C @ C.T
            confused: dict[tuple[int, int], int] = {}
            for a, b, c in self.store.loads.confused_pairs(confusion_ratio):
                key = (min(a, b), max(a, b))
                confused[key] = confused.get(key, 0) + c
            cands = []
            for i in range(len(leaves)):
                for j in range(i + 1, len(leaves)):
                    a, b = leaves[i], leaves[j]
                    nc = confused.get((min(a["id"], b["id"]), max(a["id"], b["id"])), 0)
                    both = tops[a["id"]] + tops[b["id"]]
                    rate = nc / both if both else 0.0
                    close = S[i, j] >= merge_similarity
                    mixed = nc >= min_confused and rate >= confusion_rate
                    if close or mixed:
                        cands.append((max(S[i, j], rate), a, b, float(S[i, j]), nc, rate, close, mixed))
            cands.sort(key=lambda c: -c[0])
            for _, a, b, sim, nc, rate, close, mixed in cands:
                if a["id"] in used or b["id"] in used:
                    continue
                used |= {a["id"], b["id"]}
                big, small = sorted((a, b), key=lambda r: (-r["size"], -tops[r["id"]], r["id"]))
                why = []
                if close:
                    why.append(f"centroid cosine {sim:.3f} >= {merge_similarity}")
                if mixed:
                    why.append(f"router nearly tied between them on {nc} routes ({rate:.0%} of their load)")
                proposals.append({"action": "merge", "experts": [big["name"], small["name"]], "into": big["name"],
                                  "reason": "; ".join(why),
                                  "evidence": {"centroid_cosine": sim, "confused_routes": nc, "confusion_rate": rate,
                                               "sizes": [big["size"], small["size"]]}})
        if leaves:
            coh = {r["id"]: float(np.linalg.norm(r["vec_sum"]) / r["size"]) for r in leaves}
            median = float(np.median(list(coh.values())))
            total_top = sum(tops.values())
            even = 1.0 / len(leaves)
            for r in leaves:
                if r["id"] in used or r["size"] < min_split_size:
                    continue
                share = tops[r["id"]] / total_top if total_top else 0.0
                incoherent = len(leaves) > 1 and 1.0 - coh[r["id"]] >= incoherence * (1.0 - median)
                overloaded = total_top >= min_load and share >= overload * even and len(leaves) > 1
                if not (incoherent or overloaded):
                    continue
                _, X = self.catalog.expert_docs(r)
                _, k, sil = choose_clusters(X, None, None, seed)
                best = max(sil.values()) if sil else None
                if best is None or best < min_silhouette:
                    continue
                why = []
                if incoherent:
                    why.append(f"spread {1 - coh[r['id']]:.3f} is {(1 - coh[r['id']]) / max(1 - median, 1e-9):.1f}x "
                               f"the median expert's {1 - median:.3f}")
                if overloaded:
                    why.append(f"takes {share:.0%} of routes ({share / even:.1f}x an even share)")
                why.append(f"k-means finds {k} groups (silhouette {best:.3f})")
                proposals.append({"action": "split", "expert": r["name"], "n": k, "reason": "; ".join(why),
                                  "evidence": {"coherence": coh[r["id"]], "median_coherence": median,
                                               "share": share, "even_share": even, "silhouette": sil}})
        last = self.store.feedback.last_retrain()
        new_fb = self.store.feedback.count(last["feedback_max"] if last else 0)
        if new_fb:
            proposals.append({"action": "retrain", "reason": f"{new_fb} feedback event(s) since the last retrain",
                              "evidence": {"new_feedback": new_fb, "last_retrain": last["ts"] if last else None}})
        results: list[dict[str, Any]] = []
        if apply and proposals:
            # k-means of every split first (no lock held), then every change in one short transaction
            plans = {i: self.plan_split(p["expert"], p["n"], None, None, seed)
                     for i, p in enumerate(proposals) if p["action"] == "split"}
            with self.store.atomic():
                for i, p in enumerate(proposals):
                    if p["action"] == "merge":
                        results.append(self.merge(p["experts"], p["into"], None))
                    elif p["action"] == "split":
                        results.append(self.apply_split(plans[i]))
            self.catalog.touch()
            if any(p["action"] == "retrain" for p in proposals):
                results.append(self.feedback.retrain())
            else:
                self.gate.refit()
        return {"proposals": proposals, "applied": bool(apply and proposals), "results": results}
