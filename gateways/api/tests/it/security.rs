//! Tenancy (twice), scopes, key revocation and the request limits.

use amplog_api::tenant::TenantDb;
use amplog_api::testing::{error_code, TestApp};
use amplog_api::ServerConfig;
use amplog_commands::testing::{seed, start_read};
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

/// Every way project A's key can name one of project B's objects, answered exactly as for
/// an id that exists nowhere.
#[tokio::test(flavor = "multi_thread")]
async fn another_projects_objects_are_not_found_by_id_by_list_or_nested() {
    let app = TestApp::spawn().await;
    let a = app.project("A").await;
    let b = seed(&app.service).await; // project B, through the command service
    let (b_op, _) = start_read(&app.service, &b, "contacts").await;
    app.projected().await;

    let by_id: Vec<(&str, Uuid)> = vec![
        ("query($id: UUID!) { integration(id: $id) { id name } }", b.integration.0),
        ("query($id: UUID!) { installation(id: $id) { id } }", b.installation.0),
        ("query($id: UUID!) { connection(id: $id) { id } }", b.connection.0),
        ("query($id: UUID!) { operation(id: $id) { id } }", b_op.0),
        ("query($id: UUID!) { installationHistory(id: $id) { events { eventId } } }", b.installation.0),
        ("query($id: UUID!) { installationAsOf(id: $id, position: 1000000) { events } }", b.installation.0),
        ("query($id: UUID!) { verifyInstallation(id: $id) { intact } }", b.installation.0),
        ("mutation($id: UUID!) { pauseInstallation(id: $id) { id } }", b.installation.0),
        ("mutation($id: UUID!) { deleteInstallation(id: $id) { id } }", b.installation.0),
        ("mutation($id: UUID!) { triggerRead(installationId: $id) { id } }", b.installation.0),
        ("mutation($id: UUID!) { triggerRead(installationId: $id, objects: [\"contacts\"]) { id } }", b.installation.0),
        ("mutation($id: UUID!) { cancelOperation(id: $id) { id } }", b_op.0),
        ("mutation($id: UUID!) { deployRevision(integrationId: $id, manifest: \"specVersion: 1.0.0\\nintegrations: [{name: x, provider: hubspot, read: {objects: [{objectName: a}]}}]\") { id } }", b.integration.0),
        (
            "mutation($id: UUID!) { createConnection(input: {integrationId: $id, groupRef: \"g\", credentials: {t: 1}}) { id } }",
            b.integration.0,
        ),
    ];
    for (query, foreign) in by_id {
        let (status, theirs) = app.gql(&a.admin, query, json!({"id": foreign})).await;
        let (_, nowhere) = app.gql(&a.admin, query, json!({"id": Uuid::now_v7()})).await;
        assert_eq!(status, 200);
        assert_eq!(error_code(&theirs), "not_found", "{query}: {theirs}");
        assert_eq!(theirs, nowhere, "{query}: another project's object answers differently from a missing one");
    }
    // A's installation on B's connection: the connection is not found either.
    let data = app
        .data(&a.admin, "mutation($m: String!) { declareIntegrations(manifest: $m, waitForVisibility: true) { id } }", json!({"m": "specVersion: 1.0.0\nintegrations: [{name: x, provider: hubspot, read: {objects: [{objectName: contacts}]}}]"}))
        .await;
    let a_integration = data["declareIntegrations"][0]["id"].as_str().unwrap();
    let (_, body) = app
        .gql(&a.write, "mutation($i: UUID!, $c: UUID!) { createInstallation(input: {integrationId: $i, connectionId: $c, groupRef: \"group-1\", consumerRef: \"c\"}) { id } }", json!({"i": a_integration, "c": b.connection.0}))
        .await;
    assert_eq!(error_code(&body), "not_found", "{body}");

    // Lists and nested fields show only A's rows.
    let data = app
        .data(&a.read, "{ integrations { id } installations { edges { node { id connection { id } operations { nodes { id } } readStates { object } usage { day } } } }
                 operations { nodes { id } } usage { day } billing { month } }", json!({}))
        .await;
    assert_eq!(data["integrations"].as_array().unwrap().len(), 1);
    assert_eq!(data["integrations"][0]["id"], a_integration);
    assert_eq!(data["installations"]["edges"], json!([]));
    assert_eq!(data["operations"]["nodes"], json!([]));
    assert_eq!(data["usage"], json!([]));
    assert_eq!(data["billing"], json!([]));
    // While B's own key sees its rows.
    let (_, b_key) = app.keys.create(b.ctx.project_id, amplog_api::Scope::Read, None).await.unwrap();
    let data =
        app.data(&b_key, "{ installations { edges { node { id operations { nodes { id } } } } } }", json!({})).await;
    assert_eq!(data["installations"]["edges"][0]["node"]["id"], b.installation.0.to_string());
    assert_eq!(data["installations"]["edges"][0]["node"]["operations"]["nodes"][0]["id"], b_op.0.to_string());

    // The audit export and the subscription answer alike.
    let client = amplog_providers::connector::http_client().build().unwrap();
    for id in [b.installation.0, Uuid::now_v7()] {
        let response = client
            .get(format!("{}/v1/audit/installations/{id}/events", app.base))
            .header("x-api-key", &a.read)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
        assert_eq!(error_code(&response.json::<Value>().await.unwrap()), "not_found");
    }
    app.stop().await;
}

