use crate::support::*;
use amplog_domain::connect_session::*;
use amplog_domain::connection::CredentialRef;
use amplog_domain::provider_app::*;
use amplog_domain::Aggregate;

fn config(client_id: &str) -> AppConfig {
    AppConfig {
        client_id: client_id.into(),
        secret: CredentialRef { id: id(9), fingerprint: "fp".into() },
        scopes: vec!["crm.objects.contacts.read".into()],
        return_urls: vec!["https://app.example/connected".into()],
    }
}

#[test]
fn provider_app_every_command_in_every_state() {
    use ProviderAppError::*;
    let created =
        ProviderAppEvent::Created { project_id: id(1), provider: "hubspot".into(), config: config("a"), at: t(0) };
    let states = vec![
        ("none", vec![]),
        ("live", vec![created.clone()]),
        ("deleted", vec![created.clone(), ProviderAppEvent::Deleted { at: t(1) }]),
    ];
    let commands = vec![
        (
            "create",
            ProviderAppCommand::Create { project_id: id(1), provider: "hubspot".into(), config: config("b"), at: t(2) },
        ),
        ("update", ProviderAppCommand::Update { config: config("c"), at: t(2) }),
        ("delete", ProviderAppCommand::Delete { at: t(2) }),
    ];
    let table: Vec<(&str, Vec<Expect<ProviderAppError>>)> = vec![
        ("none", vec![Ok(&["Created"]), Err(NotFound), Err(NotFound)]),
        ("live", vec![Err(AlreadyExists), Ok(&["Updated"]), Ok(&["Deleted"])]),
        ("deleted", vec![Ok(&["Created"]), Err(NotFound), Err(NotFound)]),
    ];
    check_matrix::<ProviderApp>(&states, &commands, &table);
    // A deleted app keeps its owner: the stream stays the project's.
    assert_eq!(ProviderApp::replay(&states[2].1).project_id, id(1));
}

#[test]
fn provider_app_configuration_is_checked() {
    let create = |config: AppConfig| ProviderAppCommand::Create {
        project_id: id(1),
        provider: "hubspot".into(),
        config,
        at: t(0),
    };
    let cases: Vec<(AppConfig, ProviderAppError)> = vec![
        (AppConfig { client_id: "".into(), ..config("a") }, ProviderAppError::InvalidClientId),
        (AppConfig { client_id: " a".into(), ..config("a") }, ProviderAppError::InvalidClientId),
        (AppConfig { scopes: vec!["a b".into()], ..config("a") }, ProviderAppError::InvalidScope("a b".into())),
        (AppConfig { scopes: vec!["s".into(); 51], ..config("a") }, ProviderAppError::TooMany),
        (
            AppConfig { secret: CredentialRef { id: id(9), fingerprint: " ".into() }, ..config("a") },
            ProviderAppError::InvalidCredential,
        ),
    ];
    for (config, error) in cases {
        given::<ProviderApp>(&[]).when(create(config)).then_err(error);
    }
    for url in [
        "http://app.example/cb",
        "javascript:alert(1)",
        "https://",
        "https://user@app.example/cb",
        "https://app.example/cb#frag",
        "https://app.example/c b",
        "//app.example/cb",
        "http://127.0.0.1.evil.example/cb",
    ] {
        let config = AppConfig { return_urls: vec![url.into()], ..config("a") };
        given::<ProviderApp>(&[]).when(create(config)).then_err(ProviderAppError::InvalidReturnUrl(url.into()));
    }
    for url in ["https://app.example/cb?x=1", "http://127.0.0.1:3000/cb", "http://localhost/cb", "https://[::1]/x"] {
        let config = AppConfig { return_urls: vec![url.into()], ..config("a") };
        given::<ProviderApp>(&[]).when(create(config)).then_types(&["Created"]);
    }
    assert_eq!(ProviderApp::id_for(id(1), "hubspot"), ProviderApp::id_for(id(1), "hubspot"));
    assert_ne!(ProviderApp::id_for(id(1), "hubspot"), ProviderApp::id_for(id(2), "hubspot"));
    assert_ne!(ProviderApp::id_for(id(1), "hubspot"), ProviderApp::id_for(id(1), "salesforce"));
}

fn request() -> SessionRequest {
    SessionRequest {
        integration_id: id(2),
        provider: "simulator".into(),
        group_ref: "acme".into(),
        consumer_ref: "alice".into(),
        return_url: None,
        reconnect: None,
    }
}

fn session_created() -> ConnectSessionEvent {
    ConnectSessionEvent::Created {
        project_id: id(1),
        request: request(),
        token_digest: "token".into(),
        expires_at: t(30),
        at: t(0),
    }
}

fn started(state: &str) -> ConnectSessionEvent {
    ConnectSessionEvent::AuthorizationStarted { state_digest: state.into(), at: t(1) }
}

