-- Provider change webhooks. `connection_accounts`: the provider account each connection's
-- token set names, written with the connection's credential: how a change the provider
-- pushes finds its connections. The notifier's routes, kept as it reads the log (like its
-- subscriptions): each installation's connection, revision and enabled objects, and each
-- revision's objects that subscribe to changes.
CREATE TABLE connection_accounts (
    provider      text NOT NULL,
    account_id    text NOT NULL,
    project_id    uuid NOT NULL,
    connection_id uuid NOT NULL,
    PRIMARY KEY (provider, account_id, project_id, connection_id)
);

CREATE TABLE change_routes (
    installation_id uuid    PRIMARY KEY,
    project_id      uuid    NOT NULL,
    connection_id   uuid    NOT NULL,
    integration_id  uuid    NOT NULL,
    revision        integer NOT NULL,
    objects         text[]  NOT NULL,
    paused          boolean NOT NULL DEFAULT false
);
CREATE INDEX change_routes_by_connection ON change_routes (connection_id);

CREATE TABLE change_subscriptions (
    integration_id uuid    NOT NULL,
    revision       integer NOT NULL,
    object         text    NOT NULL,
    kinds          text[]  NOT NULL,
    destination    text    NOT NULL,
    PRIMARY KEY (integration_id, revision, object)
);