/// The second line: with the application's own filters gone, PostgreSQL still shows a
/// request only its project's rows, and nothing of credentials or keys.
#[tokio::test(flavor = "multi_thread")]
async fn row_level_security_hides_other_projects_even_from_unscoped_sql() {
    let app = TestApp::spawn().await;
    let a = seed(&app.service).await;
    let b = seed(&app.service).await;
    start_read(&app.service, &a, "contacts").await;
    start_read(&app.service, &b, "contacts").await;
    app.projected().await;
    let db = TenantDb::new(app.db.pool.clone(), a.ctx.project_id, 5_000);
    for table in
        ["events", "integrations", "installations", "connections", "operations", "read_states", "installation_streams"]
    {
        let (total, foreign): (i64, i64) =
            sqlx::query_as(&format!("SELECT count(*), count(*) FILTER (WHERE project_id <> $1) FROM {table}"))
                .bind(a.ctx.project_id.0)
                .fetch_one(&mut *db.conn().await.unwrap())
                .await
                .unwrap();
        assert_eq!(foreign, 0, "{table}: another project's rows are visible");
        let all: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE project_id = $1"))
            .bind(a.ctx.project_id.0)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        assert_eq!(total, all, "{table}: the project's own rows must all be visible");
        assert!(all > 0, "{table} has rows to show");
    }
    for table in ["credentials", "api_keys", "idempotency_keys", "aggregate_snapshots", "reader_checkpoints"] {
        db.release().await;
        let denied =
            sqlx::query(&format!("SELECT 1 FROM {table} LIMIT 1")).execute(&mut *db.conn().await.unwrap()).await;
        let code =
            denied.expect_err("amplog_app must not read it").as_database_error().unwrap().code().unwrap().to_string();
        assert_eq!(code, "42501", "{table}: insufficient_privilege expected");
    }
    db.release().await;
    let written = sqlx::query("DELETE FROM installations").execute(&mut *db.conn().await.unwrap()).await;
    assert!(written.is_err(), "amplog_app must not write");
    db.release().await;
    // A transaction with no project set sees nothing at all.
    let mut tx = amplog_log::tx::begin(&app.db.pool).await.unwrap();
    sqlx::query("SELECT set_config('role', 'amplog_app', true)").execute(&mut *tx).await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&mut *tx).await.unwrap();
    assert_eq!(seen, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scopes_limit_what_a_key_does_and_a_revoked_key_is_refused_within_a_second() {
    let app = TestApp::spawn().await;
    let p = app.project("Acme").await;
    let manifest =
        "specVersion: 1.0.0\nintegrations: [{name: x, provider: hubspot, read: {objects: [{objectName: contacts}]}}]";
    let declare = "mutation($m: String!) { declareIntegrations(manifest: $m) { id } }";
    for key in [&p.read, &p.write] {
        let (status, body) = app.gql(key, declare, json!({"m": manifest})).await;
        assert_eq!(status, 200);
        assert_eq!(error_code(&body), "forbidden", "{body}");
        assert_eq!(body["errors"][0]["extensions"]["status"], 403);
    }
    let data = app.data(&p.admin, declare, json!({"m": manifest})).await;
    let integration = data["declareIntegrations"][0]["id"].as_str().unwrap().to_string();
    let connect = "mutation($i: UUID!) { createConnection(input: {integrationId: $i, groupRef: \"g\", credentials: {t: 1}}) { id } }";
    let (_, body) = app.gql(&p.read, connect, json!({"i": integration})).await;
    assert_eq!(error_code(&body), "forbidden");
    app.data(&p.write, connect, json!({"i": integration})).await;
    let viewer = app.data(&p.read, "{ viewer { scope projectId } }", json!({})).await;
    assert_eq!(viewer["viewer"], json!({"scope": "read", "projectId": p.ctx.project_id.0.to_string()}));

    // Missing, malformed, unknown, and right id with the wrong secret: all 401.
    let id_part = &p.read[..36]; // amp_<32 hex digits>_<secret>
    for key in ["", "garbage", "amp_00000000000000000000000000000000_x", &format!("{id_part}_wrong-secret")] {
        let (status, body) = app.gql(key, "{ viewer { scope } }", json!({})).await;
        assert_eq!(status, 401, "{key}");
        assert_eq!(error_code(&body), "unauthenticated");
    }
    // Revoked elsewhere (another replica, the CLI): this server refuses it within a second.
    let key_id: Uuid = id_part.trim_start_matches("amp_").parse().unwrap();
    app.data(&p.read, "{ viewer { scope } }", json!({})).await; // now cached as valid
    let elsewhere = amplog_api::Keys::new(&app.service);
    assert!(elsewhere.revoke(key_id).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = app.gql(&p.read, "{ viewer { scope } }", json!({})).await;
    assert_eq!(status, 401, "{body}");
    assert!(!elsewhere.revoke(key_id).await.unwrap(), "revoking twice reports it");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_and_production_mode_refuse_expensive_or_revealing_requests() {
    let app = TestApp::spawn().await;
    let p = app.project("Acme").await;
    let deep = "{ installations { edges { node { connection { id } integration { objects { name } }
        operations { nodes { id } pageInfo { endCursor } } } } } }";
    app.data(&p.read, deep, json!({})).await;
    // Depth: 12 nested levels.
    let nested =
        (0..12).fold("id".to_string(), |inner, _| format!("installation(id: \"{}\") {{ {inner} }}", Uuid::nil()));
    let (_, body) = app.gql(&p.read, &format!("{{ {nested} }}"), json!({})).await;
    assert_eq!(error_code(&body), "graphql_validation", "{body}");
    // Complexity: 100 installations × 100 operations each.
    let (_, body) = app
        .gql(&p.read, "{ installations(first: 100) { edges { node { operations(first: 100) { nodes { id status object records } } } } } }", json!({}))
        .await;
    assert_eq!(error_code(&body), "graphql_validation", "{body}");
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("complex"), "{body}");
    // Aliases.
    let aliases: String = (0..31).map(|i| format!("a{i}: viewer {{ scope }} ")).collect();
    let (status, body) = app.gql(&p.read, &format!("{{ {aliases} }}"), json!({})).await;
    assert_eq!((status, error_code(&body)), (400, "too_many_aliases"), "{body}");
    // Body size.
    let (status, body) =
        app.gql(&p.read, &format!("{{ viewer {{ scope }} }} #{}", "x".repeat(300_000)), json!({})).await;
    assert_eq!((status, error_code(&body)), (413, "payload_too_large"), "{body}");
    // Introspection and GraphiQL are off in production.
    let (status, body) = app.gql(&p.read, "{ __schema { types { name } } }", json!({})).await;
    assert_eq!((status, error_code(&body)), (400, "introspection_disabled"), "{body}");
    assert!(!body.to_string().contains("Installation"), "{body}");
    let (status, body) = app.gql(&p.read, "{ __type(name: \"Installation\") { fields { name } } }", json!({})).await;
    assert_eq!((status, error_code(&body)), (400, "introspection_disabled"), "{body}");
    let page = reqwest::get(format!("{}/graphql", app.base)).await.unwrap();
    assert_eq!(page.status(), 404);
    let asset = reqwest::get(format!("{}/graphql/assets/graphiql.min.js", app.base)).await.unwrap();
    assert_eq!(asset.status(), 404, "GraphiQL's assets are dev-only too");
    assert!(!page.text().await.unwrap().contains("graphiql"));
    app.stop().await;

    // Development mode: both on.
    let dev = TestApp::spawn_with(ServerConfig { dev: true, ..ServerConfig::default() }, true).await;
    let p = dev.project("Acme").await;
    // The standard introspection query (graphql-core's, as gql, codegen tools and IDEs
    // send it) runs under the default limits; a data query as deep is still refused.
    let data = dev.data(&p.read, INTROSPECTION_QUERY, json!({})).await;
    let types: Vec<&str> =
        data["__schema"]["types"].as_array().unwrap().iter().filter_map(|t| t["name"].as_str()).collect();
    assert!(types.contains(&"Installation") && types.contains(&"Int64"), "{types:?}");
    let (_, body) = dev.gql(&p.read, &format!("{{ {nested} }}"), json!({})).await;
    assert_eq!(error_code(&body), "graphql_validation", "{body}");
    let data = dev.data(&p.read, "{ __type(name: \"Installation\") { fields { name } } }", json!({})).await;
    assert!(data["__type"]["fields"].as_array().unwrap().iter().any(|f| f["name"] == "operations"));
    let page = reqwest::get(format!("{}/graphql", dev.base)).await.unwrap();
    assert_eq!(page.status(), 200);
    for name in ["..%2F..%2Fetc%2Fpasswd", "graphiql.min.js%00", "index.html", "GRAPHIQL.MIN.JS"] {
        let asset = reqwest::get(format!("{}/graphql/assets/{name}", dev.base)).await.unwrap();
        assert_eq!(asset.status(), 404, "{name}");
    }
    assert!(page.text().await.unwrap().to_lowercase().contains("graphiql"));
    dev.stop().await;

    // An execution timeout answers 503 with a code, not a hung request or a 500.
    let slow = TestApp::spawn_with(
        ServerConfig { request_timeout: Duration::from_nanos(1), ..ServerConfig::default() },
        false,
    )
    .await;
    let p = slow.project("Acme").await;
    let (status, body) = slow.gql(&p.read, "{ installations { edges { node { id } } } }", json!({})).await;
    assert_eq!((status, error_code(&body)), (503, "timeout"), "{body}");
    slow.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nested_lists_are_batched_not_queried_per_item() {
    let app = TestApp::spawn_with(ServerConfig { dev: true, ..ServerConfig::default() }, true).await;
    let mut seeded = Vec::new();
    let first = seed(&app.service).await;
    for i in 0..15 {
        let new = amplog_commands::service::NewInstallation {
            integration_id: first.integration,
            revision: None,
            group_ref: "group-1".into(),
            consumer_ref: format!("consumer-{i}"),
            connection_id: first.connection,
            objects: None,
        };
        let outcome = app.service.create_installation(&first.ctx, &new).await.unwrap();
        let installation = amplog_domain::InstallationId(outcome.id_of("installation").unwrap());
        let s = amplog_commands::testing::Seeded { installation, ctx: first.ctx.clone(), ..first };
        start_read(&app.service, &s, "contacts").await;
        seeded.push(s);
    }
    app.projected().await;
    let (_, key) = app.keys.create(first.ctx.project_id, amplog_api::Scope::Read, None).await.unwrap();
    let query = "{ installations(first: 20) { edges { node { id connection { status } integration { name }
        operations(first: 5) { nodes { status } } readStates { object mode } usage { day } } } } }";
    let (_, body) = app.gql(&key, query, json!({})).await;
    assert!(body.get("errors").is_none(), "{body}");
    let edges = body["data"]["installations"]["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 16);
    assert!(edges.iter().skip(1).all(|e| e["node"]["operations"]["nodes"][0]["status"] == "running"));
    // One statement for the page and about one per nested kind (connection, integration,
    // operations, read states, usage; a busy machine may split a batch in two), never one
    // per installation and kind (that would be 1 + 16 × 5).
    let statements = body["extensions"]["sqlStatements"].as_i64().unwrap();
    assert!(statements < 16, "{statements} statements for 16 installations");
    app.stop().await;
}

