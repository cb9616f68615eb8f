use crate::support::*;
use amplog_domain::integration::*;
use amplog_domain::project::*;
use amplog_domain::Aggregate;

#[test]
fn project_every_command_in_every_state() {
    use ProjectError::*;
    let created = ProjectEvent::Created { name: "Acme".into(), at: t(0) };
    let key = id::<uuid::Uuid>(7);
    let states = vec![
        ("none", vec![]),
        ("exists", vec![created.clone()]),
        (
            "configured",
            vec![
                created.clone(),
                ProjectEvent::ApiKeyCreated { key_id: key, scope: "read".into(), label: None, at: t(1) },
                ProjectEvent::ApiKeyRevoked { key_id: key, at: t(2) },
                ProjectEvent::DestinationPut {
                    name: "default".into(),
                    url: "https://hooks.example/a".into(),
                    secret_fingerprint: "sha256:ab".into(),
                    at: t(3),
                },
                ProjectEvent::DestinationDisabled { name: "default".into(), reason: "410 Gone".into(), at: t(4) },
                ProjectEvent::NotificationSubscriptionCreated {
                    subscription_id: key,
                    destination: "default".into(),
                    topics: vec!["read.failed".into()],
                    at: t(4),
                },
            ],
        ),
    ];
    let commands = vec![
        ("create", ProjectCommand::Create { name: "Acme".into(), at: t(5) }),
        ("rename", ProjectCommand::Rename { name: "Acme Inc".into(), at: t(5) }),
        (
            "record-key",
            ProjectCommand::RecordApiKey { key_id: key, scope: "write".into(), label: Some("ci".into()), at: t(5) },
        ),
        ("revoke-key", ProjectCommand::RevokeApiKey { key_id: key, at: t(5) }),
        (
            "put-destination",
            ProjectCommand::PutDestination {
                name: "default".into(),
                url: "https://hooks.example/b".into(),
                secret_fingerprint: "sha256:cd".into(),
                at: t(5),
            },
        ),
        (
            "disable-destination",
            ProjectCommand::DisableDestination { name: "default".into(), reason: "410".into(), at: t(5) },
        ),
        (
            "record-jwt-key",
            ProjectCommand::RecordJwtKey {
                kid: key,
                algorithm: "EdDSA".into(),
                fingerprint: "sha256:ef".into(),
                at: t(5),
            },
        ),
        ("revoke-jwt-key", ProjectCommand::RevokeJwtKey { kid: key, at: t(5) }),
        ("join-organization", ProjectCommand::JoinOrganization { organization_id: key, at: t(5) }),
        (
            "subscribe",
            ProjectCommand::SubscribeNotifications {
                subscription_id: id(8),
                destination: "default".into(),
                destination_exists: true,
                topics: vec!["installation.*".into(), "read.failed".into()],
                at: t(5),
            },
        ),
        ("unsubscribe", ProjectCommand::DeleteNotificationSubscription { subscription_id: key, at: t(5) }),
    ];
    let table: Vec<(&str, Vec<Expect<ProjectError>>)> = vec![
        (
            "none",
            vec![
                Ok(&["Created"]),
                Err(NotFound),
                Err(NotFound),
                Err(NotFound),
                Err(NotFound),
                Err(NotFound),
                Err(NotFound),
                Err(NotFound),
                Err(NotFound),
                Err(NotFound),
                Err(NotFound),
            ],
        ),
        (
            "exists",
            vec![
                Err(AlreadyExists),
                Ok(&["Renamed"]),
                Ok(&["ApiKeyCreated"]),
                // A key made before keys were recorded: its revocation is recorded.
                Ok(&["ApiKeyRevoked"]),
                Ok(&["DestinationPut"]),
                Ok(&["DestinationDisabled"]),
                Ok(&["JwtKeyCreated"]),
                Err(JwtKeyNotFound),
                Ok(&["JoinedOrganization"]),
                Ok(&["NotificationSubscriptionCreated"]),
                Err(SubscriptionNotFound),
            ],
        ),
        (
            "configured",
            vec![
                Err(AlreadyExists),
                Ok(&["Renamed"]),
                Ok(&["ApiKeyCreated"]),
                Err(KeyRevoked),
                Ok(&["DestinationPut"]),
                Err(DestinationDisabled),
                Ok(&["JwtKeyCreated"]),
                Err(JwtKeyNotFound),
                Ok(&["JoinedOrganization"]),
                Ok(&["NotificationSubscriptionCreated"]),
                Ok(&["NotificationSubscriptionDeleted"]),
            ],
        ),
    ];
    check_matrix::<Project>(&states, &commands, &table);
    given::<Project>(&[]).when(ProjectCommand::Create { name: "".into(), at: t(0) }).then_err(InvalidName);
    given::<Project>(&[]).when(ProjectCommand::Create { name: "a\u{0}b".into(), at: t(0) }).then_err(InvalidName);
    given::<Project>(std::slice::from_ref(&created))
        .when(ProjectCommand::RecordApiKey { key_id: key, scope: "".into(), label: None, at: t(1) })
        .then_err(InvalidConfig);
    given::<Project>(&[created.clone(), ProjectEvent::JoinedOrganization { organization_id: key, at: t(1) }])
        .when(ProjectCommand::JoinOrganization { organization_id: key, at: t(2) })
        .then_err(AlreadyInOrganization);
    let with_jwt_key = [
        created.clone(),
        ProjectEvent::JwtKeyCreated { kid: key, algorithm: "ES256".into(), fingerprint: "f".into(), at: t(1) },
    ];
    given::<Project>(&with_jwt_key)
        .when(ProjectCommand::RevokeJwtKey { kid: key, at: t(2) })
        .then_types(&["JwtKeyRevoked"]);
    given::<Project>(std::slice::from_ref(&created))
        .when(ProjectCommand::RecordJwtKey { kid: key, algorithm: "HS256".into(), fingerprint: "f".into(), at: t(1) })
        .then_err(InvalidConfig);
    given::<Project>(&[created])
        .when(ProjectCommand::PutDestination {
            name: "d".into(),
            url: "u\n".into(),
            secret_fingerprint: "f".into(),
            at: t(1),
        })
        .then_err(InvalidConfig);
}

