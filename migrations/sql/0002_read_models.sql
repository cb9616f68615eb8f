-- Read models, built from the log by projectors (projections crate). Each row is a JSON
-- document keyed by text; the columns queries filter on are generated from it. Everything
-- here can be dropped and rebuilt from `events`.

-- Who leads each projector, and the fencing token a leader's writes must still hold.
CREATE TABLE projector_leases (
    name        text        PRIMARY KEY,
    token       bigint      NOT NULL DEFAULT 0,
    holder      text,
    acquired_at timestamptz,
    heartbeat   timestamptz,
    -- The last applied batch, for the batch-latency metric.
    last_batch_events integer,
    last_batch_ms     double precision
);

CREATE TABLE installations (
    key            text  PRIMARY KEY,
    project_id     uuid  NOT NULL,
    doc            jsonb NOT NULL,
    integration_id text  GENERATED ALWAYS AS (doc->>'integration_id') STORED,
    connection_id  text  GENERATED ALWAYS AS (doc->>'connection_id') STORED,
    group_ref      text  GENERATED ALWAYS AS (doc->>'group_ref') STORED,
    health         text  GENERATED ALWAYS AS (doc->>'health') STORED,
    paused         boolean GENERATED ALWAYS AS ((doc->>'paused')::boolean) STORED
);
CREATE INDEX installations_project ON installations (project_id, key);
CREATE INDEX installations_connection ON installations (connection_id);

CREATE TABLE connections (
    key        text  PRIMARY KEY,
    project_id uuid  NOT NULL,
    doc        jsonb NOT NULL,
    status     text  GENERATED ALWAYS AS (doc->>'status') STORED,
    group_ref  text  GENERATED ALWAYS AS (doc->>'group_ref') STORED
);
CREATE INDEX connections_project ON connections (project_id, key);

CREATE TABLE operations (
    key             text  PRIMARY KEY,
    project_id      uuid  NOT NULL,
    doc             jsonb NOT NULL,
    installation_id text  GENERATED ALWAYS AS (doc->>'installation_id') STORED,
    op_type         text  GENERATED ALWAYS AS (doc->>'op_type') STORED,
    status          text  GENERATED ALWAYS AS (doc->>'status') STORED
);
CREATE INDEX operations_project ON operations (project_id, key);
CREATE INDEX operations_installation ON operations (installation_id, key);

-- One row per installation × object: where a sync worker resumes.
CREATE TABLE read_states (
    key             text  PRIMARY KEY,
    project_id      uuid  NOT NULL,
    doc             jsonb NOT NULL,
    installation_id text  GENERATED ALWAYS AS (doc->>'installation_id') STORED,
    object          text  GENERATED ALWAYS AS (doc->>'object') STORED
);
CREATE INDEX read_states_installation ON read_states (installation_id);

-- Usage per project × installation × day (UTC), from event times.
CREATE TABLE usage_daily (
    key             text  PRIMARY KEY,
    project_id      uuid  NOT NULL,
    doc             jsonb NOT NULL,
    installation_id text  GENERATED ALWAYS AS (doc->>'installation_id') STORED,
    day             text  GENERATED ALWAYS AS (doc->>'day') STORED -- ISO date: sorts as dates do
);
CREATE INDEX usage_daily_project_day ON usage_daily (project_id, day);

-- The installation → streams index an auditor's history query reads.
CREATE TABLE installation_streams (
    key             text  PRIMARY KEY,
    project_id      uuid  NOT NULL,
    doc             jsonb NOT NULL,
    installation_id text  GENERATED ALWAYS AS (doc->>'installation_id') STORED
);
CREATE INDEX installation_streams_installation ON installation_streams (installation_id);
