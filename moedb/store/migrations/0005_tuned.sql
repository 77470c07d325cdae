-- moedb schema v5: tuned embedders. documents.tuned = 1 marks a document that trained the file's
-- embedder (Database.tune_embedder); such a document is no held-out evidence for calibrating the gate.
ALTER TABLE documents ADD COLUMN tuned INTEGER NOT NULL DEFAULT 0;