fn declared() -> IntegrationEvent {
    IntegrationEvent::Declared { project_id: id(1), name: "crm-sync".into(), provider: "hubspot".into(), at: t(0) }
}

fn decl(name: &str, schedule: Option<&str>) -> ObjectDecl {
    ObjectDecl {
        optional: false,
        name: name.into(),
        schedule: schedule.map(Into::into),
        backfill: Backfill::Days(30),
        fields: vec!["email".into()],
        destination: None,
        subscribe: vec![],
    }
}

fn deploy(objects: Vec<ObjectDecl>) -> IntegrationCommand {
    IntegrationCommand::DeployRevision { manifest: Manifest { objects }, manifest_digest: "sha256:ab".into(), at: t(5) }
}

#[test]
fn integration_every_command_in_every_state() {
    use IntegrationError::*;
    let revision = IntegrationEvent::RevisionDeployed {
        revision: 1,
        objects: vec![decl("contacts", None)],
        manifest_digest: "d".into(),
        at: t(1),
    };
    let states = vec![("none", vec![]), ("declared", vec![declared()]), ("deployed", vec![declared(), revision])];
    let commands = vec![
        (
            "declare",
            IntegrationCommand::Declare {
                project_id: id(1),
                name: "crm-sync".into(),
                provider: "hubspot".into(),
                at: t(0),
            },
        ),
        ("deploy", deploy(vec![decl("contacts", Some("@every 15m"))])),
    ];
    let table: Vec<(&str, Vec<Expect<IntegrationError>>)> = vec![
        ("none", vec![Ok(&["Declared"]), Err(NotFound)]),
        ("declared", vec![Err(AlreadyDeclared), Ok(&["RevisionDeployed"])]),
        ("deployed", vec![Err(AlreadyDeclared), Ok(&["RevisionDeployed"])]),
    ];
    check_matrix::<Integration>(&states, &commands, &table);
}

