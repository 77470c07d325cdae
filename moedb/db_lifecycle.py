"""SQL of the lifecycle area; mixed into :class:`moedb.db.Store` (all SQL stays in the store).

Feedback events, retrain history, moving log references between experts, and the aggregates
behind load analytics (every aggregate runs in SQL on covering indexes, see 0003_lifecycle.sql).
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Optional, Sequence

import numpy as np

F4 = np.dtype("<f4")
# feedback whose query text can be re-embedded ("<vector>" stands for a query routed as a vector)
_FB_TEXT = "query IS NOT NULL AND query != '' AND query != '<vector>'"


def _window(col: str, since: Optional[float], until: Optional[float]) -> tuple[str, list]:
    """``AND``-able SQL condition on a time column (``since <= col < until``) and its parameters."""
    parts, params = [], []
    if since is not None:
        parts.append(f"{col} >= ?")
        params.append(float(since))
    if until is not None:
        parts.append(f"{col} < ?")
        params.append(float(until))
    return (" AND ".join(parts) if parts else "1"), params


def _matrix(blobs: Sequence[bytes]) -> np.ndarray:
    """Stack ``<f4`` blobs into a float32 matrix ``(n, d)`` (``(0, 0)`` when empty)."""
    if not blobs:
        return np.zeros((0, 0), np.float32)
    return np.frombuffer(b"".join(blobs), dtype=F4).reshape(len(blobs), -1).astype(np.float32)


class LifecycleSQL:
    """Store methods for lifecycle: feedback, retrain runs, log references, load aggregates."""

    # ------------------------------------------------------------------ feedback
    def feedback_keys_present(self, keys: Sequence[str]) -> set[str]:
        """The subset of ``keys`` already stored as feedback event keys."""
        found: set[str] = set()
        keys = list(keys)
        for s in range(0, len(keys), 500):
            chunk = keys[s:s + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.q(f"SELECT event_key FROM feedback WHERE event_key IN ({marks})", chunk))
        return found

    def insert_feedback(self, rows: Sequence[tuple]) -> int:
        """Insert feedback rows in one transaction; returns how many were new.

        Each row: ``(event_key, query_id, query, query_vec <f4 bytes|None, expert_id, reward, ts,
        bucket, source)``. A key already present is left alone (``INSERT OR IGNORE``).
        """
        now = time.time()
        n = 0
        with self.atomic():
            if any(r[3] is not None for r in rows):
                self.check_embedder()
            for r in rows:
                self.conn.execute(
                    "INSERT OR IGNORE INTO feedback(event_key, query_id, query, query_vec, expert_id, reward, ts, "
                    "bucket, source, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)", (*r, now))
                n += self.conn.changes()
        return n

    def logged_queries(self, query_ids: Sequence[int]) -> dict[int, tuple[str, Optional[bytes]]]:
        """``{query_id: (query text, query_vec bytes or None)}`` for the ids present in the log."""
        out: dict[int, tuple[str, Optional[bytes]]] = {}
        ids = [int(i) for i in query_ids]
        for s in range(0, len(ids), 500):
            chunk = ids[s:s + 500]
            marks = ",".join("?" * len(chunk))
            for qid, text, vec in self.q(f"SELECT id, query, query_vec FROM query_log WHERE id IN ({marks})", chunk):
                out[qid] = (text, vec)
        return out

    def feedback_rows(self, heldout: Optional[bool], cut: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Usable feedback of live experts: ``(row ids (m,), vectors (m, d), expert ids (m,), rewards (m,))``.

        ``heldout=True`` keeps rows with ``bucket < cut``, ``False`` those with ``bucket >= cut``,
        ``None`` all of them.
        """
        cond = {True: "AND f.bucket < ?", False: "AND f.bucket >= ?", None: ""}[heldout]
        params = [cut] if heldout is not None else []
        rows = self.q(
            "SELECT f.id, f.query_vec, f.expert_id, f.reward FROM feedback f JOIN experts e ON e.id = f.expert_id "
            f"WHERE f.query_vec IS NOT NULL {cond} ORDER BY f.id", params)
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        vecs = _matrix([r[1] for r in rows])
        eids = np.fromiter((r[2] for r in rows), np.int64, len(rows))
        rewards = np.fromiter((r[3] for r in rows), np.float64, len(rows))
        return ids, vecs, eids, rewards

    def feedback_usable_count(self) -> int:
        """Feedback rows with a vector whose expert still exists (what the gate can learn from)."""
        return self.q1("SELECT count(*) FROM feedback f JOIN experts e ON e.id = f.expert_id "
                       "WHERE f.query_vec IS NOT NULL")[0]

    def feedback_count(self, since_id: int = 0) -> int:
        return self.q1("SELECT count(*) FROM feedback WHERE id > ?", (since_id,))[0]

    def feedback_max_id(self) -> int:
        return self.q1("SELECT coalesce(max(id), 0) FROM feedback")[0]

    def feedback_of_expert(self, expert_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Feedback of one expert that carries a vector: ``(row ids (m,), vectors (m, d))``."""
        rows = self.q("SELECT id, query_vec FROM feedback WHERE expert_id=? AND query_vec IS NOT NULL ORDER BY id",
                      (expert_id,))
        return np.fromiter((r[0] for r in rows), np.int64, len(rows)), _matrix([r[1] for r in rows])

    def set_feedback_expert(self, feedback_ids: Sequence[int], expert_id: int) -> None:
        with self.atomic():
            self.conn.executemany("UPDATE feedback SET expert_id=? WHERE id=?",
                                  [(expert_id, int(i)) for i in feedback_ids])

    def reassign_references(self, from_id: int, to_id: int) -> tuple[int, int]:
        """Point feedback and logged choices of one expert at another; returns ``(feedback, choices)`` moved."""
        with self.atomic():
            self.conn.execute("UPDATE feedback SET expert_id=? WHERE expert_id=?", (to_id, from_id))
            nf = self.conn.changes()
            self.conn.execute("UPDATE query_choices SET expert_id=? WHERE expert_id=?", (to_id, from_id))
            nc = self.conn.changes()
        return nf, nc

    # ------------------------------------------------------------------ retrain runs
    def record_retrain(self, feedback_max: int, figures: dict[str, Any]) -> int:
        with self.atomic():
            self.conn.execute("INSERT INTO retrain_runs(ts, feedback_max, figures) VALUES (?,?,?)",
                              (time.time(), int(feedback_max), json.dumps(figures, sort_keys=True)))
            return self.conn.last_insert_rowid()

    def last_retrain(self) -> Optional[dict[str, Any]]:
        r = self.q1("SELECT id, ts, feedback_max, figures FROM retrain_runs ORDER BY id DESC LIMIT 1")
        if r is None:
            return None
        return {"id": r[0], "ts": r[1], "feedback_max": r[2], "figures": json.loads(r[3])}

    # ------------------------------------------------------------------ load aggregates
    def log_summary(self, since: Optional[float], until: Optional[float]) -> dict[str, Any]:
        """Totals over the window: queries, abstentions, first and last time."""
        w, p = _window("ts", since, until)
        n, abst, t0, t1 = self.q1(
            f"SELECT count(*), coalesce(sum(abstained), 0), min(ts), max(ts) FROM query_log WHERE {w}", p)
        return {"queries": n, "abstained": abst, "first": t0, "last": t1}

    def selections_by_expert(self, since: Optional[float], until: Optional[float]) -> dict[int, int]:
        """Per expert id: how many times routes chose it at any rank."""
        if since is None and until is None:
            return dict(self.q("SELECT expert_id, count(*) FROM query_choices GROUP BY expert_id"))
        w, p = _window("l.ts", since, until)
        return dict(self.q("SELECT c.expert_id, count(*) FROM query_log l CROSS JOIN query_choices c "
                           f"ON c.query_id = l.id WHERE {w} GROUP BY c.expert_id", p))

    def top_load(self, since: Optional[float], until: Optional[float], start: float,
                 width: float) -> list[tuple[int, int, int, float]]:
        """``(expert id, bucket, routes where it ranked first, sum of its confidence there)`` with
        bucket ``floor((ts - start) / width)``: one index-only pass over the window."""
        w, p = _window("l.ts", since, until)
        return self.q(
            "SELECT c.expert_id, CAST((l.ts - ?) / ? AS INTEGER) b, count(*), sum(c.confidence) "
            "FROM query_log l INDEXED BY query_log_ts_cover CROSS JOIN query_choices c "
            f"ON c.query_id = l.id AND c.rank = 0 WHERE {w} GROUP BY c.expert_id, b",
            [float(start), float(width), *p])

    def abstentions_over_time(self, since: Optional[float], until: Optional[float], start: float,
                              width: float) -> list[tuple[int, int]]:
        """``(bucket, abstained routes)`` over the window."""
        w, p = _window("ts", since, until)
        return self.q(f"SELECT CAST((ts - ?) / ? AS INTEGER) b, count(*) FROM query_log WHERE abstained = 1 AND {w} "
                      "GROUP BY b", [float(start), float(width), *p])

    def load_by_expert(self, since: Optional[float], until: Optional[float]) -> dict[int, dict[str, float]]:
        """Per expert id: ``top`` (routes where it ranked first), ``mean_confidence`` there."""
        if since is None and until is None:
            rows = self.q("SELECT expert_id, count(*), avg(confidence) FROM query_choices WHERE rank=0 "
                          "GROUP BY expert_id")
        else:
            w, p = _window("l.ts", since, until)
            rows = self.q("SELECT c.expert_id, count(*), avg(c.confidence) FROM query_log l CROSS JOIN query_choices c "
                          f"ON c.query_id = l.id AND c.rank = 0 WHERE {w} GROUP BY c.expert_id", p)
        return {eid: {"top": n, "mean_confidence": conf} for eid, n, conf in rows}

    def latency_percentiles(self, since: Optional[float], until: Optional[float], n: int,
                            ps: Sequence[float] = (0.5, 0.95),
                            res: int = 64) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        """Exact nearest-rank latency percentiles (the value at sorted position ``floor(p * (n - 1))``),
        overall and per top-ranked expert id; ``n`` is the number of routes in the window.

        Without a window the overall figures are walks of the latency index. Otherwise, and per
        expert, two passes that never sort the window: a histogram over log-latency brackets
        (``floor(ln(ms) * res)``, monotone in the latency) locates the bracket holding each rank,
        then only the rows of those brackets are read, through the latency index, to pick the
        exact value. Returns ``({"p50": ms, ...}, {expert_id: {"p50": ms, ...}})``.
        """
        names = [f"p{int(round(q * 100))}" for q in ps]
        w, p = _window("l.ts", since, until)
        bracket = (f"CASE WHEN l.latency_ms > 0 THEN CAST(floor(ln(l.latency_ms) * {int(res)}) AS INTEGER) "
                   "ELSE -1000000 END")
        # the log side in time order through its covering index: index-only (log rows carry query
        # vectors and are large) and the choices lookups arrive in query-id order
        log = "FROM query_log l INDEXED BY query_log_ts_cover"
        join = "CROSS JOIN query_choices c ON c.query_id = l.id AND c.rank = 0"
        hist: dict[Optional[int], list[tuple[int, int]]] = {}
        for eid, h, cnt in self.q(f"SELECT c.expert_id, {bracket} h, count(*) {log} {join} WHERE {w} "
                                  "GROUP BY c.expert_id, h", p):
            hist.setdefault(eid, []).append((h, cnt))
        overall: dict[str, Optional[float]] = {k: None for k in names}
        if n and not p:
            for name, q in zip(names, ps):
                overall[name] = self.q1("SELECT latency_ms FROM query_log ORDER BY latency_ms LIMIT 1 OFFSET ?",
                                        (int(q * (n - 1)),))[0]
        elif n:
            hist[None] = self.q(f"SELECT {bracket} h, count(*) {log} WHERE {w} GROUP BY h", p)
        want: dict[tuple[Optional[int], int], list[tuple[int, str]]] = {}   # (expert, bracket) -> [(rank, name)]
        for key, hs in hist.items():
            hs.sort()
            total = sum(c for _, c in hs)
            for name, q in zip(names, ps):
                k, seen = int(q * (total - 1)), 0
                for h, c in hs:
                    if k < seen + c:
                        want.setdefault((key, h), []).append((k - seen, name))
                        break
                    seen += c
        vals: dict[tuple[Optional[int], int], list[float]] = {k: [] for k in want}
        for part, keyed in ((f"{join}", True), ("", False)):
            brackets = sorted({h for (key, h) in want if (key is not None) == keyed})
            if not brackets:
                continue
            # the rows whose latency falls in a wanted bracket (ranges widened a hair; the bracket
            # expression itself decides membership), read through the latency index
            ranges: list[list[float]] = []
            for h in brackets:
                lo_, hi_ = (-math.inf, 0.0) if h == -1000000 else (math.exp(h / res) * (1 - 1e-9),
                                                                   math.exp((h + 1) / res) * (1 + 1e-9))
                if ranges and lo_ <= ranges[-1][1]:
                    ranges[-1][1] = max(ranges[-1][1], hi_)
                else:
                    ranges.append([lo_, hi_])
            cond = " OR ".join("(l.latency_ms >= ? AND l.latency_ms <= ?)" for _ in ranges)
            who = "c.expert_id" if keyed else "NULL"
            for eid, h, x in self.q(f"SELECT {who}, {bracket} h, l.latency_ms FROM query_log l {part} "
                                    f"WHERE ({cond}) AND {w}", [v for r in ranges for v in r] + p):
                if (eid, h) in vals:
                    vals[(eid, h)].append(x)
        per: dict[int, dict[str, float]] = {eid: {} for eid in hist if eid is not None}
        for (key, h), picks in want.items():
            xs = sorted(vals[(key, h)])
            for r, name in picks:
                (overall if key is None else per[key])[name] = xs[r]
        return overall, per

    def feedback_by_expert(self, since: Optional[float], until: Optional[float]) -> dict[int, dict[str, float]]:
        """Per expert id: feedback events, good (reward > 0), bad (reward < 0), mean reward."""
        w, p = _window("ts", since, until)
        return {eid: {"events": n, "good": g, "bad": b, "mean_reward": m} for eid, n, g, b, m in self.q(
            "SELECT expert_id, count(*), sum(reward > 0), sum(reward < 0), avg(reward) FROM feedback "
            f"WHERE {w} GROUP BY expert_id", p)}

    def confused_pairs(self, ratio: float) -> list[tuple[int, int, int]]:
        """``(first expert id, second expert id, routes)`` where the second confidence of a logged
        route is at least ``ratio`` times the first (the router could hardly tell them apart)."""
        return self.q(
            "SELECT a.expert_id, b.expert_id, count(*) FROM query_choices a JOIN query_choices b "
            "ON b.query_id = a.query_id AND b.rank = 1 WHERE a.rank = 0 AND b.confidence >= ? * a.confidence "
            "GROUP BY a.expert_id, b.expert_id", (float(ratio),))

    # ------------------------------------------------------------------ a new embedder for the whole file
    def texts_to_embed(self) -> tuple[list[tuple[int, int, str]], list[tuple[int, str]]]:
        """``([(rowid, expert_id, text)] of every document, [(feedback id, query)] of feedback with text)``."""
        docs = [(r[0], r[1], r[2]) for r in self.q("SELECT id, expert_id, text FROM documents ORDER BY id")]
        fb = [(r[0], r[1]) for r in self.q(f"SELECT id, query FROM feedback WHERE {_FB_TEXT} ORDER BY id")]
        return docs, fb

    def document_vectors(self, rowids: Sequence[int], dim: int) -> np.ndarray:
        """The stored vectors ``(len(rowids), dim)`` float32 of these documents, in that order."""
        out = np.zeros((len(rowids), dim), dtype=np.float32)
        pos = {int(r): i for i, r in enumerate(rowids)}
        for rid, emb in self.q("SELECT id, embedding FROM documents"):
            i = pos.get(rid)
            if i is not None:
                out[i] = np.frombuffer(emb, dtype=F4)
        return out

    def replace_embeddings(self, doc_vecs: dict[int, tuple[str, bytes]], tuned: set[int],
                           fb_vecs: dict[int, tuple[str, bytes]], record: dict[str, Any], embed: Any,
                           expect: Optional[dict[str, Any]] = None) -> dict[str, int]:
        """Switch the whole file to a new embedder in one transaction.

        ``doc_vecs`` / ``fb_vecs``: ``(text, new <f4 bytes)`` by document row id / feedback id, computed
        before the transaction; rows added since then (or whose text changed: a reused row id) are
        embedded here with ``embed(texts) -> (n, d)``. ``tuned``: row ids of the documents that trained the
        embedder (``documents.tuned = 1``; a row whose text changed since is not one of them).
        ``expect``: the embedder record the caller started from; another one now (a concurrent tune)
        raises EmbedderMismatch and nothing changes.
        Every expert's sum is recomputed (its version moves, so gates and indexes refit), feedback
        without query text loses its vector (it cannot be re-embedded), the query log's vectors are
        cleared, fitted routing state is dropped, and ``record`` becomes the file's embedder.
        """
        from .errors import EmbedderMismatch

        with self.atomic():
            if expect is not None and self.get_meta("embedder") != expect:
                raise EmbedderMismatch("another process changed this file's embedder during the tune; nothing "
                                       "was changed (run the tune again)")
            docs, fb = self.texts_to_embed()
            fresh = {rid for rid, _, t in docs if rid in doc_vecs and doc_vecs[rid][0] == t}
            late = [(rid, t) for rid, _, t in docs if rid not in fresh]
            late_fb = [(fid, t) for fid, t in fb if fid not in fb_vecs or fb_vecs[fid][0] != t]
            new: dict[int, bytes] = {rid: doc_vecs[rid][1] for rid in fresh}
            new_fb: dict[int, bytes] = {fid: v for fid, (t, v) in fb_vecs.items()}
            if late or late_fb:
                v = np.asarray(embed([t for _, t in late] + [t for _, t in late_fb]), dtype=F4)
                new.update({rid: v[i].tobytes() for i, (rid, _) in enumerate(late)})
                new_fb.update({fid: v[len(late) + i].tobytes() for i, (fid, _) in enumerate(late_fb)})
            self.conn.executemany("UPDATE documents SET embedding=?, tuned=? WHERE id=?",
                                  [(new[rid], int(rid in tuned and rid in fresh), rid) for rid, _, _ in docs])
            for (eid,) in self.q("SELECT id FROM experts"):
                self.recompute_sum(eid)
            have = {fid for fid, _ in fb}
            dropped = self.q1(f"SELECT COUNT(*) FROM feedback WHERE query_vec IS NOT NULL AND NOT ({_FB_TEXT})")[0]
            self.conn.execute(f"UPDATE feedback SET query_vec=NULL WHERE NOT ({_FB_TEXT})")
            self.conn.executemany("UPDATE feedback SET query_vec=? WHERE id=?",
                                  [(new_fb[fid], fid) for fid in have])
            cleared = self.q1("SELECT COUNT(*) FROM query_log WHERE query_vec IS NOT NULL")[0]
            self.conn.execute("UPDATE query_log SET query_vec=NULL WHERE query_vec IS NOT NULL")
            self.conn.execute("DELETE FROM routing_state")
            self.set_meta("embedder", record)
        return {"documents": len(docs), "embedded_late": len(late) + len(late_fb), "feedback": len(have),
                "feedback_dropped": int(dropped), "log_vectors_cleared": int(cleared)}