/// graphql-core's `get_introspection_query()`, verbatim.
const INTROSPECTION_QUERY: &str = "
    query IntrospectionQuery {
      __schema {
        queryType { name }
        mutationType { name }
        subscriptionType { name }
        types {
          ...FullType
        }
        directives {
          name
          description
          locations
          args {
            ...InputValue
          }
        }
      }
    }

    fragment FullType on __Type {
      kind
      name
      description
      fields(includeDeprecated: true) {
        name
        description
        args {
          ...InputValue
        }
        type {
          ...TypeRef
        }
        isDeprecated
        deprecationReason
      }
      inputFields {
        ...InputValue
      }
      interfaces {
        ...TypeRef
      }
      enumValues(includeDeprecated: true) {
        name
        description
        isDeprecated
        deprecationReason
      }
      possibleTypes {
        ...TypeRef
      }
    }

    fragment InputValue on __InputValue {
      name
      description
      type { ...TypeRef }
      defaultValue
    }

    fragment TypeRef on __Type {
      kind
      name
      ofType {
        kind
        name
        ofType {
          kind
          name
          ofType {
            kind
            name
            ofType {
              kind
              name
              ofType {
                kind
                name
                ofType {
                  kind
                  name
                  ofType {
                    kind
                    name
                  }
                }
              }
            }
          }
        }
      }
    }
