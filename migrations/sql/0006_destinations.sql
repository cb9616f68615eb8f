-- Destinations: a project's named webhook endpoints that receive read results. The signing
-- secret (Standard Webhooks `whsec_...`) is encrypted like a credential (AES-256-GCM under
-- the configured key, the project and name as associated data). Configuration, not the log:
-- no read model derives from it. Not readable by the application role.
CREATE TABLE destinations (
    project_id uuid        NOT NULL,
    name       text        NOT NULL CHECK (name ~ '^[A-Za-z0-9_.-]{1,64}$'),
    url        text        NOT NULL,
    key_id     text        NOT NULL,
    nonce      bytea       NOT NULL,
    ciphertext bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, name)
);

-- The records of a write operation, as the mutation gave them, until a worker writes them
-- to the provider. Customer data, not the log: the log records counts and per-record
-- results only.
CREATE TABLE write_batches (
    operation_id uuid        PRIMARY KEY,
    project_id   uuid        NOT NULL,
    records      jsonb       NOT NULL,
    -- One result per record (`{index, ok, id, error}`), once a worker wrote them.
    results      jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- A project's keys read their own writes' results (the records are theirs).
SELECT amplog_secure('write_batches');
