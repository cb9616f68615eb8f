use crate::support::*;
use amplog_domain::admin_key::*;
use amplog_domain::organization::*;

#[test]
fn organization_every_command_in_every_state() {
    use OrganizationError::*;
    let created = OrganizationEvent::Created { name: "Acme Group".into(), at: t(0) };
    let added = OrganizationEvent::ProjectAdded { project_id: id(1), at: t(1) };
    let states = vec![("none", vec![]), ("exists", vec![created.clone()]), ("with-project", vec![created, added])];
    let commands = vec![
        ("create", OrganizationCommand::Create { name: "Acme Group".into(), at: t(2) }),
        ("add-project", OrganizationCommand::AddProject { project_id: id(1), at: t(2) }),
    ];
    let table: Vec<(&str, Vec<Expect<OrganizationError>>)> = vec![
        ("none", vec![Ok(&["Created"]), Err(NotFound)]),
        ("exists", vec![Err(AlreadyExists), Ok(&["ProjectAdded"])]),
        ("with-project", vec![Err(AlreadyExists), Err(AlreadyAdded)]),
    ];
    check_matrix::<Organization>(&states, &commands, &table);
    given::<Organization>(&[]).when(OrganizationCommand::Create { name: " ".into(), at: t(0) }).then_err(InvalidName);
}

#[test]
fn admin_key_every_command_in_every_state() {
    use AdminKeyError::*;
    let created = AdminKeyEvent::Created { label: Some("ops".into()), at: t(0) };
    let states = vec![
        ("none", vec![]),
        ("live", vec![created.clone()]),
        ("revoked", vec![created, AdminKeyEvent::Revoked { at: t(1) }]),
    ];
    let commands = vec![
        ("create", AdminKeyCommand::Create { label: None, at: t(2) }),
        ("use", AdminKeyCommand::RecordUse { project_id: id(1), what: "graphql".into(), at: t(2) }),
        ("revoke", AdminKeyCommand::Revoke { at: t(2) }),
    ];
    let table: Vec<(&str, Vec<Expect<AdminKeyError>>)> = vec![
        ("none", vec![Ok(&["Created"]), Err(NotFound), Err(NotFound)]),
        ("live", vec![Err(AlreadyExists), Ok(&["Used"]), Ok(&["Revoked"])]),
        ("revoked", vec![Err(AlreadyExists), Err(Revoked), Err(Revoked)]),
    ];
    check_matrix::<AdminKey>(&states, &commands, &table);
    given::<AdminKey>(&[]).when(AdminKeyCommand::Create { label: Some("a\nb".into()), at: t(0) }).then_err(InvalidText);
}
