-- amplog:no-transaction
-- An installation's newest operations, as the API pages them (project, installation, key
-- descending): an ordered index scan that stops after a page, instead of fetching every
-- operation of the installation and sorting them. Replaces the (installation_id, key)
-- index, which every API query had to combine with a project filter. Built without
-- blocking the projector; an invalid index left by an interrupted build is built again.
DROP INDEX CONCURRENTLY IF EXISTS operations_by_installation;
CREATE INDEX CONCURRENTLY operations_by_installation ON operations (project_id, installation_id, key);
DROP INDEX CONCURRENTLY IF EXISTS operations_installation;
