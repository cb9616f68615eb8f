-- Jobs the in-process dispatcher could not run to an outcome: they kept failing (the
-- operation is recorded failed) or name an operation their project does not have. With
-- Kafka the same records go to the dead-letter topic. Not the log: an operator may delete
-- rows once handled. Not readable by the application role.
CREATE TABLE dead_letters (
    event_id        uuid        PRIMARY KEY,
    project_id      uuid        NOT NULL,
    operation_id    uuid        NOT NULL,
    installation_id uuid        NOT NULL,
    error_code      text        NOT NULL,
    error_message   text        NOT NULL,
    worker          text        NOT NULL,
    envelope        jsonb       NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_by_project ON dead_letters (project_id, recorded_at);