#[test]
fn revisions_are_numbered_in_deploy_order() {
    let first = given::<Integration>(&[declared()]).when(deploy(vec![decl("contacts", None)])).events();
    let mut history = vec![declared()];
    history.extend(first.clone());
    given::<Integration>(&history).when(deploy(vec![decl("contacts", None), decl("deals", None)])).then(&[
        IntegrationEvent::RevisionDeployed {
            revision: 2,
            objects: vec![decl("contacts", None), decl("deals", None)],
            manifest_digest: "sha256:ab".into(),
            at: t(5),
        },
    ]);
    let state = Integration::replay(&history);
    assert_eq!(state.revision(1).map(|r| r.objects.len()), Some(1));
    assert!(state.revision(2).is_none());
}

#[test]
fn malformed_manifests_are_refused() {
    use IntegrationError::*;
    given::<Integration>(&[declared()]).when(deploy(vec![])).then_err(EmptyManifest);
    given::<Integration>(&[declared()])
        .when(deploy(vec![decl("a", None), decl("a", None)]))
        .then_err(DuplicateObject("a".into()));
    given::<Integration>(&[declared()])
        .when(deploy(vec![decl("bad name", None)]))
        .then_err(InvalidObjectName("bad name".into()));
    given::<Integration>(&[declared()])
        .when(deploy(vec![decl("a", Some("every hour"))]))
        .then_err(InvalidSchedule("every hour".into()));
}

#[test]
fn schedules() {
    for ok in ["@every 15m", "@every 1h", "@every 2d", "*/15 * * * *", "0 6,18 * * 1-5"] {
        assert!(valid_schedule(ok), "{ok}");
    }
    for bad in ["", "@every 0m", "@every m", "@every 5s", "* * * *", "* * * * * *", "@hourly", "a b c d e"] {
        assert!(!valid_schedule(bad), "{bad}");
    }
}

#[test]
fn notification_subscriptions_name_known_topics_and_destinations() {
    use ProjectError::*;
    let created = ProjectEvent::Created { name: "Acme".into(), at: t(0) };
    let subscribe = |topics: Vec<&str>, exists: bool| ProjectCommand::SubscribeNotifications {
        subscription_id: id(9),
        destination: "default".into(),
        destination_exists: exists,
        topics: topics.into_iter().map(String::from).collect(),
        at: t(1),
    };
    let refused =
        |command: ProjectCommand| Project::replay(std::slice::from_ref(&created)).decide(&command).unwrap_err();
    assert!(matches!(refused(subscribe(vec![], true)), InvalidTopics(_)));
    assert!(matches!(refused(subscribe(vec!["read.exploded"], true)), InvalidTopics(_)));
    assert!(matches!(refused(subscribe(vec!["read.failed", "read.failed"], true)), InvalidTopics(_)));
    assert!(matches!(refused(subscribe(vec!["read.failed"; 33], true)), InvalidTopics(_)));
    assert!(matches!(refused(subscribe(vec!["read.failed"], false)), UnknownDestination(_)));
    given::<Project>(std::slice::from_ref(&created))
        .when(subscribe(vec!["*"], true))
        .then_types(&["NotificationSubscriptionCreated"]);
    let mut full = vec![created.clone()];
    full.extend((0..50u128).map(|i| ProjectEvent::NotificationSubscriptionCreated {
        subscription_id: id(100 + i),
        destination: "default".into(),
        topics: vec!["*".into()],
        at: t(1),
    }));
    given::<Project>(&full).when(subscribe(vec!["*"], true)).then_err(TooManySubscriptions);
}
