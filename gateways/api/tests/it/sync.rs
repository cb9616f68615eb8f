//! Sync seen through the API: a write requested by a mutation, and the metrics a sync run
//! leaves for a scrape.

use amplog_domain::operation::OperationStatus;
use amplog_simulator::sim::SimConfig;
use amplog_simulator::testing::SyncWorld;
use serde_json::{json, Value};
use std::time::Duration;

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
    let gql = |query: &'static str, variables: Value| {
        let (url, key) = (format!("http://{}/graphql", server.addr), key.clone());
        async move {
            let response = amplog_providers::connector::http_client()
                .build()
                .unwrap()
                .post(url)
                .header("x-api-key", key)
                .json(&json!({"query": query, "variables": variables}))
                .send()
                .await
                .unwrap();
            response.json::<Value>().await.unwrap()
        }
    };
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
/// for it, and with a metrics token nothing is served without it.
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
}
