-- JWT keys: the public keys a project's backend signs its end users' tokens with. The
-- key id (`kid`) names the project; revoked keys stay for the record. Changed only with an
-- event on the project's stream (`JwtKeyCreated`, `JwtKeyRevoked`). Not readable by the
-- application role.
CREATE TABLE jwt_keys (
    kid        uuid        PRIMARY KEY,
    project_id uuid        NOT NULL,
    alg        text        NOT NULL CHECK (alg IN ('EdDSA', 'ES256', 'RS256')),
    public_key text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX jwt_keys_project ON jwt_keys (project_id, created_at);

-- The group a request is narrowed to (a JWT's `group_ref`); NULL: the whole project.
CREATE FUNCTION amplog_current_group() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('amplog.group_ref', true), '')
$$;

-- The keys of the current group's installations (of the current project: RLS applies
-- inside). A function, not a subquery in the policies: it names `installations` only when
-- it runs, so rebuilds can swap that table under the others' policies; PL/pgSQL, so the
-- planner does not inline it into every read-model query (planning it cost more than the
-- queries themselves).
CREATE FUNCTION amplog_group_installations() RETURNS text[] LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(array_agg(key), '{}') FROM installations WHERE group_ref = amplog_current_group());
END
$$;

-- The tenant's policy as before, and for the read models of installations a second,
-- restrictive one (ANDed with it): with a group set, only that group's installations,
-- connections, and what belongs to those installations (the sub-selects are evaluated
-- once per statement). Rebuilds call it on the tables they swap in.
CREATE OR REPLACE FUNCTION amplog_secure(t regclass) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    columns text[];
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('DROP POLICY IF EXISTS amplog_tenant ON %s', t);
    EXECUTE format('CREATE POLICY amplog_tenant ON %s FOR SELECT TO amplog_app
                    USING (project_id = amplog_current_project())', t);
    EXECUTE format('DROP POLICY IF EXISTS amplog_owner ON %s', t);
    EXECUTE format('CREATE POLICY amplog_owner ON %s TO %I USING (true) WITH CHECK (true)', t, current_user);
    EXECUTE format('GRANT SELECT ON %s TO amplog_app', t);
    SELECT array_agg(attname::text) INTO columns FROM pg_attribute
     WHERE attrelid = t AND attnum > 0 AND NOT attisdropped;
    EXECUTE format('DROP POLICY IF EXISTS amplog_group ON %s', t);
    IF 'group_ref' = ANY (columns) THEN
        EXECUTE format('CREATE POLICY amplog_group ON %s AS RESTRICTIVE FOR SELECT TO amplog_app
                        USING ((SELECT amplog_current_group()) IS NULL
                               OR group_ref = (SELECT amplog_current_group()))', t);
    ELSIF 'installation_id' = ANY (columns) THEN
        EXECUTE format('CREATE POLICY amplog_group ON %s AS RESTRICTIVE FOR SELECT TO amplog_app
                        USING ((SELECT amplog_current_group()) IS NULL
                               OR installation_id = ANY ((SELECT amplog_group_installations())::text[]))', t);
    END IF;
END
$$;

SELECT amplog_secure(t) FROM unnest(ARRAY['installations', 'connections', 'operations', 'read_states',
    'usage_daily', 'installation_streams']::regclass[]) AS t;
