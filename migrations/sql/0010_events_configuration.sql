-- amplog:no-transaction
-- A project's configuration history in log order (its own stream: API keys, destinations,
-- JWT keys; its provider apps; its connect sessions; its organization's record of it;
-- admin keys' uses in it), so `projectHistory` pages by cursor without
-- reading the rest of the log. Partial: only those streams' events. Built without
-- blocking appends; an invalid index left by an interrupted build is built again.
DROP INDEX CONCURRENTLY IF EXISTS events_configuration;
CREATE INDEX CONCURRENTLY events_configuration ON events (project_id, transaction_id, position)
    WHERE aggregate_type IN ('project', 'provider_app', 'connect_session', 'organization', 'admin_key');
