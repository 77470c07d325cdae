-- A covering index for the refresh check (id, version, updated_at, parent_id of every expert): a file of
-- thousands of experts is then scanned without reading their centroid sums.
CREATE INDEX experts_stamp ON experts(id, version, updated_at, parent_id);
