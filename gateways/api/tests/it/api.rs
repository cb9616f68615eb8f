//! The builder's API end to end: a real server on a real PostgreSQL, driven over HTTP.

use amplog_api::testing::{error_code, TestApp, TestProject};
use serde_json::{json, Value};

pub const MANIFEST: &str = r#"
specVersion: 1.0.0
integrations:
  - name: hubspot-crm
    provider: hubspot
    read:
      objects:
        - objectName: contacts
          schedule: "*/10 * * * *"
          backfill:
            defaultPeriod:
              days: 30
          requiredFields:
            - fieldName: email
        - objectName: companies
          schedule: "@every 1h"
"#;

const SECRET_TOKEN: &str = "sk-live-very-secret-access-token-7731";

/// Declares the manifest's integration, a connection and an installation through the API.
async fn builder_setup(app: &TestApp, p: &TestProject, group: &str) -> (String, String, String) {
    let data = app
        .data(&p.admin, "mutation($m: String!) { declareIntegrations(manifest: $m) { id } }", json!({"m": MANIFEST}))
        .await;
    let integration = data["declareIntegrations"][0]["id"].as_str().unwrap().to_string();
    let data = app
        .data(
            &p.write,
            "mutation($i: CreateConnectionInput!) { createConnection(input: $i) { id } }",
            json!({"i": {"integrationId": integration, "groupRef": group,
                         "credentials": {"access_token": SECRET_TOKEN, "refresh_token": "rt-1"}}}),
        )
        .await;
    let connection = data["createConnection"]["id"].as_str().unwrap().to_string();
    let data = app
        .data(
            &p.write,
            "mutation($i: CreateInstallationInput!) {
                 createInstallation(input: $i, waitForVisibility: true) { id visible installation { id health } } }",
            json!({"i": {"integrationId": integration, "connectionId": connection, "groupRef": group,
                         "consumerRef": format!("{group}-consumer")}}),
        )
        .await;
    assert_eq!(data["createInstallation"]["visible"], true);
    assert_eq!(data["createInstallation"]["installation"]["health"], "healthy");
    let installation = data["createInstallation"]["id"].as_str().unwrap().to_string();
    (integration, connection, installation)
}

const INSTALLATION: &str = "query($id: UUID!) { installation(id: $id) {
    id groupRef consumerRef health paused revision connectionStatus
    objects { name enabled schedule backfill backfillDays }
    lastOperation { operationId status }
    connection { id status provider credentialFingerprint }
    integration { name provider latestRevision }
    operations(first: 10) { nodes { id opType object status trigger } pageInfo { hasNextPage endCursor } }
    readStates { object mode }
    usage { day recordsRead }
} }";