";

/// Opens `/graphql/ws` with graphql-transport-ws and `connection_init` carrying `key`.
async fn ws_connect(app: &TestApp, key: &str) -> WsClient {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request =
        format!("ws://{}/graphql/ws", app.base.trim_start_matches("http://")).into_client_request().unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::text(json!({"type": "connection_init", "payload": {"apiKey": key}}).to_string())).await.unwrap();
    let ack = ws_next(&mut ws).await;
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    ws
}

type WsClient = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
use tokio_tungstenite::tungstenite::Message;

/// The next JSON message, pings aside; `Null` when the server closed the socket.
async fn ws_next(ws: &mut WsClient) -> Value {
    use futures::StreamExt;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), ws.next()).await.expect("a message within 20 s");
        match message {
            Some(Ok(Message::Text(text))) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                if value["type"] != "ping" && value["type"] != "pong" {
                    return value;
                }
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => return Value::Null,
            Some(Ok(_)) => {}
        }
    }
}

/// Sends one operation over the socket and returns its first `next` payload (or `Null`
/// when the socket was closed).
async fn ws_operation(ws: &mut WsClient, id: &str, query: &str, variables: Value) -> Value {
    use futures::SinkExt;
    let message = json!({"type": "subscribe", "id": id, "payload": {"query": query, "variables": variables}});
    if ws.send(Message::text(message.to_string())).await.is_err() {
        return Value::Null;
    }
    loop {
        let reply = ws_next(ws).await;
        if reply.is_null() || (reply["id"] == id && reply["type"] == "next") {
            return reply["payload"].clone();
        }
        if reply["id"] == id && reply["type"] == "error" {
            return json!({"errors": reply["payload"]});
        }
    }
}

