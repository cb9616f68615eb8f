-- amplog:no-transaction
-- A project's failed operations, newest first, so `deadLetters` pages them without reading
-- the succeeded ones. Built without blocking the projector; an invalid index left by an
-- interrupted build is dropped and built again.
DROP INDEX CONCURRENTLY IF EXISTS operations_failed;
CREATE INDEX CONCURRENTLY operations_failed ON operations (project_id, key) WHERE status = 'failed';
