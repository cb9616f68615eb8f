-- amplog:no-transaction
-- A project's dead letters (operations that failed after all their attempts), newest
-- first, so `deadLetters` pages them without reading other operations, failed proxy calls
-- among them. Built without blocking the projector; an invalid index left by an
-- interrupted build is dropped and built again.
DROP INDEX CONCURRENTLY IF EXISTS operations_dead_lettered;
CREATE INDEX CONCURRENTLY operations_dead_lettered ON operations (project_id, key)
    WHERE status = 'failed' AND (doc->>'dead_lettered')::boolean;
