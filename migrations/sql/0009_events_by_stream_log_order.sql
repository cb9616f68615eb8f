-- amplog:no-transaction
-- A stream's events in log order, so an installation's history pages by cursor: each of
-- its streams is read from the cursor on, at most a page of it. Built without blocking
-- appends; an invalid index left by an interrupted build is dropped and built again.
DROP INDEX CONCURRENTLY IF EXISTS events_by_stream_log_order;
CREATE INDEX CONCURRENTLY events_by_stream_log_order ON events (aggregate_type, aggregate_id, transaction_id, position);
