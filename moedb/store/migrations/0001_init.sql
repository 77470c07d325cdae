-- moedb schema v1: experts, documents, query log.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE experts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    keywords    TEXT NOT NULL DEFAULT '[]',      -- JSON list of strings
    parent_id   INTEGER REFERENCES experts(id) ON DELETE SET NULL,
    metadata    TEXT NOT NULL DEFAULT '{}',      -- JSON object
    generator   TEXT,                            -- JSON object or NULL (database default)
    n_docs      INTEGER NOT NULL DEFAULT 0,
    vec_sum     BLOB,                            -- <f8 sum of member vectors (incremental centroid)
    version     INTEGER NOT NULL DEFAULT 0,      -- bumped on every change of documents
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX experts_parent ON experts(parent_id);

CREATE TABLE documents (
    id         INTEGER PRIMARY KEY,
    expert_id  INTEGER NOT NULL REFERENCES experts(id) ON DELETE CASCADE,
    doc_id     TEXT NOT NULL,
    text       TEXT NOT NULL,
    metadata   TEXT NOT NULL DEFAULT '{}',
    source     TEXT,
    position   INTEGER,
    embedding  BLOB NOT NULL,                    -- <f4, L2-normalised, length = meta.dim
    created_at REAL NOT NULL,
    UNIQUE (expert_id, doc_id)
);

CREATE TABLE query_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    ts          REAL NOT NULL,
    query       TEXT NOT NULL,
    query_vec   BLOB,
    abstained   INTEGER NOT NULL DEFAULT 0,
    top_confidence REAL,
    latency_ms  REAL NOT NULL
);
CREATE INDEX query_log_ts ON query_log(ts);

-- One row per expert chosen by a route (rank 0 = best).
CREATE TABLE query_choices (
    query_id   INTEGER NOT NULL REFERENCES query_log(id) ON DELETE CASCADE,
    expert_id  INTEGER NOT NULL,
    rank       INTEGER NOT NULL,
    score      REAL NOT NULL,
    confidence REAL NOT NULL,
    PRIMARY KEY (query_id, rank)
);
CREATE INDEX query_choices_expert ON query_choices(expert_id, query_id);