#[test]
fn connect_session_every_command_in_every_state() {
    use ConnectSessionError::*;
    use ConnectSessionEvent as E;
    let connected = E::Connected { connection_id: id(3), at: t(3) };
    let states = vec![
        ("none", vec![]),
        ("open", vec![session_created()]),
        ("authorizing", vec![session_created(), started("s1")]),
        (
            "refused",
            vec![session_created(), started("s1"), E::AuthorizationFailed { reason: "access_denied".into(), at: t(2) }],
        ),
        ("connected", vec![session_created(), started("s1"), connected.clone()]),
        (
            "completed",
            vec![session_created(), started("s1"), connected, E::Completed { installation_id: Some(id(4)), at: t(4) }],
        ),
    ];
    use ConnectSessionCommand as C;
    let commands = vec![
        (
            "create",
            C::Create { project_id: id(1), request: request(), token_digest: "t".into(), expires_at: t(30), at: t(0) },
        ),
        ("start", C::StartAuthorization { state_digest: "s2".into(), at: t(5) }),
        ("fail", C::RecordFailure { state_digest: "s1".into(), reason: "access_denied".into(), at: t(5) }),
        ("connect", C::Connect { state_digest: "s1".into(), connection_id: id(3), at: t(5) }),
        ("connect-other-state", C::Connect { state_digest: "forged".into(), connection_id: id(3), at: t(5) }),
        ("complete", C::Complete { state_digest: "s1".into(), installation_id: Some(id(4)), at: t(5) }),
    ];
    let table: Vec<(&str, Vec<Expect<ConnectSessionError>>)> = vec![
        ("none", vec![Ok(&["Created"]), Err(NotFound), Err(NotFound), Err(NotFound), Err(NotFound), Err(NotFound)]),
        (
            "open",
            vec![
                Err(AlreadyExists),
                Ok(&["AuthorizationStarted"]),
                Err(NotAuthorizing),
                Err(NotAuthorizing),
                Err(NotAuthorizing),
                Err(NotConnected),
            ],
        ),
        (
            "authorizing",
            vec![
                Err(AlreadyExists),
                Ok(&["AuthorizationStarted"]),
                Ok(&["AuthorizationFailed"]),
                Ok(&["Connected"]),
                Err(StateMismatch),
                Err(NotConnected),
            ],
        ),
        (
            "refused",
            vec![
                Err(AlreadyExists),
                Ok(&["AuthorizationStarted"]),
                Err(NotAuthorizing),
                Err(NotAuthorizing),
                Err(NotAuthorizing),
                Err(NotConnected),
            ],
        ),
        (
            "connected",
            vec![
                Err(AlreadyExists),
                Err(AlreadyConnected),
                Err(StateUsed),
                Err(StateUsed),
                Err(StateUsed),
                Ok(&["Completed"]),
            ],
        ),
        (
            "completed",
            vec![
                Err(AlreadyExists),
                Err(AlreadyCompleted),
                Err(AlreadyCompleted),
                Err(AlreadyCompleted),
                Err(AlreadyCompleted),
                Err(AlreadyCompleted),
            ],
        ),
    ];
    check_matrix::<ConnectSession>(&states, &commands, &table);
}

#[test]
fn a_connect_session_expires_and_checks_what_it_is_given() {
    use ConnectSessionCommand as C;
    use ConnectSessionError::*;
    let authorizing = [session_created(), started("s1")];
    given::<ConnectSession>(&authorizing)
        .when(C::Connect { state_digest: "s1".into(), connection_id: id(3), at: t(30) })
        .then_err(Expired);
    given::<ConnectSession>(&[session_created()])
        .when(C::StartAuthorization { state_digest: "s".into(), at: t(31) })
        .then_err(Expired);
    // A newer attempt replaces the older one's state.
    given::<ConnectSession>(&[session_created(), started("s1"), started("s2")])
        .when(C::Connect { state_digest: "s1".into(), connection_id: id(3), at: t(5) })
        .then_err(StateMismatch);
    let create = |request: SessionRequest, minutes: i64, digest: &str| C::Create {
        project_id: id(1),
        request,
        token_digest: digest.into(),
        expires_at: t(minutes),
        at: t(0),
    };
    given::<ConnectSession>(&[]).when(create(request(), 0, "t")).then_err(InvalidExpiry);
    given::<ConnectSession>(&[]).when(create(request(), 24 * 60 + 1, "t")).then_err(InvalidExpiry);
    given::<ConnectSession>(&[]).when(create(request(), 24 * 60, "t")).then_types(&["Created"]);
    given::<ConnectSession>(&[]).when(create(request(), 10, "")).then_err(InvalidDigest);
    given::<ConnectSession>(&[])
        .when(create(SessionRequest { group_ref: "".into(), ..request() }, 10, "t"))
        .then_err(InvalidRef);
    given::<ConnectSession>(&[])
        .when(create(SessionRequest { consumer_ref: "a\nb".into(), ..request() }, 10, "t"))
        .then_err(InvalidRef);
    given::<ConnectSession>(&authorizing)
        .when(C::RecordFailure { state_digest: "s1".into(), reason: "".into(), at: t(5) })
        .then_err(InvalidReason);
    let state = ConnectSession::replay(&[
        session_created(),
        started("s1"),
        ConnectSessionEvent::AuthorizationFailed { reason: "access_denied".into(), at: t(2) },
    ]);
    assert_eq!((state.status, state.failures, state.state_digest), (SessionStatus::Open, 1, None));
    // A connected session may complete within the grace period after its expiry, not after.
    let connected =
        [session_created(), started("s1"), ConnectSessionEvent::Connected { connection_id: id(3), at: t(3) }];
    let complete = |minutes| C::Complete { state_digest: "s1".into(), installation_id: None, at: t(minutes) };
    given::<ConnectSession>(&connected).when(complete(30 + 59)).then_types(&["Completed"]);
    given::<ConnectSession>(&connected).when(complete(30 + 60)).then_err(Expired);
    // Attempts are bounded.
    let mut many = vec![session_created()];
    many.extend((0..MAX_ATTEMPTS).map(|i| started(&format!("s{i}"))));
    given::<ConnectSession>(&many)
        .when(C::StartAuthorization { state_digest: "x".into(), at: t(5) })
        .then_err(TooManyAttempts);
}
