-- Admin keys: a deployment operator's keys (`amk_<id>_<secret>`), allowed in every project.
-- Only the SHA-256 digest is stored; making, using and revoking one are events of its
-- stream (`admin_key`). Not readable by the application role.
CREATE TABLE admin_keys (
    id         uuid        PRIMARY KEY,
    digest     bytea       NOT NULL,
    label      text,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