fn nested(open: &str, inner: &str, close: &str, depth: usize) -> String {
    format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
}

/// The hostile corpus: requests a tenant can send in a few kilobytes that once aborted the
/// process, froze every tenant or stopped the projector. Each is answered with a 4xx and a
/// code, over HTTP and over WebSocket, and the process goes on serving.
fn hostile_queries(installation: &str) -> Vec<(&'static str, String, Value, &'static str)> {
    let deep = 2_000;
    vec![
        (
            "a list argument",
            format!("{{ installation(id: {}) {{ id }} }}", nested("[", "1", "]", deep)),
            json!({}),
            "too_deep",
        ),
        (
            "an object argument",
            format!("{{ installations(first: {}) {{ edges {{ node {{ id }} }} }} }}", nested("{a: ", "1", "}", deep)),
            json!({}),
            "too_deep",
        ),
        (
            "a variable default",
            format!("query($x: [Int] = {}) {{ viewer {{ scope }} }}", nested("[", "1", "]", deep)),
            json!({}),
            "too_deep",
        ),
        (
            "a mutation argument",
            format!(
                "mutation {{ triggerRead(installationId: \"{installation}\", objects: {}) {{ id }} }}",
                nested("[", "\"x\"", "]", deep)
            ),
            json!({}),
            "too_deep",
        ),
        (
            "a directive argument",
            format!("{{ viewer @skip(if: {}) {{ scope }} }}", nested("[", "true", "]", deep)),
            json!({}),
            "too_deep",
        ),
        ("selection sets", format!("{{ {} }}", nested("viewer { ", "scope", " }", deep)), json!({}), "too_deep"),
        (
            "nested variables",
            "query($v: [String]) { viewer { scope } }".into(),
            json!({"v": serde_json::from_str::<Value>(&nested("[", "1", "]", 100)).unwrap()}),
            "too_deep",
        ),
        (
            "an alias flood",
            format!("{{ {} }}", (0..1000).map(|i| format!("a{i}: viewer {{ scope }}")).collect::<Vec<_>>().join(" ")),
            json!({}),
            "too_many_aliases",
        ),
        (
            "NUL in a mutation's text",
            "mutation($i: UUID!) { pauseInstallation(id: $i) { id } }".into(),
            json!({"i": "\u{0}"}),
            "graphql_validation",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_corpus_is_refused_with_codes_over_http_and_websocket_and_the_process_lives() {
    let app = TestApp::spawn().await;
    let s = seed(&app.service).await;
    let (key_id, write) = app.keys.create(s.ctx.project_id, amplog_api::Scope::Admin, None).await.unwrap();
    let installation = s.installation.0.to_string();
    let client = amplog_providers::connector::http_client().build().unwrap();
    let rss = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().to_string();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
    };
    let rss_before = rss();

    for (what, query, variables, code) in hostile_queries(&installation) {
        let (status, body) = app.gql(&write, &query, variables).await;
        let reported = body["errors"][0]["extensions"]["status"].as_u64().unwrap_or(status as u64);
        assert!((400..500).contains(&reported), "{what}: {status} {body}");
        assert_eq!(error_code(&body), code, "{what}: {body}");
    }
    // Bodies that are not GraphQL requests at all.
    let too_deep_json = format!(
        "{{\"query\": \"{{ viewer {{ scope }} }}\", \"variables\": {{\"v\": {}}}}}",
        nested("[", "1", "]", 5_000)
    );
    let bodies: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("JSON nested 5,000 deep", too_deep_json.into_bytes(), 400, "bad_request"),
        ("bad UTF-8", b"{\"query\": \"{ viewer { scope } }\xff\xfe\"}".to_vec(), 400, "bad_request"),
        ("a NUL byte", b"{\"query\": \"{ viewer { scope } }\x00\"}".to_vec(), 400, "bad_request"),
        ("a huge body", format!("{{\"query\": \"{}\"}}", "{".repeat(270_000)).into_bytes(), 413, "payload_too_large"),
        ("an empty body", Vec::new(), 400, "bad_request"),
    ];
    for (what, body, status, code) in bodies {
        let response = client
            .post(format!("{}/graphql", app.base))
            .header("x-api-key", &write)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{what}");
        assert_eq!(error_code(&response.json::<Value>().await.unwrap()), code, "{what}");
    }

    // The export's times are checked before the stream begins.
    let export = client
        .get(format!("{}/v1/audit/installations/{installation}/events?to=-262143-01-01T00:00:00Z", app.base))
        .header("x-api-key", &write)
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 400);
    assert_eq!(error_code(&export.json::<Value>().await.unwrap()), "invalid_input");
    // Production mode names no field the query did not: no "Did you mean".
    let (_, body) = app.gql(&write, "{ instalations { edges { node { id } } } }", json!({})).await;
    assert_eq!(error_code(&body), "graphql_validation", "{body}");
    assert!(!body.to_string().contains("installations"), "{body}");

    // Manifests: U+0000 in a name, nesting the YAML parser takes quadratic time on, an
    // alias bomb, a name too long, a provider that does not exist.
    let declare = "mutation($m: String!) { declareIntegrations(manifest: $m) { id } }";
    let manifest = |object: &str| {
        format!("specVersion: 1.0.0\nintegrations: [{{name: x, provider: hubspot, read: {{objects: [{{objectName: {object}}}]}}}}]")
    };
    let bomb = "specVersion: 1.0.0\na: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\nintegrations: []\n";
    let manifests = vec![
        ("a NUL in a field name", manifest("\"contacts\\0\"")),
        ("flow nesting", format!("specVersion: 1.0.0\nintegrations: {}", nested("[", "x", "]", 40_000))),
        ("block nesting", format!("specVersion: 1.0.0\nintegrations:\n{}x", "- ".repeat(40_000))),
        ("an alias bomb", bomb.to_string()),
        ("a long name", manifest(&"n".repeat(300))),
        ("an unknown provider", manifest("contacts").replace("hubspot", "no-such-crm")),
    ];
    for (what, m) in manifests {
        let (_, body) = app.gql(&write, declare, json!({"m": m})).await;
        assert_eq!(error_code(&body), "manifest.invalid", "{what}: {body}");
    }
    // Destinations: only well-formed https URLs to public addresses.
    let create = "mutation($u: String!) { createDestination(name: \"hooks\", url: $u) { name } }";
    for url in [
        "http://127.0.0.1:8080/hooks",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/x",
        "https://localhost/x",
        "http://hooks.example.com/x",
        "https://user:secret@hooks.example.com/x",
        "not a url",
        "file:///etc/passwd",
    ] {
        let (_, body) = app.gql(&write, create, json!({"u": url})).await;
        assert_eq!(error_code(&body), "invalid_input", "{url}: {body}");
    }
    app.data(&write, create, json!({"u": "https://hooks.example.com/amplog"})).await;
    // Schedules in characters wider than a byte: refused, not a panic.
    for schedule in ["@every 1ü", "@every 5分", "@every 分"] {
        let (_, body) = app
            .gql(&write, "mutation($i: UUID!, $s: String!) { updateInstallation(id: $i, objects: [{name: \"contacts\", schedule: $s}]) { id } }", json!({"i": installation, "s": schedule}))
            .await;
        assert_eq!(error_code(&body), "installation.invalid_schedule", "{schedule}: {body}");
        let (_, body) = app.gql(&write, declare, json!({"m": manifest("contacts").replace("objectName: contacts", &format!("objectName: contacts, schedule: \"{schedule}\""))})).await;
        assert_eq!(error_code(&body), "integration.invalid_schedule", "{schedule}: {body}");
    }
    // A read of one object named 2,000 times is one read, and an object the installation
    // does not have refuses the whole request.
    let trigger = "mutation($i: UUID!, $o: [String!]) { triggerRead(installationId: $i, objects: $o) { id } }";
    let (_, body) = app.gql(&write, trigger, json!({"i": installation, "o": vec!["contacts"; 2000]})).await;
    assert_eq!(error_code(&body), "too_many_objects", "{body}");
    let data = app.data(&write, trigger, json!({"i": installation, "o": ["contacts", "contacts", "deals"]})).await;
    assert_eq!(data["triggerRead"].as_array().unwrap().len(), 2, "{data}");
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.db.pool).await.unwrap();
    let (_, body) = app.gql(&write, trigger, json!({"i": installation, "o": ["companies", "tickets"]})).await;
    assert_eq!(error_code(&body), "installation.unknown_object", "{body}");
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(before, after, "a refused triggerRead requested nothing");
    // Text the read models cannot hold, through a mutation: refused with a typed error.
    let operation = data["triggerRead"][0]["id"].as_str().unwrap();
    let (_, body) = app
        .gql(
            &write,
            "mutation($o: UUID!, $r: String!) { cancelOperation(id: $o, reason: $r) { id } }",
            json!({"o": operation, "r": "a\u{0}b"}),
        )
        .await;
    assert_eq!(
        (error_code(&body), &body["errors"][0]["extensions"]["status"]),
        ("invalid_text", &json!(400)),
        "{body}"
    );

    // Over WebSocket: the same corpus, the same codes; then queries and mutations run there
    // as over HTTP (each with its tenant transaction and DataLoader).
    let mut ws = ws_connect(&app, &write).await;
    for (i, (what, query, variables, code)) in hostile_queries(&installation).into_iter().enumerate() {
        let payload = ws_operation(&mut ws, &format!("h{i}"), &query, variables).await;
        assert_eq!(error_code(&payload), code, "{what} over WebSocket: {payload}");
    }
    let payload = ws_operation(
        &mut ws,
        "q",
        "{ viewer { scope } installations { edges { node { id connection { id } } } } }",
        json!({}),
    )
    .await;
    assert_eq!(payload["data"]["viewer"]["scope"], "admin", "{payload}");
    assert_eq!(payload["data"]["installations"]["edges"][0]["node"]["id"], installation, "{payload}");
    let payload = ws_operation(
        &mut ws,
        "m",
        "mutation($i: UUID!) { pauseInstallation(id: $i) { id replayed } }",
        json!({"i": installation}),
    )
    .await;
    assert_eq!(payload["data"]["pauseInstallation"]["id"], installation, "{payload}");
    // Subscriptions per connection are bounded: of 17 sent at once, one is refused.
    let subscription = "subscription($id: UUID!) { operationUpdates(installationId: $id) { id } }";
    {
        use futures::SinkExt;
        for i in 0..17 {
            let message = json!({"type": "subscribe", "id": format!("s{i}"), "payload": {"query": subscription, "variables": {"id": installation}}});
            ws.send(Message::text(message.to_string())).await.unwrap();
        }
    }
    // Skip the mutation's end and what the accepted subscriptions already sent (their first
    // snapshots may come before the refusal).
    let mut refused = ws_next(&mut ws).await;
    for _ in 0..200 {
        let data = refused["type"] == "next" && refused["payload"]["errors"].is_null();
        let others_end = refused["type"] == "complete" && !refused["id"].as_str().unwrap().starts_with('s');
        if !data && !others_end {
            break;
        }
        refused = ws_next(&mut ws).await;
    }
    assert_eq!(refused["type"], "next", "{refused}");
    assert_eq!(error_code(&refused["payload"]), "too_many_subscriptions", "{refused}");
    assert_eq!(ws_next(&mut ws).await, json!({"type": "complete", "id": refused["id"]}));
    // A revoked key is refused on its open socket within a second.
    assert!(app.keys.revoke(key_id).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let payload = ws_operation(&mut ws, "late", "{ viewer { scope } }", json!({})).await;
    assert_eq!(error_code(&payload), "unauthenticated", "{payload}");
    // A message larger than an HTTP body closes that socket, and only that one.
    let (_, read) = app.keys.create(s.ctx.project_id, amplog_api::Scope::Read, None).await.unwrap();
    let mut big = ws_connect(&app, &read).await;
    let huge = format!("{{ viewer {{ scope }} }} #{}", "x".repeat(12 << 20));
    assert!(ws_operation(&mut big, "big", &huge, json!({})).await.is_null(), "a 12 MiB message is refused");
    let mut again = ws_connect(&app, &read).await;
    let payload = ws_operation(&mut again, "ok", "{ viewer { scope } }", json!({})).await;
    assert_eq!(payload["data"]["viewer"]["scope"], "read", "{payload}");

    // Still serving, within bounded memory.
    let health = client.get(format!("{}/healthz", app.base)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    app.data(&read, "{ viewer { scope } }", json!({})).await;
    let grown = rss().saturating_sub(rss_before);
    assert!(grown < 512, "the process grew by {grown} MiB");
    app.stop().await;
}

/// A request that cannot reach PostgreSQL (a restart, a failover, a pool that cannot
/// connect) is a retryable 503 with a code, not a 500 `internal`.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_database_answers_a_retryable_503_with_a_code() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(); // dropped: nothing listens
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(&format!("postgres://postgres@{closed}/amplog"))
        .unwrap();
    let service = amplog_commands::CommandService::new(
        pool.clone(),
        amplog_log::EventStore::default(),
        amplog_commands::testing::credential_store(),
    );
    let config = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() };
    let server =
        amplog_api::server::Server::start(config, service.clone(), amplog_api::Keys::new(&service)).await.unwrap();
    let client = amplog_providers::connector::http_client().build().unwrap();
    let key = format!("amp_{}_secret", Uuid::now_v7().simple());
    let response = client
        .post(format!("http://{}/graphql", server.addr))
        .header("x-api-key", key)
        .json(&json!({"query": "{ viewer { scope } }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "database_unavailable", "{body}");
    assert_eq!(body["errors"][0]["extensions"]["status"], 503);
    server.stop().await.unwrap();
}

/// PostgreSQL's server binaries: on PATH, else the newest /usr/lib/postgresql/N/bin.
fn postgres_bin() -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path).find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
    });
    on_path.unwrap_or_else(|| {
        let mut found: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries (scripts/test installs them)")
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|bin| bin.join("initdb").is_file())
            .collect();
        found.sort();
        found.pop().expect("initdb")
    })
}

