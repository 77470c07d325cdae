-- moedb schema v4: refusal experts. An expert with refuse = 1 holds examples of queries that none of
-- the experts should answer (out of scope); it joins the gate as one more class, is never selected,
-- and a route whose best match is a refusal expert abstains.
ALTER TABLE experts ADD COLUMN refuse INTEGER NOT NULL DEFAULT 0;