#[tokio::test(flavor = "multi_thread")]
async fn a_builder_declares_connects_installs_reads_and_sees_it_all() {
    let app = TestApp::spawn().await;
    let p = app.project("Acme").await;
    let (integration, connection, installation) = builder_setup(&app, &p, "customer-1").await;

    let data = app.data(&p.read, "{ integrations { id name provider latestRevision objects { name schedule backfill backfillDays fields } } }", json!({})).await;
    assert_eq!(
        data["integrations"],
        json!([{"id": integration, "name": "hubspot-crm", "provider": "hubspot", "latestRevision": 1, "objects": [
            {"name": "contacts", "schedule": "*/10 * * * *", "backfill": "days", "backfillDays": 30, "fields": ["email"]},
            {"name": "companies", "schedule": "@every 1h", "backfill": "none", "backfillDays": null, "fields": []}]}])
    );

    // Trigger a read of both objects and wait until it is visible.
    let data = app
        .data(
            &p.write,
            "mutation($id: UUID!) { triggerRead(installationId: $id, waitForVisibility: true) {
                 id visible events { aggregateType eventType } operation { status object } } }",
            json!({"id": installation}),
        )
        .await;
    let reads = data["triggerRead"].as_array().unwrap();
    assert_eq!(reads.len(), 2);
    for read in reads {
        assert_eq!(read["visible"], true);
        assert_eq!(read["operation"]["status"], "pending");
        let types: Vec<&str> =
            read["events"].as_array().unwrap().iter().map(|e| e["eventType"].as_str().unwrap()).collect();
        assert_eq!(types, vec!["OperationRequested", "Requested"]);
    }

    let data = app.data(&p.read, INSTALLATION, json!({"id": installation})).await;
    let inst = &data["installation"];
    assert_eq!(inst["groupRef"], "customer-1");
    assert_eq!(inst["consumerRef"], "customer-1-consumer");
    assert_eq!(inst["paused"], false);
    assert_eq!(inst["revision"], 1);
    assert_eq!(inst["connection"]["id"], connection.as_str());
    assert_eq!(inst["connection"]["provider"], "hubspot");
    assert_eq!(inst["integration"]["name"], "hubspot-crm");
    assert_eq!(inst["objects"][0]["name"], "companies");
    assert_eq!(inst["objects"][1]["backfillDays"], 30);
    let ops = inst["operations"]["nodes"].as_array().unwrap();
    assert_eq!(ops.len(), 2);
    assert!(ops.iter().all(|o| o["status"] == "pending" && o["opType"] == "read" && o["trigger"] == "triggered"));
    assert_eq!(inst["operations"]["pageInfo"]["hasNextPage"], false);
    let mut states: Vec<&str> =
        inst["readStates"].as_array().unwrap().iter().map(|s| s["object"].as_str().unwrap()).collect();
    states.sort();
    assert_eq!(states, vec!["companies", "contacts"]);

    // Cancel one; pause; a read on a paused installation is refused with a typed error.
    let op = ops[0]["id"].as_str().unwrap();
    let data = app
        .data(
            &p.write,
            "mutation($id: UUID!) { cancelOperation(id: $id, waitForVisibility: true) { operation { status } } }",
            json!({"id": op}),
        )
        .await;
    assert_eq!(data["cancelOperation"]["operation"]["status"], "cancelled");
    let data = app
        .data(
            &p.write,
            "mutation($id: UUID!) { pauseInstallation(id: $id, waitForVisibility: true) { installation { paused } } }",
            json!({"id": installation}),
        )
        .await;
    assert_eq!(data["pauseInstallation"]["installation"]["paused"], true);
    let (status, body) = app
        .gql(
            &p.write,
            "mutation($id: UUID!) { triggerRead(installationId: $id, objects: [\"contacts\"]) { id } }",
            json!({"id": installation}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(error_code(&body), "installation.paused");
    assert_eq!(body["errors"][0]["extensions"]["status"], 422);
    assert_eq!(body["data"], Value::Null);

    // Filters and Relay pagination over three installations.
    builder_setup(&app, &p, "customer-2").await;
    builder_setup(&app, &p, "customer-3").await;
    let page =
        "query($after: String, $filter: InstallationFilter) { installations(first: 2, after: $after, filter: $filter) {
        edges { cursor node { groupRef } } pageInfo { hasNextPage hasPreviousPage endCursor } } }";
    let first = app.data(&p.read, page, json!({})).await;
    let groups = |d: &Value| -> Vec<String> {
        d["installations"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["node"]["groupRef"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(groups(&first), vec!["customer-1", "customer-2"]);
    assert_eq!(first["installations"]["pageInfo"]["hasNextPage"], true);
    let after = first["installations"]["pageInfo"]["endCursor"].clone();
    let second = app.data(&p.read, page, json!({"after": after})).await;
    assert_eq!(groups(&second), vec!["customer-3"]);
    assert_eq!(second["installations"]["pageInfo"]["hasNextPage"], false);
    assert_eq!(second["installations"]["pageInfo"]["hasPreviousPage"], true);
    let paused = app.data(&p.read, page, json!({"filter": {"paused": true}})).await;
    assert_eq!(groups(&paused), vec!["customer-1"]);
    let by_group = app.data(&p.read, page, json!({"filter": {"groupRef": "customer-3", "health": "HEALTHY"}})).await;
    assert_eq!(groups(&by_group), vec!["customer-3"]);
    let (_, body) = app.gql(&p.read, page, json!({"after": "not-a-cursor"})).await;
    assert_eq!(error_code(&body), "invalid_cursor");

    // Reconfigure, unpause, delete.
    let data = app
        .data(
            &p.write,
            "mutation($id: UUID!) { updateInstallation(id: $id, waitForVisibility: true, objects: [
                 {name: \"contacts\", schedule: \"@every 5m\", fullBackfill: true},
                 {name: \"companies\", enabled: false, schedule: \"@every 1h\"}]) {
                 installation { objects { name enabled schedule backfill } } } }",
            json!({"id": installation}),
        )
        .await;
    assert_eq!(
        data["updateInstallation"]["installation"]["objects"],
        json!([{"name": "companies", "enabled": false, "schedule": "@every 1h", "backfill": "none"},
               {"name": "contacts", "enabled": true, "schedule": "@every 5m", "backfill": "full"}])
    );
    let data = app
        .data(&p.write, "mutation($id: UUID!) { unpauseInstallation(id: $id, waitForVisibility: true) { installation { paused } } }", json!({"id": installation}))
        .await;
    assert_eq!(data["unpauseInstallation"]["installation"]["paused"], false);
    let data = app
        .data(
            &p.write,
            "mutation($id: UUID!) { triggerRead(installationId: $id) { operation: id } }",
            json!({"id": installation}),
        )
        .await;
    assert_eq!(data["triggerRead"].as_array().unwrap().len(), 1, "only the enabled object is read: {data}");
    let last = app.data(&p.read, page, json!({"filter": {"groupRef": "customer-3"}})).await;
    let doomed = last["installations"]["edges"][0]["cursor"].as_str().unwrap().to_string();
    app.data(
        &p.write,
        "mutation($id: UUID!) { deleteInstallation(id: $id, waitForVisibility: true) { id } }",
        json!({"id": doomed}),
    )
    .await;
    let remaining = app.data(&p.read, page, json!({"after": after})).await;
    assert_eq!(groups(&remaining), Vec::<String>::new(), "a deleted installation leaves the list");
    let with_deleted = app.data(&p.read, page, json!({"after": after, "filter": {"includeDeleted": true}})).await;
    assert_eq!(groups(&with_deleted), vec!["customer-3"]);

    // Root operations list and billing.
    let data = app.data(&p.read, "{ operations(filter: {status: \"cancelled\"}) { nodes { id } } billing { month activeInstallations operations { key count } } }", json!({})).await;
    assert_eq!(data["operations"]["nodes"], json!([{"id": op}]));
    assert_eq!(data["billing"][0]["activeInstallations"], 1);
    assert_eq!(data["billing"][0]["operations"], json!([{"key": "read.cancelled", "count": 1}]));

    // The access token went to the encrypted store only.
    for table in ["events", "aggregate_snapshots", "installations", "connections", "idempotency_keys", "credentials"] {
        let hits: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM {table} t WHERE t::text LIKE '%' || $1 || '%'"))
                .bind(SECRET_TOKEN)
                .fetch_one(&app.db.pool)
                .await
                .unwrap();
        assert_eq!(hits, 0, "the secret is in {table}");
    }
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys t WHERE t::text LIKE '%' || $1 || '%'")
        .bind(&p.admin[p.admin.len() - 20..])
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(keys, 0, "an API key's secret is stored");
    let actors: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT metadata->>'actor' FROM events WHERE project_id = $1")
            .bind(p.ctx.project_id.0)
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    // Keys are made by the operator (the CLI); the rest by the test and the keys' holders.
    assert!(actors.iter().all(|a| a == "test" || a == "operator" || a.starts_with("api_key:")), "{actors:?}");
    assert!(actors.iter().filter(|a| a.starts_with("api_key:")).all(|a| !p.admin.contains(&a[8..])));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retried_mutations_with_an_idempotency_key_append_once() {
    let app = TestApp::spawn().await;
    let p = app.project("Acme").await;
    let (_, _, installation) = builder_setup(&app, &p, "customer-1").await;
    let trigger = "mutation($id: UUID!) { triggerRead(installationId: $id, objects: [\"contacts\"]) { id replayed } }";
    let vars = json!({"id": installation});
    let (_, first) = app.gql_with(&p.write, trigger, vars.clone(), &[("idempotency-key", "retry-1")]).await;
    let (_, again) = app.gql_with(&p.write, trigger, vars.clone(), &[("idempotency-key", "retry-1")]).await;
    assert_eq!(first["data"]["triggerRead"][0]["replayed"], false, "{first}");
    assert_eq!(again["data"]["triggerRead"][0]["replayed"], true, "{again}");
    assert_eq!(first["data"]["triggerRead"][0]["id"], again["data"]["triggerRead"][0]["id"]);
    let requested: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'operation'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(requested, 1);
    // The same key for another request is refused, and appends nothing.
    let (_, other) = app
        .gql_with(
            &p.write,
            trigger.replace("contacts", "companies").as_str(),
            vars.clone(),
            &[("idempotency-key", "retry-1")],
        )
        .await;
    assert_eq!(other["data"]["triggerRead"][0]["replayed"], false, "a different object is a different key part");
    let changed = trigger.replace("[\"contacts\"]", "[\"contacts\"], since: \"2026-01-01T00:00:00Z\"");
    let (_, reused) = app.gql_with(&p.write, &changed, vars.clone(), &[("idempotency-key", "retry-1")]).await;
    assert_eq!(error_code(&reused), "idempotency_key_reused", "{reused}");
    assert_eq!(reused["errors"][0]["extensions"]["status"], 422);
    let requested: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'operation'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(requested, 2, "contacts once, companies once, nothing for the refused retry");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_typed_client_error_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let p = app.project("Acme").await;
    let (integration, _, installation) = builder_setup(&app, &p, "customer-1").await;
    let events_before: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.db.pool).await.unwrap();

    let cases: Vec<(&str, Value, &str, u16)> = vec![
        ("query($id: UUID!) { installation(id: $id) { id } }", json!({"id": uuid::Uuid::now_v7()}), "not_found", 404),
        ("query { installation(id: \"nope\") { id } }", json!({}), "graphql_validation", 400),
        ("query { installation(id: ", json!({}), "graphql_validation", 400),
        ("mutation($m: String!) { declareIntegrations(manifest: $m) { id } }", json!({"m": "specVersion: 1.0.0\nintegrations:\n  - name: x\n    provider: y\n    bogus: 1\n"}), "manifest.invalid", 400),
        ("mutation($m: String!) { declareIntegrations(manifest: $m) { id } }", json!({"m": MANIFEST.replace("*/10 * * * *", "every tuesday")}), "integration.invalid_schedule", 422),
        ("mutation($id: UUID!) { unpauseInstallation(id: $id) { id } }", json!({"id": installation}), "installation.not_paused", 422),
        ("mutation($id: UUID!) { pauseInstallation(id: $id) { id } }", json!({"id": uuid::Uuid::now_v7()}), "not_found", 404),
        ("mutation($id: UUID!) { cancelOperation(id: $id) { id } }", json!({"id": uuid::Uuid::now_v7()}), "not_found", 404),
        ("mutation($i: CreateConnectionInput!) { createConnection(input: $i) { id } }", json!({"i": {"integrationId": integration, "groupRef": "g", "credentials": "not an object"}}), "invalid_input", 400),
        ("mutation($i: CreateConnectionInput!) { createConnection(input: $i) { id } }", json!({"i": {"integrationId": uuid::Uuid::now_v7(), "groupRef": "g", "credentials": {"t": 1}}}), "not_found", 404),
        ("mutation($id: UUID!) { triggerRead(installationId: $id, objects: [\"tickets\"]) { id } }", json!({"id": installation}), "installation.unknown_object", 422),
        ("mutation($id: UUID!) { triggerRead(installationId: $id, objects: [\"contacts\"], since: \"2026-02-01T00:00:00Z\", until: \"2026-01-01T00:00:00Z\") { id } }", json!({"id": installation}), "operation.invalid_window", 422),
        ("query($id: UUID!) { installationAsOf(id: $id) { events } }", json!({"id": installation}), "invalid_input", 400),
        ("query { operations(first: 1000) { nodes { id } } }", json!({}), "invalid_input", 400),
    ];
    for (query, vars, code, status) in cases {
        let (http, body) = app.gql(&p.admin, query, vars).await;
        assert_eq!(http, 200, "{query}: {body}");
        assert_eq!(error_code(&body), code, "{query}: {body}");
        assert_eq!(body["errors"][0]["extensions"]["status"], status, "{query}: {body}");
        assert!(!body["errors"][0]["message"].as_str().unwrap().is_empty());
    }
    let (_, body) = app
        .gql(
            &p.admin,
            "mutation($m: String!) { declareIntegrations(manifest: $m) { id } }",
            json!({"m": "specVersion: 1.0.0\nintegrations:\n  - name: x\n    provider: y\n    bogus: 1\n"}),
        )
        .await;
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("line"), "the manifest error says where: {body}");

    // Not GraphQL at all.
    let client = amplog_providers::connector::http_client().build().unwrap();
    let response = client
        .post(format!("{}/graphql", app.base))
        .header("x-api-key", &p.read)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "bad_request");
    let response = client.get(format!("{}/nowhere", app.base)).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(error_code(&response.json::<Value>().await.unwrap()), "not_found");

    let events_after: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(events_before, events_after, "a refused request appended something");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_creates_destinations_whose_secret_is_shown_once_and_stored_encrypted() {
    let app = TestApp::spawn().await;
    let p = app.project("hooks").await;
    let other = app.project("other").await;
    let create =
        "mutation($n: String!, $u: String!) { createDestination(name: $n, url: $u) { name url signingSecret } }";
    let vars = json!({"n": "default", "u": "https://hooks.example/amplog"});
    let created = app.data(&p.admin, create, vars.clone()).await;
    let secret = created["createDestination"]["signingSecret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{created}");
    // Listed without its secret, to its own project only; not in the database as text.
    let listed = app.data(&p.read, "{ destinations { name url } }", json!({})).await;
    assert_eq!(listed, json!({"destinations": [{"name": "default", "url": "https://hooks.example/amplog"}]}));
    assert_eq!(app.data(&other.read, "{ destinations { name } }", json!({})).await, json!({"destinations": []}));
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT ciphertext FROM destinations").fetch_one(&app.db.pool).await.unwrap();
    assert!(!String::from_utf8_lossy(&stored).contains(&secret[6..]));
    let kept = amplog_commands::destinations::get(&app.db.pool, app.service.credentials(), p.ctx.project_id, "default")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.secret.0, secret);
    // Only an admin key; bad names and URLs are refused with a code.
    let (_, body) = app.gql(&p.write, create, vars).await;
    assert_eq!(error_code(&body), "forbidden", "{body}");
    let (_, body) = app.gql(&p.admin, create, json!({"n": "no spaces", "u": "https://x.example"})).await;
    assert_eq!(error_code(&body), "invalid_input", "{body}");
    let (_, body) = app.gql(&p.admin, create, json!({"n": "ok", "u": "ftp://x.example"})).await;
    assert_eq!(error_code(&body), "invalid_input", "{body}");
}