/// A PostgreSQL restart under a running server: a request that meets it answers a
/// retryable 503 `database_unavailable`, and the server answers again once PostgreSQL is
/// back, without a restart of its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_postgresql_restart_answers_503_and_the_server_recovers() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    let bin = postgres_bin();
    let root = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap().trim() == "0";
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let pg = |program: &str| {
        let mut command = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join(program));
            c
        } else {
            Command::new(bin.join(program))
        };
        command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        command
    };
    let data = dir.path().join("data");
    let initdb = pg("initdb").arg("-D").arg(&data).args(["-U", "postgres", "-A", "trust", "--no-sync"]).status();
    assert!(initdb.unwrap().success(), "initdb");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let options = format!("-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off", dir.path().display());
    let ctl = |action: &str| {
        let mut command = pg("pg_ctl");
        command.arg(action).arg("-D").arg(&data).args(["-w", "-m", "fast"]);
        if action == "start" {
            command.arg("-l").arg(dir.path().join("log")).arg("-o").arg(&options);
        }
        assert!(command.status().unwrap().success(), "pg_ctl {action}");
    };
    ctl("start");
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&url)
        .await
        .unwrap();
    amplog_migrations::migrate(&mut pool.acquire().await.unwrap()).await.unwrap();
    let service = amplog_commands::CommandService::new(
        pool.clone(),
        amplog_log::EventStore::default(),
        amplog_commands::testing::credential_store(),
    );
    let ctx = amplog_commands::CommandContext::new(amplog_domain::ProjectId(Uuid::now_v7()), "test");
    service.create_project(&ctx, "Acme").await.unwrap();
    let keys = amplog_api::Keys::new(&service);
    let (_, key) = keys.create(ctx.project_id, amplog_api::Scope::Read, None).await.unwrap();
    let config = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() };
    let server = amplog_api::server::Server::start(config, service, keys).await.unwrap();
    let client = amplog_providers::connector::http_client().build().unwrap();
    let ask = || async {
        let response = client
            .post(format!("http://{}/graphql", server.addr))
            .header("x-api-key", &key)
            .json(&json!({"query": "{ viewer { scope } installations { edges { node { id } } } }"}))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json::<Value>().await.unwrap())
    };
    assert_eq!(ask().await.0, 200);
    ctl("stop");
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the key cache
    let (status, body) = ask().await;
    assert_eq!((status, error_code(&body)), (503, "database_unavailable"), "{body}");
    ctl("start");
    let mut back = None;
    for _ in 0..50 {
        let (status, body) = ask().await;
        if status == 200 && body.get("errors").is_none() {
            back = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(back.expect("the server answers again")["data"]["viewer"]["scope"], "read");
    server.stop().await.unwrap();
    pool.close().await;
    ctl("stop");
}
