-- The log's end (`max(position)`, where catch-up jobs stop) read from an index instead of
-- a scan of the whole log: 40 ms at 200k events before, and growing with the log.
CREATE INDEX events_by_position ON events (position);
