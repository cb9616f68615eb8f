//! Sync seen through the API: a write requested by a mutation, and the metrics a sync run
//! leaves for a scrape.

use amplog_domain::operation::OperationStatus;
use amplog_simulator::sim::SimConfig;
use amplog_simulator::testing::SyncWorld;
use serde_json::{json, Value};
use std::time::Duration;

/// POSTs a GraphQL request with `key` to the server at `addr`; returns the JSON body.
async fn gql_at(addr: std::net::SocketAddr, key: &str, query: &str, variables: Value) -> Value {
    let response = amplog_providers::connector::http_client()
        .build()
        .unwrap()
        .post(format!("http://{addr}/graphql"))
        .header("x-api-key", key)
        .json(&json!({"query": query, "variables": variables}))
        .send()
        .await
        .unwrap();
    response.json::<Value>().await.unwrap()
}

fn config(records: usize) -> SimConfig {
    SimConfig { records, ..SimConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_from_a_mutation_reports_a_result_per_record() {
    use amplog_api::{Keys, Scope, Server, ServerConfig};
    let world = SyncWorld::start(config(10)).await;
    let keys = Keys::new(&world.service);
    let config = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() };
    let server = Server::start(config, world.service.clone(), keys.clone()).await.unwrap();
    let (_, key) = keys.create(world.ctx.project_id, Scope::Write, None).await.unwrap();
    let gql = |query: &'static str, variables: Value| gql_at(server.addr, &key, query, variables);
    let write = "mutation($id: UUID!, $records: [JSON!]!) {
        writeRecords(installationId: $id, object: \"contacts\", records: $records) { id } }";
    let records = json!([
        {"email": "new@example.com", "firstname": "New"},
        {"id": "3", "email": "three@example.com"},
        {"firstname": "no email"},
    ]);
    let body = gql(write, json!({"id": world.installation, "records": records})).await;
    let op: uuid::Uuid = serde_json::from_value(body["data"]["writeRecords"]["id"].clone()).expect("an operation id");
    let dispatch = world.spawn_dispatch("worker-1", Duration::from_secs(60));
    let state = world.finished(amplog_domain::OperationId(op), Duration::from_secs(60)).await;
    dispatch.abort();
    assert_eq!((state.status, state.records), (OperationStatus::Succeeded, 2));
    assert_eq!(world.sim_stats().await.records_written, 2);
    world.project().await;
    let read = "query($op: UUID!) { operation(id: $op) { opType status records writeResults { index ok id error } } }";
    let body = gql(read, json!({"op": op})).await;
    let operation = &body["data"]["operation"];
    assert_eq!(
        (operation["opType"].as_str(), operation["status"].as_str()),
        (Some("write"), Some("succeeded")),
        "{body}"
    );
    let results = operation["writeResults"].as_array().expect("results");
    let ok: Vec<bool> = results.iter().map(|r| r["ok"].as_bool().unwrap()).collect();
    assert_eq!(ok, [true, true, false]);
    assert_eq!(results[1]["id"], "3");
    assert!(results[2]["error"].as_str().unwrap().contains("required property"), "{body}");
    // Bad input: a clear 4xx-class error with a code, and nothing appended.
    let body = gql(write, json!({"id": world.installation, "records": []})).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "invalid_input", "{body}");
    let body = gql(write, json!({"id": world.installation, "records": [1, 2]})).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "invalid_input", "{body}");
    server.stop().await.unwrap();
}

/// `/metrics` after a sync run: the Prometheus text format passes promtool (every counter
/// has its HELP and TYPE under its series' name), OpenMetrics goes to a client that asks
/// for it, with a metrics token nothing is served without it, and every series the
/// dashboard and the alert rules in `deploy/` query is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_a_sync_run_passes_promtool_and_needs_the_token() {
    use amplog_api::{Keys, Server, ServerConfig};
    let world = SyncWorld::start(config(120)).await;
    world.read_once("contacts").await;
    world.project().await;
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_token: Some("scrape-token".into()),
        metrics_per_project: true,
        ..ServerConfig::default()
    };
    let server = Server::start(config, world.service.clone(), Keys::new(&world.service)).await.unwrap();
    let client = amplog_providers::connector::http_client().build().unwrap();
    let url = format!("http://{}/metrics", server.addr);
    for token in [None, Some("wrong")] {
        let mut request = client.get(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        assert_eq!(request.send().await.unwrap().status(), 401, "{token:?}");
    }
    let scrape = client.get(&url).bearer_auth("scrape-token").send().await.unwrap();
    assert_eq!(scrape.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    let text = scrape.text().await.unwrap();
    assert!(text.contains(&format!("amplog_records_read_total{{project=\"{}\"}} 120", world.ctx.project_id)), "{text}");
    let promtool = std::env::var("AMPLOG_TEST_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut check = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{promtool} (Debian's prometheus package; scripts/test installs it): {e}"));
    use std::io::Write;
    check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let openmetrics = client
        .get(&url)
        .bearer_auth("scrape-token")
        .header("accept", "application/openmetrics-text; version=1.0.0, text/plain;q=0.5")
        .send()
        .await
        .unwrap();
    assert_eq!(openmetrics.headers()["content-type"], "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert!(openmetrics.text().await.unwrap().ends_with("# EOF\n"));
    server.stop().await.unwrap();

    // Every series the dashboard and the alert rules query (deploy/prometheus/metrics.txt,
    // which deploy/check keeps equal to what they query) is in a real scrape of a process
    // that serves the API and ran the sync.
    amplog_log::telemetry::metrics().watch_pool(&world.db.pool);
    let config = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() };
    let server = Server::start(config, world.service.clone(), Keys::new(&world.service)).await.unwrap();
    let text = client.get(format!("http://{}/metrics", server.addr)).send().await.unwrap().text().await.unwrap();
    let listed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/prometheus/metrics.txt"))
        .expect("deploy/prometheus/metrics.txt");
    let names: Vec<&str> = listed.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert!(names.len() >= 20, "{names:?}");
    let missing: Vec<&&str> = names
        .iter()
        .filter(|name| !text.lines().any(|l| l.strip_prefix(**name).is_some_and(|r| r.starts_with(['{', ' ']))))
        .collect();
    assert!(missing.is_empty(), "queried by the dashboard or the alerts, missing from a scrape: {missing:?}\n{text}");
    server.stop().await.unwrap();
}

