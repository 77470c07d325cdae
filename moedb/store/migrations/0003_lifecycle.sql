-- moedb schema v3 (lifecycle): feedback events, retrain history, indexes for load analytics.

-- One row per feedback event. event_key makes ingestion idempotent: an explicit "id" from the
-- event, else a hash of (query or query_id, expert, reward, time).
CREATE TABLE feedback (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_key  TEXT NOT NULL UNIQUE,
    query_id   INTEGER,                 -- query_log.id when the event names a logged route
    query      TEXT,                    -- the query text (from the event or the log)
    query_vec  BLOB,                    -- <f4 unit vector used as a gate example (NULL: unusable)
    expert_id  INTEGER NOT NULL,        -- experts.id (no FK: merge moves it, delete leaves it)
    reward     REAL NOT NULL,           -- in [-1, 1]; > 0 good route, < 0 bad route
    ts         REAL NOT NULL,           -- event time (epoch seconds)
    bucket     INTEGER NOT NULL,        -- 0..999 from the event key: deterministic held-out split
    source     TEXT,                    -- "api" or the ingested file name
    created_at REAL NOT NULL
);
CREATE INDEX feedback_expert ON feedback(expert_id, reward);
CREATE INDEX feedback_ts ON feedback(ts);
CREATE INDEX feedback_query ON feedback(query_id);

-- One row per retrain: the figures it reported (JSON) and the last feedback row it saw.
CREATE TABLE retrain_runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    ts           REAL NOT NULL,
    feedback_max INTEGER NOT NULL,
    figures      TEXT NOT NULL
);

-- Load analytics: covering indexes so aggregates never read the (large) log rows themselves.
-- per-expert counts without a time window: index-only, grouped in index order
CREATE INDEX query_choices_rank ON query_choices(rank, expert_id, query_id, confidence);
-- joining a time window of the log to its choices: both sides index-only
CREATE INDEX query_choices_cover ON query_choices(query_id, rank, expert_id, confidence);
CREATE INDEX query_log_ts_cover ON query_log(ts, abstained, latency_ms);
-- overall latency percentiles without a window: an index walk to the rank, no sort
CREATE INDEX query_log_latency ON query_log(latency_ms);
