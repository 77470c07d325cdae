"""Expert hierarchy: the tree, parent centroids derived from children, and beam search (NumPy only)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from .kmeans import kmeans


class Tree:
    """A forest over expert ids. A parent link that would close a cycle or points to an unknown id is cut
    (the node becomes a root), so a damaged file can still be routed.

    ``children_`` ``{id: [child ids]}`` (key ``None`` = roots), ``parent_`` ``{id: parent id or None}``.
    """

    def __init__(self, ids: Sequence[int], parents: Sequence[Optional[int]]):
        known = set(int(i) for i in ids)
        self.ids = [int(i) for i in ids]
        self.parent_: dict[int, Optional[int]] = {}
        raw = {int(i): (int(p) if p is not None and int(p) in known else None) for i, p in zip(ids, parents)}
        for i in self.ids:
            # walk up; if we come back to i the link closes a cycle: cut it
            seen, node = {i}, raw[i]
            while node is not None and node not in seen:
                seen.add(node)
                node = raw[node]
            self.parent_[i] = None if node is not None else raw[i]
        self.children_: dict[Optional[int], list[int]] = {}
        for i in self.ids:
            self.children_.setdefault(self.parent_[i], []).append(i)

    def path(self, i: int) -> list[int]:
        """Ids from the root down to ``i``."""
        out = [i]
        while self.parent_.get(out[-1]) is not None:
            out.append(self.parent_[out[-1]])
        return out[::-1]

    def subtree(self, i: int) -> list[int]:
        """``i`` and all its descendants."""
        out, stack = [], [i]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(self.children_.get(n, []))
        return out

    def depth(self) -> int:
        return max((len(self.path(i)) for i in self.ids), default=0)

    def has_structure(self) -> bool:
        if not hasattr(self, "_structured"):
            self._structured = any(p is not None for p in self.parent_.values())
        return self._structured


def parent_centroids(rows: list[dict]) -> None:
    """Give every expert without documents but with documents below it the centroid of its subtree.

    ``rows``: expert dicts with ``id``, ``parent_id``, ``size``, ``vec_sum`` (``(d,)`` or None) and
    ``centroid``; a pure parent's ``centroid`` becomes ``sum of descendants' vec_sum / their size``
    ``(d,)`` float32 (cycles are cut as in :class:`Tree`).
    """
    if not any(r.get("parent_id") is not None for r in rows):
        return
    tree = Tree([r["id"] for r in rows], [r.get("parent_id") for r in rows])
    by_id = {r["id"]: r for r in rows}
    for r in rows:
        if r["size"] or not tree.children_.get(r["id"]):
            continue
        members = [by_id[i] for i in tree.subtree(r["id"]) if by_id[i]["size"]]
        n = sum(m["size"] for m in members)
        if n:
            c = (sum(m["vec_sum"] for m in members) / n).astype(np.float32)
            c.flags.writeable = False
            r["centroid"] = c


def node_centroids(tree: Tree, leaf_centroids: dict[int, np.ndarray], k: int = 8, seed: int = 0
                   ) -> dict[int, np.ndarray]:
    """Centroids ``(k', d)`` of every node that has routable descendants, derived from its children:
    spherical k-means over the centroids of the routable experts in its subtree (a leaf keeps its own).
    ``leaf_centroids[id]``: the expert's own centroids ``(m, d)`` (only routable experts)."""
    out: dict[int, np.ndarray] = {}
    for i in tree.ids:
        parts = [leaf_centroids[j] for j in tree.subtree(i) if j in leaf_centroids]
        if not parts:
            continue
        if len(parts) == 1 and i in leaf_centroids:
            out[i] = parts[0]
            continue
        out[i] = kmeans(np.concatenate(parts), k, seed=seed + i)[1]
    return out


def beam_candidates(tree: Tree, node_score: Callable[[list[int]], np.ndarray], routable: set[int], beam: int
                    ) -> tuple[list[int], list[int]]:
    """Routable experts reached by a beam of width ``beam`` over the tree, and the nodes scored.

    ``node_score(ids) -> (len(ids),)``: score of each node for the query (higher is better). At each
    level the ``beam`` best nodes among the frontier are kept; a kept node contributes itself when it is
    routable and its children to the next frontier. Nodes without routable descendants are skipped.
    """
    frontier = list(tree.children_.get(None, []))
    cands: list[int] = []
    scored: list[int] = []
    while frontier:
        s = np.asarray(node_score(frontier), dtype=np.float64)
        scored += frontier
        keep = [frontier[j] for j in np.argsort(-s, kind="stable")[:beam] if np.isfinite(s[j])]
        # leaves at this level are cheap to keep: a leaf is one expert, beam only prunes subtrees
        for j, n in enumerate(frontier):
            if n in routable and not tree.children_.get(n) and np.isfinite(s[j]) and n not in keep:
                keep.append(n)
        frontier = []
        for n in keep:
            if n in routable:
                cands.append(n)
            frontier += tree.children_.get(n, [])
    return cands, scored
