-- The event log. Columns up to `metadata` are postgres-es 0.5.0's, so its repository can
-- still read and insert; the rest have defaults or are nullable for the same reason.
CREATE TABLE events (
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    -- `json`, not `jsonb`: the stored text is exactly the text that was hashed.
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    -- Global order. Becomes visible at commit, not at insert: readers never use it alone
    -- (see transaction_id).
    position       bigserial                    NOT NULL,
    transaction_id xid8        NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    event_id       uuid        NOT NULL DEFAULT gen_random_uuid(),
    project_id     uuid,
    -- The stream's hash chain: hash = sha256(prev_hash || canonical row), see commands::hash.
    prev_hash      bytea,
    hash           bytea,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

-- The log reader's order: (transaction_id, position), bounded by the snapshot's xmin.
CREATE UNIQUE INDEX events_log_order ON events (transaction_id, position);

-- Append-only: no UPDATE, DELETE or TRUNCATE, whoever asks.
CREATE FUNCTION amplog_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'amplog: table % is append-only', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION amplog_append_only();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION amplog_append_only();

-- Our snapshots (not cqrs-es's, which applies each event twice): the folded state of a
-- stream at `sequence`, with the chain hash there, written in the append's transaction.
CREATE TABLE aggregate_snapshots (
    aggregate_type   text        NOT NULL,
    aggregate_id     text        NOT NULL,
    snapshot_version integer     NOT NULL,
    sequence         bigint      NOT NULL,
    hash             bytea,
    state            json        NOT NULL,
    taken_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- A command carrying an idempotency key appends once; a retry gets `response` back.
CREATE TABLE idempotency_keys (
    project_id     uuid        NOT NULL,
    key            text        NOT NULL,
    request_digest bytea       NOT NULL,
    response       jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, key)
);

-- Where each named log reader (projector, relay, ...) stands.
CREATE TABLE reader_checkpoints (
    name           text        PRIMARY KEY,
    transaction_id xid8        NOT NULL,
    position       bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Secrets never enter the log: AES-256-GCM ciphertexts, referenced from events by id.
CREATE TABLE credentials (
    id            uuid        PRIMARY KEY,
    project_id    uuid        NOT NULL,
    connection_id uuid        NOT NULL,
    key_id        text        NOT NULL,
    nonce         bytea       NOT NULL,
    ciphertext    bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credentials_connection ON credentials (connection_id, created_at);