/// Notification subscriptions: made by an admin key for an existing destination and known
/// topics (or patterns), listed, deleted; everything else refused with a code and nothing
/// appended.
#[tokio::test(flavor = "multi_thread")]
async fn notification_subscriptions_are_checked_listed_and_deleted() {
    let app = TestApp::spawn().await;
    let p = app.project("notices").await;
    let other = app.project("other").await;
    let destination = "mutation { createDestination(name: \"ops\", url: \"https://hooks.example/ops\") { name } }";
    app.data(&p.admin, destination, json!({})).await;
    let topics = app.data(&p.read, "{ notificationTopics { name description } }", json!({})).await;
    let names: Vec<&str> =
        topics["notificationTopics"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"operation.dead_lettered") && names.contains(&"connection.needs_reauth"), "{names:?}");
    let create = "mutation($d: String!, $t: [String!]!) {
        createNotificationSubscription(destination: $d, topics: $t) { id destination topics createdAt } }";
    let events =
        || async { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events").fetch_one(&app.db.pool).await.unwrap() };
    let before = events().await;
    for (destination, topics, code) in [
        ("ops", json!(["read.exploded"]), "project.invalid_topics"),
        ("ops", json!([]), "project.invalid_topics"),
        ("ops", json!(["read.*", "read.*"]), "project.invalid_topics"),
        ("ops", json!(vec!["read.failed"; 33]), "project.invalid_topics"),
        ("ops", json!(["x".repeat(5000)]), "project.invalid_topics"),
        ("nowhere", json!(["read.failed"]), "project.unknown_destination"),
    ] {
        let (status, body) = app.gql(&p.admin, create, json!({"d": destination, "t": topics})).await;
        assert_eq!((status, error_code(&body)), (200, code), "{body}");
        assert!(body["errors"][0]["message"].as_str().unwrap().len() < 300, "{body}");
    }
    let (_, body) = app.gql(&p.write, create, json!({"d": "ops", "t": ["read.failed"]})).await;
    assert_eq!(error_code(&body), "forbidden");
    // Another project's destination of the same name does not exist for this one.
    let (_, body) = app.gql(&other.admin, create, json!({"d": "ops", "t": ["read.failed"]})).await;
    assert_eq!(error_code(&body), "project.unknown_destination");
    assert_eq!(events().await, before, "refused subscriptions append nothing");

    let made = app.data(&p.admin, create, json!({"d": "ops", "t": ["connection.*", "read.failed"]})).await;
    let made = &made["createNotificationSubscription"];
    assert_eq!(made["topics"], json!(["connection.*", "read.failed"]));
    // A notification to an endpoint that cannot be reached: pending, with why.
    let mut notifier = amplog_providers::notify::Notifier::new(app.service.clone(), Default::default(), "notifier");
    notifier.policy.poll = std::time::Duration::from_millis(100);
    notifier.policy.backoff = std::time::Duration::from_millis(50);
    let notifier = tokio::spawn(async move { notifier.run(std::future::pending()).await });
    let integration = app.service.declare_integration(&p.ctx, "crm", "hubspot").await.unwrap().id_of("integration");
    let secret = amplog_commands::credentials::Secret(amplog_commands::testing::SEED_SECRET.into());
    let integration = amplog_domain::IntegrationId(integration.unwrap());
    app.service.create_connection(&p.ctx, integration, "g1", &secret).await.unwrap();
    let deliveries = "{ notificationDeliveries { webhookId topic status attempts lastError body } }";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let delivery = loop {
        let listed = app.data(&p.read, deliveries, json!({})).await;
        let first = listed["notificationDeliveries"][0].clone();
        if first["attempts"].as_i64().unwrap_or(0) >= 1 {
            break first;
        }
        assert!(std::time::Instant::now() < deadline, "no attempt: {listed}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    notifier.abort();
    assert_eq!(
        (delivery["topic"].as_str(), delivery["status"].as_str()),
        (Some("connection.created"), Some("pending"))
    );
    assert_eq!(delivery["body"]["type"], "connection.created");
    assert!(delivery["webhookId"].as_str().unwrap().starts_with("ntf_"), "{delivery}");
    assert!(delivery["lastError"].as_str().is_some_and(|e| !e.is_empty()), "{delivery}");
    let none = app.data(&other.read, deliveries, json!({})).await;
    assert_eq!(none["notificationDeliveries"], json!([]));
    // Page sizes and cursors out of range are refused, not clamped into a scan.
    for (query, code) in [
        ("{ notificationDeliveries(first: -1) { seq } }", "invalid_input"),
        ("{ notificationDeliveries(first: 100000) { seq } }", "invalid_input"),
        ("{ deadLetters(first: 100000) { nodes { id } } }", "invalid_input"),
        ("{ deadLetters(after: \"not-a-cursor\") { nodes { id } } }", "invalid_cursor"),
    ] {
        let (_, body) = app.gql(&p.read, query, json!({})).await;
        assert_eq!(error_code(&body), code, "{query}: {body}");
    }
    let listed = app.data(&p.read, "{ notificationSubscriptions { id destination } }", json!({})).await;
    assert_eq!(listed["notificationSubscriptions"], json!([{"id": made["id"], "destination": "ops"}]));
    let none = app.data(&other.read, "{ notificationSubscriptions { id } }", json!({})).await;
    assert_eq!(none["notificationSubscriptions"], json!([]));
    let delete = "mutation($id: UUID!) { deleteNotificationSubscription(id: $id) { id } }";
    let (_, body) = app.gql(&other.admin, delete, json!({"id": made["id"]})).await;
    assert_eq!(error_code(&body), "not_found", "{body}");
    app.data(&p.admin, delete, json!({"id": made["id"]})).await;
    let (_, body) = app.gql(&p.admin, delete, json!({"id": made["id"]})).await;
    assert_eq!(error_code(&body), "not_found", "{body}");
    assert_eq!(body["errors"][0]["message"], "notification subscription not found");
}

/// Relay's algorithm with `first` and `last` together (the first N edges, then the last M
/// of them), and 64-bit numbers: positions past 2^31 are accepted, counts are `Int64`.
#[tokio::test(flavor = "multi_thread")]
async fn pages_follow_relay_with_first_and_last_and_numbers_are_64_bit() {
    use amplog_commands::credentials::Secret;
    use amplog_commands::service::NewInstallation;
    let app = TestApp::spawn().await;
    let s = amplog_commands::testing::seed(&app.service).await;
    for i in 2..=5 {
        let group = format!("group-{i}");
        let secret = Secret(amplog_commands::testing::SEED_SECRET.into());
        let connection = app.service.create_connection(&s.ctx, s.integration, &group, &secret).await.unwrap();
        let new = NewInstallation {
            integration_id: s.integration,
            revision: None,
            group_ref: group.clone(),
            consumer_ref: format!("{group}-consumer"),
            connection_id: amplog_domain::ConnectionId(connection.id_of("connection").unwrap()),
            objects: None,
        };
        app.service.create_installation(&s.ctx, &new).await.unwrap();
    }
    app.projected().await;
    let (_, key) = app.keys.create(s.ctx.project_id, amplog_api::Scope::Read, None).await.unwrap();
    let page = |args: &str| {
        let query = format!("{{ installations({args}) {{ edges {{ node {{ groupRef }} }} pageInfo {{ hasPreviousPage hasNextPage }} }} }}");
        let (app, key) = (&app, &key);
        async move {
            let data = app.data(key, &query, json!({})).await;
            let groups: Vec<String> = data["installations"]["edges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["node"]["groupRef"].as_str().unwrap().to_string())
                .collect();
            (groups, data["installations"]["pageInfo"].clone())
        }
    };
    let (all, _) = page("first: 10").await;
    assert_eq!(all.len(), 5);
    let (groups, info) = page("first: 5, last: 2").await;
    assert_eq!(groups, all[3..5].to_vec(), "the last 2 of the first 5");
    assert_eq!(info, json!({"hasPreviousPage": true, "hasNextPage": false}));
    let (groups, _) = page("first: 3, last: 2").await;
    assert_eq!(groups, all[1..3].to_vec());

    let sdl = amplog_api::graphql::sdl();
    assert!(sdl.contains("scalar Int64"), "{sdl}");
    for field in ["position: Int64!", "bytes: Int64!", "recordsRead: Int64!", "sequence: Int64!"] {
        assert!(sdl.contains(field), "{field}");
    }
    let far = "query($id: UUID!) { installationAsOf(id: $id, position: 3000000000) { events } }";
    let data = app.data(&key, far, json!({"id": s.installation.0})).await;
    assert!(data["installationAsOf"]["events"].as_i64().unwrap() > 0, "{data}");
    let (_, body) = app
        .gql(
            &key,
            "{ installationAsOf(id: \"00000000-0000-0000-0000-000000000000\", position: 1.5) { events } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&body), "graphql_validation", "{body}");
    app.stop().await;
}

/// GraphiQL (`serve --dev`) in a real headless Chromium on a machine with no outside
/// network: every asset comes from amplog, the editor shows, and a query runs with the key
/// given in its headers.
#[tokio::test(flavor = "multi_thread")]
async fn graphiql_runs_a_query_in_headless_chromium_from_amplogs_own_assets() {
    use amplog_api::ServerConfig;
    let dev = TestApp::spawn_with(ServerConfig { dev: true, ..ServerConfig::default() }, true).await;
    let p = dev.project("Acme").await;
    let client = amplog_providers::connector::http_client().build().unwrap();
    let page = client.get(format!("{}/graphql", dev.base)).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("/graphql/assets/graphiql.min.js"), "{page}");
    assert!(!page.contains("http://") && !page.contains("https://"), "the page loads nothing from elsewhere");

    let browser = crate::browser::Browser::start().await;
    let mut url = reqwest::Url::parse(&format!("{}/graphql", dev.base)).unwrap();
    url.query_pairs_mut()
        .append_pair("query", "{ viewer { scope } }")
        .append_pair("headers", &json!({"X-Api-Key": p.read}).to_string());
    browser.goto(url.as_str()).await;
    browser.click(".graphiql-execute-button").await;
    browser
        .wait_for(
            "(document.querySelector('.result-window') || {innerText: ''}).innerText.includes('\"scope\": \"read\"')",
        )
        .await;
    browser.quit().await;
    dev.stop().await;
}
