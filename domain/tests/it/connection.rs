use crate::support::*;
use amplog_domain::connection::*;
use amplog_domain::*;

fn cred(n: u128) -> CredentialRef {
    CredentialRef { id: id(n), fingerprint: format!("sha256:{n:04}") }
}

fn created() -> ConnectionEvent {
    ConnectionEvent::Created {
        project_id: id(1),
        integration_id: id(2),
        provider: "hubspot".into(),
        group_ref: "customer-42".into(),
        credential: cred(10),
        at: t(0),
    }
}

fn refreshed() -> ConnectionEvent {
    ConnectionEvent::TokenRefreshed { credential: cred(11), expires_at: Some(t(60)), at: t(1) }
}

fn failed() -> ConnectionEvent {
    ConnectionEvent::RefreshFailed { reason: "invalid_grant".into(), at: t(2) }
}

fn revoked() -> ConnectionEvent {
    ConnectionEvent::Revoked { at: t(3) }
}

/// Every state a connection can be in, as the events that lead there.
fn states() -> Vec<(&'static str, Vec<ConnectionEvent>)> {
    vec![
        ("none", vec![]),
        ("created", vec![created()]),
        ("working", vec![created(), refreshed()]),
        ("bad_credentials", vec![created(), refreshed(), failed()]),
        ("revoked", vec![created(), revoked()]),
    ]
}

fn commands() -> Vec<(&'static str, ConnectionCommand)> {
    vec![
        (
            "create",
            ConnectionCommand::Create {
                project_id: id(1),
                integration_id: id(2),
                provider: "hubspot".into(),
                group_ref: "customer-42".into(),
                credential: cred(10),
                at: t(0),
            },
        ),
        ("refresh", ConnectionCommand::RefreshToken { credential: cred(12), expires_at: None, at: t(5) }),
        ("refresh_failure", ConnectionCommand::RecordRefreshFailure { reason: "invalid_grant".into(), at: t(5) }),
        ("reconnect", ConnectionCommand::Reconnect { credential: cred(13), at: t(5) }),
        ("revoke", ConnectionCommand::Revoke { at: t(5) }),
    ]
}

#[test]
fn every_command_in_every_state() {
    use ConnectionError::*;
    // columns: create, refresh, refresh_failure, reconnect, revoke
    let table: Vec<(&str, Vec<Expect<ConnectionError>>)> = vec![
        ("none", vec![Ok(&["Created"]), Err(NotFound), Err(NotFound), Err(NotFound), Err(NotFound)]),
        (
            "created",
            vec![
                Err(AlreadyExists),
                Ok(&["TokenRefreshed"]),
                Ok(&["RefreshFailed"]),
                Ok(&["Reconnected"]),
                Ok(&["Revoked"]),
            ],
        ),
        (
            "working",
            vec![
                Err(AlreadyExists),
                Ok(&["TokenRefreshed"]),
                Ok(&["RefreshFailed"]),
                Ok(&["Reconnected"]),
                Ok(&["Revoked"]),
            ],
        ),
        (
            "bad_credentials",
            vec![
                Err(AlreadyExists),
                Err(NeedsReconnect),
                Err(AlreadyBadCredentials),
                Ok(&["Reconnected"]),
                Ok(&["Revoked"]),
            ],
        ),
        ("revoked", vec![Err(AlreadyExists), Err(Revoked), Err(Revoked), Err(Revoked), Err(Revoked)]),
    ];
    check_matrix::<Connection>(&states(), &commands(), &table);
}

#[test]
fn status_follows_created_working_bad_credentials_revoked() {
    let status = |events: &[ConnectionEvent]| Connection::replay(events).status;
    assert_eq!(status(&[created()]), ConnectionStatus::Created);
    assert_eq!(status(&[created(), refreshed()]), ConnectionStatus::Working);
    assert_eq!(status(&[created(), refreshed(), failed()]), ConnectionStatus::BadCredentials);
    let reconnected = ConnectionEvent::Reconnected { credential: cred(14), at: t(9) };
    let state = Connection::replay(&[created(), refreshed(), failed(), reconnected]);
    assert_eq!(state.status, ConnectionStatus::Working);
    assert_eq!(state.failure_reason, None);
    assert_eq!(state.credential, Some(cred(14)));
    assert_eq!(status(&[created(), revoked()]), ConnectionStatus::Revoked);
}

#[test]
fn refresh_records_the_new_credential_reference() {
    given::<Connection>(&[created()])
        .when(ConnectionCommand::RefreshToken { credential: cred(20), expires_at: Some(t(90)), at: t(30) })
        .then(&[ConnectionEvent::TokenRefreshed { credential: cred(20), expires_at: Some(t(90)), at: t(30) }]);
}

#[test]
fn bad_input_is_refused_with_its_own_error() {
    let create = |group: &str, provider: &str, fingerprint: &str| ConnectionCommand::Create {
        project_id: id(1),
        integration_id: id(2),
        provider: provider.into(),
        group_ref: group.into(),
        credential: CredentialRef { id: id(10), fingerprint: fingerprint.into() },
        at: t(0),
    };
    given::<Connection>(&[]).when(create("", "hubspot", "fp")).then_err(ConnectionError::InvalidGroupRef);
    given::<Connection>(&[]).when(create(" padded ", "hubspot", "fp")).then_err(ConnectionError::InvalidGroupRef);
    given::<Connection>(&[]).when(create("g", "", "fp")).then_err(ConnectionError::InvalidProvider);
    given::<Connection>(&[]).when(create("g", "hubspot", " ")).then_err(ConnectionError::InvalidCredential);
}

#[test]
fn domain_error_codes_are_stable() {
    assert_eq!(DomainError::from(ConnectionError::NeedsReconnect).code(), "connection.needs_reconnect");
    assert_eq!(DomainError::from(ConnectionError::Revoked).code(), "connection.revoked");
}