/// A read that keeps failing is dead-lettered after its attempts; `deadLetters` lists it,
/// a read key may not replay it, and `replayDeadLetter` runs it again from its last recorded
/// page: the records already read are not read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_read_replayed_resumes_from_its_cursor() {
    use amplog_api::{Keys, Scope, Server, ServerConfig};
    let world = SyncWorld::start(config(500)).await;
    let keys = Keys::new(&world.service);
    let config = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() };
    let server = Server::start(config, world.service.clone(), keys.clone()).await.unwrap();
    let (_, write) = keys.create(world.ctx.project_id, Scope::Write, None).await.unwrap();
    let (_, read) = keys.create(world.ctx.project_id, Scope::Read, None).await.unwrap();
    let gql = |key: &str, query: &'static str, variables: Value| {
        let key = key.to_string();
        async move { gql_at(server.addr, &key, query, variables).await }
    };
    // Slow pages, so the read is caught halfway.
    world.sim_control("/_sim/faults", Some(json!({"slow": 1.0, "slow_ms": 150}))).await;
    let op = world.request_read("contacts").await;
    let dispatch = world.spawn_dispatch("worker-1", Duration::from_secs(10));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let state = world.service.load::<amplog_domain::operation::Operation>(&world.ctx, op.0).await.unwrap().state;
        if state.pages >= 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the read never got to its second page");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    world.sim_control("/_sim/faults", Some(json!({"server_error": 1.0}))).await;
    let failed = world.finished(op, Duration::from_secs(60)).await;
    assert_eq!((failed.status, failed.retryable), (OperationStatus::Failed, true), "{failed:?}");
    let (pages_before, records_before) = (failed.pages, failed.records);
    assert!((2..5).contains(&pages_before), "{failed:?}");
    world.project().await;
    let letters = "{ deadLetters(first: 10) { nodes { id deadLettered status errorClass pages } } }";
    let body = gql(&read, letters, json!({})).await;
    let nodes = body["data"]["deadLetters"]["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(nodes.len(), 1, "{body}");
    assert_eq!(nodes[0]["id"], json!(op.0));
    assert_eq!(
        (nodes[0]["deadLettered"].as_bool(), nodes[0]["errorClass"].as_str()),
        (Some(true), Some("provider5xx"))
    );

    let replay = "mutation($id: UUID!) { replayDeadLetter(id: $id) { id events { eventType } } }";
    let body = gql(&read, replay, json!({"id": op})).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "forbidden", "{body}");
    let body = gql(&write, replay, json!({"id": uuid::Uuid::now_v7()})).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "not_found", "{body}");
    world.sim_control("/_sim/faults", Some(json!({}))).await;
    let served_before = world.sim_stats().await.records_served;
    let body = gql(&write, replay, json!({"id": op})).await;
    assert_eq!(body["data"]["replayDeadLetter"]["events"][0]["eventType"], "DeadLetterReplayed", "{body}");
    let done = world.finished(op, Duration::from_secs(60)).await;
    dispatch.abort();
    assert_eq!(done.status, OperationStatus::Succeeded, "{done:?}");
    assert_eq!(done.records, 500, "every record once: {done:?}");
    let served = world.sim_stats().await.records_served - served_before;
    assert_eq!(served, 500 - records_before, "the replay went on from its cursor");
    // The replay is an event with its actor; a replayed letter is not one any more, and a
    // second replay is refused with a code.
    let actor: String = sqlx::query_scalar(
        "SELECT metadata->>'actor' FROM events WHERE aggregate_id = $1 AND event_type = 'DeadLetterReplayed'",
    )
    .bind(op.to_string())
    .fetch_one(&world.db.pool)
    .await
    .unwrap();
    assert!(actor.starts_with("api_key:"), "{actor}");
    world.project().await;
    let body = gql(&read, letters, json!({})).await;
    assert_eq!(body["data"]["deadLetters"]["nodes"], json!([]), "{body}");
    let body = gql(&write, replay, json!({"id": op})).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "operation.not_failed", "{body}");
    let retry = "mutation($id: UUID!) { retryOperation(id: $id) { id } }";
    let body = gql(&write, retry, json!({"id": op})).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "operation.not_failed", "{body}");
    server.stop().await.unwrap();
}
