use crate::support::*;
use amplog_domain::integration::*;
use amplog_domain::project::*;
use amplog_domain::Aggregate;

#[test]
fn project_every_command_in_every_state() {
    use ProjectError::*;
    let states = vec![("none", vec![]), ("exists", vec![ProjectEvent::Created { name: "Acme".into(), at: t(0) }])];
    let commands = vec![
        ("create", ProjectCommand::Create { name: "Acme".into(), at: t(1) }),
        ("rename", ProjectCommand::Rename { name: "Acme Inc".into(), at: t(1) }),
    ];
    let table: Vec<(&str, Vec<Expect<ProjectError>>)> =
        vec![("none", vec![Ok(&["Created"]), Err(NotFound)]), ("exists", vec![Err(AlreadyExists), Ok(&["Renamed"])])];
    check_matrix::<Project>(&states, &commands, &table);
    given::<Project>(&[]).when(ProjectCommand::Create { name: "".into(), at: t(0) }).then_err(InvalidName);
    given::<Project>(&[]).when(ProjectCommand::Create { name: "a\u{0}b".into(), at: t(0) }).then_err(InvalidName);
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
