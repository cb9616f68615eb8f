use crate::support::*;
use amplog_domain::connection::*;
use amplog_domain::installation::*;
use amplog_domain::integration::*;
use amplog_domain::operation::{OperationType, Trigger};
use amplog_domain::*;
use std::collections::BTreeMap;

fn integration() -> IntegrationFacts {
    let state = Integration::replay(&[
        IntegrationEvent::Declared { project_id: id(1), name: "crm".into(), provider: "hubspot".into(), at: t(0) },
        IntegrationEvent::RevisionDeployed {
            revision: 1,
            objects: vec![
                ObjectDecl {
                    optional: false,
                    name: "contacts".into(),
                    schedule: None,
                    backfill: Backfill::Full,
                    fields: vec![],
                    destination: None,
                    subscribe: vec![],
                },
                ObjectDecl {
                    optional: false,
                    name: "deals".into(),
                    schedule: None,
                    backfill: Backfill::None,
                    fields: vec![],
                    destination: None,
                    subscribe: vec![],
                },
            ],
            manifest_digest: "d".into(),
            at: t(0),
        },
    ]);
    IntegrationFacts { id: id(2), state }
}

fn connection(status_events: &[ConnectionEvent]) -> ConnectionFacts {
    let mut events = vec![ConnectionEvent::Created {
        project_id: id(1),
        integration_id: id(2),
        provider: "hubspot".into(),
        group_ref: "g1".into(),
        credential: CredentialRef { id: id(9), fingerprint: "fp".into() },
        at: t(0),
    }];
    events.extend_from_slice(status_events);
    ConnectionFacts { id: id(3), state: Connection::replay(&events) }
}

fn objects() -> BTreeMap<String, ObjectConfig> {
    BTreeMap::from([
        (
            "contacts".to_string(),
            ObjectConfig { enabled: true, schedule: "@every 15m".into(), backfill: Backfill::Days(7) },
        ),
        ("deals".to_string(), ObjectConfig { enabled: false, schedule: "@every 1h".into(), backfill: Backfill::None }),
    ])
}

fn create_with(
    connection: ConnectionFacts,
    objects: BTreeMap<String, ObjectConfig>,
    revision: u32,
) -> InstallationCommand {
    InstallationCommand::Create {
        project_id: id(1),
        integration: integration(),
        revision,
        group_ref: "g1".into(),
        consumer_ref: "alice".into(),
        connection,
        objects,
        at: t(1),
    }
}

fn created() -> InstallationEvent {
    InstallationEvent::Created {
        project_id: id(1),
        integration_id: id(2),
        revision: 1,
        group_ref: "g1".into(),
        consumer_ref: "alice".into(),
        connection_id: id(3),
        objects: objects(),
        at: t(1),
    }
}

fn request(object: &str, connection: ConnectionFacts) -> InstallationCommand {
    InstallationCommand::RequestOperation {
        operation_id: id(50),
        op_type: OperationType::Read,
        object: object.into(),
        trigger: Trigger::Triggered,
        connection,
        at: t(9),
    }
}

#[test]
fn every_command_in_every_state() {
    use InstallationError::*;
    let states = vec![
        ("none", vec![]),
        ("active", vec![created()]),
        ("paused", vec![created(), InstallationEvent::Paused { at: t(2) }]),
        ("deleted", vec![created(), InstallationEvent::Deleted { at: t(2) }]),
    ];
    let commands = vec![
        ("create", create_with(connection(&[]), objects(), 1)),
        (
            "update_config",
            InstallationCommand::UpdateConfig { integration: integration(), revision: 1, objects: objects(), at: t(3) },
        ),
        ("pause", InstallationCommand::Pause { at: t(3) }),
        ("unpause", InstallationCommand::Unpause { at: t(3) }),
        ("delete", InstallationCommand::Delete { at: t(3) }),
        ("request", request("contacts", connection(&[]))),
    ];
    let table: Vec<(&str, Vec<Expect<InstallationError>>)> = vec![
        ("none", vec![Ok(&["Created"]), Err(NotFound), Err(NotFound), Err(NotFound), Err(NotFound), Err(NotFound)]),
        (
            "active",
            vec![
                Err(AlreadyExists),
                Ok(&["ConfigUpdated"]),
                Ok(&["Paused"]),
                Err(NotPaused),
                Ok(&["Deleted"]),
                Ok(&["OperationRequested"]),
            ],
        ),
        (
            "paused",
            vec![
                Err(AlreadyExists),
                Ok(&["ConfigUpdated"]),
                Err(AlreadyPaused),
                Ok(&["Unpaused"]),
                Ok(&["Deleted"]),
                Err(Paused),
            ],
        ),
        ("deleted", vec![Err(AlreadyExists), Err(Deleted), Err(Deleted), Err(Deleted), Err(Deleted), Err(Deleted)]),
    ];
    check_matrix::<Installation>(&states, &commands, &table);
}

