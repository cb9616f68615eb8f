-- The notifier's own tables, written by it as it reads the log (in the transaction that
-- moves its checkpoint): the subscriptions as of its checkpoint, and the deliveries it
-- queued, with their outcomes. Not read models (delivery outcomes are not in the log).
-- The application role reads its project's deliveries (and an end user its group's).
CREATE TABLE notification_subscriptions (
    subscription_id uuid   PRIMARY KEY,
    project_id      uuid   NOT NULL,
    destination     text   NOT NULL,
    topics          text[] NOT NULL
);
CREATE INDEX notification_subscriptions_by_project ON notification_subscriptions (project_id);

CREATE TABLE notification_deliveries (
    seq             bigint      GENERATED ALWAYS AS IDENTITY,
    webhook_id      text        PRIMARY KEY,
    project_id      uuid        NOT NULL,
    subscription_id uuid        NOT NULL,
    destination     text        NOT NULL,
    topic           text        NOT NULL,
    -- Text, as in the read models (the group policy compares it so).
    installation_id text,
    event_id        uuid        NOT NULL,
    -- The exact bytes signed and sent.
    body            text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    delivered_at    timestamptz,
    given_up_at     timestamptz,
    queued_at       timestamptz NOT NULL DEFAULT now()
);
-- What is still to send, per subscription in queue order.
CREATE INDEX notification_deliveries_pending ON notification_deliveries (subscription_id, seq)
    WHERE delivered_at IS NULL AND given_up_at IS NULL;
CREATE INDEX notification_deliveries_by_project ON notification_deliveries (project_id, seq);

SELECT amplog_secure('notification_deliveries');
