-- The API: its keys, the integrations read model, and tenancy's second line (DESIGN
-- invariant 7): row-level security, forced, for a role that owns nothing.

-- API keys: only the SHA-256 digest of a key is kept; `id` is the key's public part.
CREATE TABLE api_keys (
    id         uuid        PRIMARY KEY,
    project_id uuid        NOT NULL,
    scope      text        NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    digest     bytea       NOT NULL,
    label      text,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX api_keys_project ON api_keys (project_id, created_at);

CREATE TABLE integrations (
    key        text  PRIMARY KEY,
    project_id uuid  NOT NULL,
    doc        jsonb NOT NULL,
    name       text  GENERATED ALWAYS AS (doc->>'name') STORED,
    provider   text  GENERATED ALWAYS AS (doc->>'provider') STORED
);
CREATE INDEX integrations_project ON integrations (project_id, key);

-- The read models gain a table and document fields: project them again from the start
-- (they are derived data), fencing any leader that still runs the old fold.
TRUNCATE installations, connections, operations, read_states, usage_daily, installation_streams;
DELETE FROM reader_checkpoints WHERE name = 'read_models';
UPDATE projector_leases SET token = token + 1 WHERE name = 'read_models';

-- The role API requests run as (`SET LOCAL ROLE amplog_app` + `amplog.project_id`). Roles
-- are cluster-wide: several amplog databases on one cluster share it.
DO $$
BEGIN
    CREATE ROLE amplog_app NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;
GRANT amplog_app TO CURRENT_USER;

-- The project a request is scoped to; NULL (no row visible) when it is not set.
CREATE FUNCTION amplog_current_project() RETURNS uuid LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('amplog.project_id', true), '')::uuid
$$;

-- Puts a table with a `project_id` column under forced row-level security: amplog_app may
-- read its own project's rows only; the owner (who writes) keeps every row. Rebuilds call
-- it again on the tables they swap in, since CREATE TABLE (LIKE ...) copies no policy.
CREATE FUNCTION amplog_secure(t regclass) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('DROP POLICY IF EXISTS amplog_tenant ON %s', t);
    EXECUTE format('CREATE POLICY amplog_tenant ON %s FOR SELECT TO amplog_app
                    USING (project_id = amplog_current_project())', t);
    EXECUTE format('DROP POLICY IF EXISTS amplog_owner ON %s', t);
    EXECUTE format('CREATE POLICY amplog_owner ON %s TO %I USING (true) WITH CHECK (true)', t, current_user);
    EXECUTE format('GRANT SELECT ON %s TO amplog_app', t);
END
$$;

-- amplog_app reads the log and the read models, nothing else: not credentials, not keys,
-- not idempotency responses, not snapshots.
SELECT amplog_secure(t) FROM unnest(ARRAY['events', 'integrations', 'installations', 'connections', 'operations',
    'read_states', 'usage_daily', 'installation_streams']::regclass[]) AS t;
