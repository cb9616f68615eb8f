//! Compiled reads answer exactly what the executor answers: the same JSON, for every query
//! shape they take (fields, aliases, fragments, `__typename`, variables, filters, pages and
//! cursors), on read models in every state; and whatever they do not take (or what the
//! executor refuses) still gets the executor's answer.

use amplog_api::testing::TestApp;
use amplog_api::{Scope, Server, ServerConfig};
use amplog_commands::testing::{read_of, seed, start_read, Seeded};
use amplog_domain::operation::ErrorClass;
use serde_json::{json, Value};

/// The raw body of a GraphQL request.
async fn body(http: &reqwest::Client, base: &str, key: &str, query: &str, variables: &Value) -> (u16, String) {
    let response = http
        .post(format!("{base}/graphql"))
        .header("x-api-key", key)
        .json(&json!({"query": query, "variables": variables}))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// A body as JSON: the executor writes an object's keys in the order its resolvers finish
/// (async-graphql), a plan in the order of the selection (the order GraphQL asks for), so
/// answers are compared as values.
fn parsed(answer: &(u16, String)) -> (u16, Value) {
    (answer.0, serde_json::from_str(&answer.1).unwrap_or_else(|e| panic!("not JSON ({e}): {}", answer.1)))
}

async fn answers(http: &reqwest::Client, base: &str, by: &str) -> u64 {
    let text = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with("amplog_graphql_answers_total") && l.contains(&format!("by=\"{by}\"")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn compiled_reads_answer_what_the_executor_answers() {
    let app = TestApp::spawn().await;
    let service = &app.service;
    // Read models in many states: operations pending, running, succeeded, failed (with a
    // message that needs escaping), a paused and a deleted installation, a connection whose
    // refresh failed, installations of another group.
    let s = seed(service).await;
    let mut installations = vec![s.installation];
    let secret = amplog_commands::credentials::Secret("another-token".into());
    let other = service.create_connection(&s.ctx, s.integration, "group-2", &secret).await.unwrap();
    let other = amplog_domain::ConnectionId(other.id_of("connection").unwrap());
    for i in 0..6 {
        let new = amplog_commands::service::NewInstallation {
            integration_id: s.integration,
            revision: None,
            group_ref: if i % 2 == 0 { "group-1".into() } else { "group-2".into() },
            consumer_ref: format!("consumer-\"{i}\"\u{e9}"),
            connection_id: if i % 2 == 0 { s.connection } else { other },
            objects: None,
        };
        let outcome = service.create_installation(&s.ctx, &new).await.unwrap();
        installations.push(amplog_domain::InstallationId(outcome.id_of("installation").unwrap()));
    }
    for (n, installation) in installations.iter().enumerate() {
        let at = Seeded { installation: *installation, ctx: s.ctx.clone(), ..s };
        for k in 0..(n % 4 + 1) {
            let (op, lease) = start_read(service, &at, ["contacts", "companies", "deals"][k % 3]).await;
            match k % 3 {
                0 => {
                    service.record_page(&at.ctx, op, lease, 100, 4096, &Default::default()).await.unwrap();
                    service.succeed_operation(&at.ctx, op, lease).await.unwrap();
                }
                1 => {
                    let message = "provider said \"no\"\n\ttab \u{1F600} \\ done";
                    service.fail_operation(&at.ctx, op, lease, ErrorClass::BadRequest, message, false).await.unwrap();
                }
                _ => {}
            }
        }
        service.request_operation(&at.ctx, *installation, &read_of("contacts")).await.unwrap();
    }
    service.pause_installation(&s.ctx, installations[2]).await.unwrap();
    service.delete_installation(&s.ctx, installations[3]).await.unwrap();
    service.record_refresh_failure(&s.ctx, s.connection, "invalid_grant: token \"revoked\"").await.unwrap();
    app.projected().await;
    let (_, key) = app.keys.create(s.ctx.project_id, Scope::Read, None).await.unwrap();

    // The same database behind a server whose executor answers everything.
    let config = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), compiled_reads: false, ..Default::default() };
    let executor = Server::start(config, service.clone(), app.keys.clone()).await.unwrap();
    let executor_base = format!("http://{}", executor.addr);
    let http = amplog_providers::connector::http_client().build().unwrap();

    let first = installations[0].0.to_string();
    let busy = installations[3].0.to_string();
    let fields = "id integrationId revision groupRef consumerRef connectionId connectionStatus health paused deleted
        createdAt updatedAt objects { name enabled schedule backfill backfillDays lastSuccessfulRead }
        lastOperation { operationId opType object status at __typename }";
    let op_fields = "id installationId opType object trigger since until status attempts pages records bytes
        errorClass errorMessage requestedAt startedAt finishedAt durationMs deliveryAttempts deliveryFailures
        deadLettered httpStatus version __typename";
    let conn_fields = "id integrationId provider groupRef status credentialFingerprint lastRefreshAt failureReason
        createdAt updatedAt __typename";
    let cases: Vec<(String, Value)> = vec![
        (
            format!("query($id: UUID!) {{ installation(id: $id) {{ {fields} connection {{ {conn_fields} }} operations(first: 10) {{ nodes {{ {op_fields} }} pageInfo {{ hasPreviousPage hasNextPage startCursor endCursor }} }} }} }}"),
            json!({"id": first}),
        ),
        (
            format!("query($id: UUID!) {{ installation(id: $id) {{ {fields} connection {{ {conn_fields} }} operations(first: 10) {{ nodes {{ {op_fields} }} pageInfo {{ hasPreviousPage hasNextPage startCursor endCursor }} }} }} }}"),
            json!({"id": busy}),
        ),
        // Aliases, duplicates merged, fragments (named and inline), __typename at the root.
        (
            "query Q($id: UUID!, $n: Int = 2) { __typename a: installation(id: $id) { ...I health
               ... on Installation { paused id } recent: operations(first: $n) { nodes { id status } pageInfo { hasNextPage } }
               failed: operations(first: 5, status: \"failed\") { nodes { id errorMessage errorClass } }
               connection { status } connection { failureReason } } }
             fragment I on Installation { id groupRef __typename }"
                .into(),
            json!({"id": busy}),
        ),
        (
            "query($id: UUID!, $n: Int) { installation(id: $id) { operations(first: $n) { nodes { id } } } }".into(),
            json!({"id": busy, "n": 0}),
        ),
        (
            "query($id: UUID!) { installation(id: $id) { operations(first: 2, opType: \"read\") { nodes { id object } } } }"
                .into(),
            json!({"id": busy}),
        ),
        // Pages of installations: nodes and edges, filters, cursors, sizes cut to 100.
        (
            format!("{{ installations(first: 3) {{ __typename edges {{ cursor node {{ {fields} connection {{ status }} }} }} pageInfo {{ hasPreviousPage hasNextPage startCursor endCursor }} }} }}"),
            json!({}),
        ),
        (
            "query($after: String) { installations(first: 2, after: $after) { nodes { id consumerRef } pageInfo { hasPreviousPage hasNextPage endCursor } } }"
                .into(),
            json!({"after": first}),
        ),
        (
            "{ installations(first: 500, filter: {groupRef: \"group-1\", includeDeleted: true}) { nodes { id deleted groupRef operations(first: 1) { nodes { id status } } } } }"
                .into(),
            json!({}),
        ),
        (
            "query($g: String) { installations(filter: {groupRef: $g, paused: false, health: NEEDS_REAUTH}) { nodes { id health paused } } }"
                .into(),
            json!({"g": "group-2"}),
        ),
        ("{ installations(first: 0) { nodes { id } pageInfo { hasNextPage startCursor } } }".into(), json!({})),
        ("{ installations { nodes { id } } b: installation(id: \"00000000-0000-0000-0000-000000000000\") { id } }".into(), json!({})),
    ];
    // What a plan must leave to the executor: a missing installation, a refused page size, a
    // wrong variable, a field it does not take. The answers are the executor's, errors and all.
    let refused: Vec<(String, Value)> = vec![
        ("query($id: UUID!) { installation(id: $id) { id } }".into(), json!({"id": uuid::Uuid::now_v7()})),
        (
            "query($id: UUID!) { installation(id: $id) { operations(first: 101) { nodes { id } } } }".into(),
            json!({"id": first}),
        ),
        ("query($id: UUID!) { installation(id: $id) { id } }".into(), json!({"id": "not-a-uuid"})),
        ("query($id: UUID!) { installation(id: $id) { readStates { object } } }".into(), json!({"id": first})),
        ("query($a: String) { installations(after: $a) { nodes { id } } }".into(), json!({"a": "nope"})),
        ("{ installations(first: -1) { nodes { id } } }".into(), json!({})),
    ];
    let before = answers(&http, &app.base, "plan").await;
    for (query, variables) in cases.iter().chain(&refused) {
        let expected = body(&http, &executor_base, &key, query, variables).await;
        // The first request compiles; the second and third are the plan's.
        for attempt in 0..3 {
            let got = body(&http, &app.base, &key, query, variables).await;
            assert_eq!(parsed(&got), parsed(&expected), "attempt {attempt} of {query} with {variables}");
        }
    }
    let by_plan = answers(&http, &app.base, "plan").await - before;
    // Two plan answers per case, three for the second (the first's text, compiled already);
    // none for the last (its second root is missing: the executor answers).
    assert_eq!(by_plan, 2 * (cases.len() as u64 - 1) + 1, "the cases were answered by their plans");
    // Tenancy holds on plans: another project's key meets a missing installation (the
    // executor's not_found) and an empty page; an end user's token sees its group only.
    let stranger = amplog_commands::CommandContext::new(amplog_domain::ProjectId(uuid::Uuid::now_v7()), "test");
    service.create_project(&stranger, "stranger").await.unwrap();
    let (_, stranger_key) = app.keys.create(stranger.project_id, Scope::Read, None).await.unwrap();
    let (private, public) = crate::jwt::key_pair(&["-algorithm", "ed25519"]);
    let kid = app.keys.create_jwt_key(&s.ctx, "EdDSA", &public).await.unwrap();
    let signer = jsonwebtoken::EncodingKey::from_ed_pem(private.as_bytes()).unwrap();
    let header = jsonwebtoken::Header {
        kid: Some(kid.to_string()),
        ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA)
    };
    let claims = json!({"group_ref": "group-2", "exp": chrono::Utc::now().timestamp() + 300});
    let end_user = jsonwebtoken::encode(&header, &claims, &signer).unwrap();
    let list = "{ installations(first: 100, filter: {includeDeleted: true}) { nodes { id groupRef connection { groupRef } operations(first: 3) { nodes { installationId } } } } }";
    let one = "query($id: UUID!) { installation(id: $id) { id groupRef } }";
    let before = answers(&http, &app.base, "plan").await;
    for _ in 0..3 {
        let (_, theirs) = parsed(&body(&http, &app.base, &stranger_key, list, &json!({})).await);
        assert_eq!(theirs["data"]["installations"]["nodes"], json!([]), "another project sees none");
        let (_, theirs) = parsed(&body(&http, &app.base, &stranger_key, one, &json!({"id": first})).await);
        assert_eq!(theirs["errors"][0]["extensions"]["code"], "not_found", "{theirs}");
        let (_, group) = parsed(&body(&http, &app.base, &end_user, list, &json!({})).await);
        let nodes = group["data"]["installations"]["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 3, "the group's installations: {group}");
        assert!(nodes.iter().all(|n| n["groupRef"] == "group-2" && n["connection"]["groupRef"] == "group-2"));
        let (_, mine) = parsed(&body(&http, &app.base, &end_user, one, &json!({"id": first})).await);
        assert_eq!(mine["errors"][0]["extensions"]["code"], "not_found", "another group's installation: {mine}");
    }
    assert!(answers(&http, &app.base, "plan").await - before >= 4, "plans answered the lists");
    let parsed: Value = serde_json::from_str(&body(&http, &app.base, &key, &cases[1].0, &cases[1].1).await.1).unwrap();
    assert_eq!(parsed["data"]["installation"]["operations"]["nodes"].as_array().unwrap().len(), 5);
    executor.stop().await.unwrap();
    app.stop().await;
}
