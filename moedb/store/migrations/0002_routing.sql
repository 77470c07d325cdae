-- moedb schema v2 (routing): the fitted gate and indexes, and the load-balancing state.

-- Fitted routing artefacts (the gate, hnswlib indexes), each one row written in one statement, so a
-- reader sees either the old or the new version. `key` identifies what it was fitted on.
CREATE TABLE routing_state (
    name       TEXT PRIMARY KEY,          -- 'gate', 'ann:centroids', 'ann:docs:<expert id>'
    key        TEXT NOT NULL,             -- fingerprint of the experts/documents it reflects
    data       BLOB NOT NULL,             -- .npz of plain arrays, or an hnswlib index
    figures    TEXT NOT NULL DEFAULT '{}',-- JSON: fit figures, ef, labels count, ...
    updated_at REAL NOT NULL
);

-- Load balancing: a selection bias per expert (never added to reported confidences), cumulative
-- observed and expected load, and the selections in the current capacity window.
CREATE TABLE routing_balance (
    expert_id    INTEGER PRIMARY KEY REFERENCES experts(id) ON DELETE CASCADE,
    bias         REAL NOT NULL DEFAULT 0,
    load         REAL NOT NULL DEFAULT 0,
    expected     REAL NOT NULL DEFAULT 0,
    window_start REAL NOT NULL DEFAULT 0,
    window_count INTEGER NOT NULL DEFAULT 0,
    updated_at   REAL NOT NULL DEFAULT 0
);