#[test]
fn create_checks_revision_objects_schedule_and_connection() {
    use InstallationError::*;
    given::<Installation>(&[]).when(create_with(connection(&[]), objects(), 7)).then_err(UnknownRevision(7));
    let mut unknown = objects();
    unknown.insert(
        "tickets".into(),
        ObjectConfig { enabled: true, schedule: "@every 1h".into(), backfill: Backfill::None },
    );
    given::<Installation>(&[]).when(create_with(connection(&[]), unknown, 1)).then_err(UnknownObject("tickets".into()));
    let mut bad_schedule = objects();
    bad_schedule.get_mut("contacts").unwrap().schedule = "sometimes".into();
    given::<Installation>(&[])
        .when(create_with(connection(&[]), bad_schedule, 1))
        .then_err(InvalidSchedule("sometimes".into()));
    given::<Installation>(&[]).when(create_with(connection(&[]), BTreeMap::new(), 1)).then_err(NoObjects);
    let revoked = connection(&[ConnectionEvent::Revoked { at: t(0) }]);
    given::<Installation>(&[]).when(create_with(revoked, objects(), 1)).then_err(ConnectionRevoked);
    let missing = ConnectionFacts { id: id(3), state: Connection::default() };
    given::<Installation>(&[]).when(create_with(missing, objects(), 1)).then_err(ConnectionNotFound);
    let mut foreign = connection(&[]);
    foreign.state.project_id = id(99);
    given::<Installation>(&[]).when(create_with(foreign, objects(), 1)).then_err(ConnectionNotFound);
    let mut other_group = connection(&[]);
    other_group.state.group_ref = "g2".into();
    given::<Installation>(&[]).when(create_with(other_group, objects(), 1)).then_err(ConnectionMismatch);
    let mut foreign_integration = integration();
    foreign_integration.state.project_id = id(99);
    given::<Installation>(&[])
        .when(InstallationCommand::Create {
            project_id: id(1),
            integration: foreign_integration,
            revision: 1,
            group_ref: "g1".into(),
            consumer_ref: "alice".into(),
            connection: connection(&[]),
            objects: objects(),
            at: t(1),
        })
        .then_err(IntegrationNotFound);
    // Awaiting re-auth is not a reason to refuse an installation; only its reads wait.
    let bad = connection(&[ConnectionEvent::RefreshFailed { reason: "invalid_grant".into(), at: t(0) }]);
    given::<Installation>(&[]).when(create_with(bad, objects(), 1)).then_types(&["Created"]);
}

#[test]
fn reads_need_a_configured_enabled_object_and_working_credentials() {
    use InstallationError::*;
    given::<Installation>(&[created()])
        .when(request("tickets", connection(&[])))
        .then_err(UnknownObject("tickets".into()));
    given::<Installation>(&[created()])
        .when(request("deals", connection(&[])))
        .then_err(ObjectDisabled("deals".into()));
    let bad = connection(&[ConnectionEvent::RefreshFailed { reason: "invalid_grant".into(), at: t(0) }]);
    given::<Installation>(&[created()]).when(request("contacts", bad)).then_err(NeedsReauth);
    let revoked = connection(&[ConnectionEvent::Revoked { at: t(0) }]);
    given::<Installation>(&[created()]).when(request("contacts", revoked)).then_err(ConnectionRevoked);
    // A proxy call is not tied to a configured object.
    given::<Installation>(&[created()])
        .when(InstallationCommand::RequestOperation {
            operation_id: id(51),
            op_type: OperationType::Proxy,
            object: "/crm/v3/owners".into(),
            trigger: Trigger::Triggered,
            connection: connection(&[]),
            at: t(9),
        })
        .then_types(&["OperationRequested"]);
}

#[test]
fn a_read_is_accepted_again_after_unpause() {
    let history = [created(), InstallationEvent::Paused { at: t(2) }, InstallationEvent::Unpaused { at: t(3) }];
    assert!(!Installation::replay(&history).paused);
    given::<Installation>(&history).when(request("contacts", connection(&[]))).then(&[
        InstallationEvent::OperationRequested {
            operation_id: id(50),
            op_type: OperationType::Read,
            object: "contacts".into(),
            trigger: Trigger::Triggered,
            at: t(9),
        },
    ]);
}
