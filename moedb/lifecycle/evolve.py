"""Experts over time: split (k-means), merge, rename, and optimize (proposed merges, splits and a retrain,
each with its evidence).

Every public call that writes runs in one transaction, validates its input before the first write, and
refits the gate in the same transaction, so a reader in another process sees the old experts and gate or
the new ones.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..engine.catalog import Catalog
from ..engine.experts import check_name
from ..engine.gate import GateService
from ..errors import DuplicateExpert, InvalidInput
from ..routing.kmeans import choose_clusters, unit_rows
from ..store import Store
from .feedback import FeedbackService


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
        child nearest to its query. The gate is refitted in the same transaction. Returns
        ``{"expert", "n", "chosen_by", "silhouette", "children": [{"name", "size"}]}``.
        """
        with self.store.atomic():
            out = self.split(name, n, names, max_n, seed)
            self.gate.refit()
        return out

    def split(self, name: str, n: Optional[int], names: Optional[Sequence[str]], max_n: Optional[int],
               seed: int) -> dict[str, Any]:
        """The document moves of :meth:`split_expert` without the refit (the caller refits in its transaction)."""
        row = self.catalog.require(name)
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
        ids, X = self.catalog.expert_docs(row)
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
        children = []
        with self.store.atomic():
            for i, (cname, j) in enumerate(zip(child_names, groups)):
                members = labels == j
                desc = f"{row['description']} (part {i + 1} of {len(groups)})" if row["description"] else ""
                cid = self.store.experts.insert(cname, desc, list(row["keywords"]), row["id"],
                                               {"split_from": name}, row["generator"])
                self.store.documents.move(row["id"], cid, [int(x) for x in ids[members]])
                children.append((cname, cid, int(members.sum()), unit_rows(X[members].sum(axis=0, keepdims=True))[0]))
            fids, FV = self.store.feedback.of_expert(row["id"])
            if len(fids):
                C = np.stack([c[3] for c in children])
                nearest = np.argmax(FV @ C.T, axis=1)
                for j, c in enumerate(children):
                    self.store.feedback.set_expert(fids[nearest == j], c[1])
        self.catalog.touch()
        return {"expert": name, "n": len(children), "chosen_by": "given" if n is not None else "silhouette",
                "silhouette": sil, "children": [{"name": c[0], "size": c[2]} for c in children]}

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
        under it, and the centroid and gate are updated in the same transaction. Returns ``{"into", "merged", "size",
        "moved": {"documents", "feedback", "log_choices"}, "created"}``.
        """
        with self.store.atomic():
            out = self.merge(names, into, description)
            self.gate.refit()
        return out

    def merge(self, names: Sequence[str], into: str, description: Optional[str]) -> dict[str, Any]:
        """The document moves of :meth:`merge_experts` without the refit (the caller refits in its transaction)."""
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise InvalidInput("names must be a non-empty list of expert names")
        check_name(into, "target name")
        if len(set(names)) != len(names):
            raise InvalidInput("an expert is named twice in the merge")
        rows = [self.catalog.require(x) for x in names]
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

        ``apply=True`` carries the whole plan out in one transaction. Returns ``{"proposals":
        [{"action", ..., "reason", "evidence"}], "applied", "results"}``.
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
            with self.store.atomic():
                for p in proposals:
                    if p["action"] == "merge":
                        results.append(self.merge(p["experts"], p["into"], None))
                    elif p["action"] == "split":
                        results.append(self.split(p["expert"], p["n"], None, None, seed))
                if any(p["action"] == "retrain" for p in proposals):
                    results.append(self.feedback.retrain())
                else:
                    self.catalog.touch()
                    self.gate.refit()
        return {"proposals": proposals, "applied": bool(apply and proposals), "results": results}
