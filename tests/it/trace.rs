//! Traces, as an operator's collector receives them: `amplog serve`, `amplog relay` and
//! `amplog worker` (a Kafka consumer group) export over OTLP/HTTP to a collector in the
//! test, which decodes the protobuf with the `opentelemetry-proto` types. One `triggerRead`
//! is one trace, from the HTTP request through the append, the relay's dispatch and Kafka,
//! to the worker's provider pages and webhook deliveries.

use crate::process::{free_port, Process};
use amplog_simulator::collector::{Collector, ReceivedSpan};
use amplog_simulator::sim::SimConfig;
use amplog_simulator::testing::{SyncWorld, SINK_SECRET};
use base64::Engine;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

const RECORDS: usize = 450; // 5 pages

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_triggered_read_is_one_trace_across_the_api_the_relay_and_a_worker() {
    let kafka = amplog_streams::testing::kafka_config();
    let world = SyncWorld::start(SimConfig { records: RECORDS, ..SimConfig::default() }).await;
    let (otlp, collector) = Collector::start().await.unwrap();
    let keys = amplog_api::Keys::new(&world.service);
    let (_, api_key) = keys.create(world.ctx.project_id, amplog_api::Scope::Write, None).await.unwrap();
    let credential_key = base64::engine::general_purpose::STANDARD.encode(amplog_commands::testing::TEST_KEY);
    let logs = tempfile::tempdir().unwrap();
    let port = free_port();
    let spawn = |service: &str, args: &[&str]| {
        let mut env = crate::process::world_env(&world, &kafka);
        env.extend([
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}")),
            ("OTEL_SERVICE_NAME", service.to_string()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200".into()),
            ("AMPLOG_LOG_FORMAT", "json".into()),
            ("AMPLOG_LOG", "info,sqlx=warn".into()),
        ]);
        Process::amplog(args, &env, &logs.path().join(format!("{service}.log")))
    };
    let listen = format!("127.0.0.1:{port}");
    let api = spawn("amplog-api", &["serve", "--listen", &listen, "--projectors", "on", "--workers", "off"]);
    let relay = spawn("amplog-relay", &["relay"]);
    let worker = spawn("amplog-worker", &["worker", "--no-scheduler", "--concurrency", "1"]);
    let http = amplog_providers::connector::http_client().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http.get(format!("http://{listen}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "amplog serve did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A caller's `traceparent` continues its trace; any other (too long, malformed, zero ids,
    // an unknown version) is ignored: the request starts a trace of its own, answered as usual.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let callers = [
        ("caller", format!("00-{caller_trace}-00f067aa0ba902b7-01")),
        ("too_long", format!("00-{caller_trace}-00f067aa0ba902b7-01{}", "-x".repeat(5000))),
        ("malformed", "00-zz-yy-01".to_string()),
        ("zero_ids", format!("00-{}-{}-01", "0".repeat(32), "0".repeat(16))),
        ("bad_version", format!("ff-{caller_trace}-00f067aa0ba902b7-01")),
    ];
    for (name, traceparent) in &callers {
        let response = http
            .post(format!("http://{listen}/graphql"))
            .header("x-api-key", &api_key)
            .header("traceparent", traceparent)
            .json(&json!({"query": format!("query {name} {{ installations(first: 1) {{ nodes {{ id }} }} }}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{name}");
        let body: Value = response.json().await.unwrap();
        assert!(body["errors"].is_null(), "{name}: {body}");
    }

    let body: Value = http
        .post(format!("http://{listen}/graphql"))
        .header("x-api-key", &api_key)
        .json(&json!({
            "query": "mutation($id: UUID!) { triggerRead(installationId: $id, objects: [\"contacts\"]) { id } }",
            "variables": {"id": world.installation},
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let op: uuid::Uuid = serde_json::from_value(body["data"]["triggerRead"][0]["id"].clone()).expect("{body}");
    let state = world.finished(amplog_domain::OperationId(op), Duration::from_secs(120)).await;
    assert_eq!(state.status, amplog_domain::operation::OperationStatus::Succeeded);
    assert_eq!(world.sink.report().distinct_records, RECORDS);
    for process in [worker, relay, api] {
        process.terminate();
    }

    // The trace: the one whose `append` recorded the operation's request.
    let spans = collector.spans();
    let requests: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.name == "query installations")
        .map(|q| spans.iter().find(|s| s.span_id == q.parent_span_id).expect("the query's request span"))
        .collect();
    assert_eq!(requests.len(), callers.len());
    let continued: Vec<_> = requests.iter().filter(|r| r.trace_id == caller_trace).collect();
    assert_eq!(continued.len(), 1, "only the well-formed traceparent is followed");
    assert_eq!(continued[0].parent_span_id, "00f067aa0ba902b7");
    let roots: HashSet<&str> =
        requests.iter().filter(|r| r.parent_span_id.is_empty()).map(|r| r.trace_id.as_str()).collect();
    assert_eq!(roots.len(), callers.len() - 1, "each ignored traceparent: a trace of its own");
    let op = op.to_string();
    let request = spans
        .iter()
        .find(|s| s.name == "append" && s.attribute("operation.id") == Some(op.as_str()) && s.service == "amplog-api")
        .unwrap_or_else(|| panic!("no append span of operation {op} among {} spans", spans.len()));
    let trace: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.trace_id == request.trace_id).collect();
    let by_id: HashMap<&str, &ReceivedSpan> = trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let chain = |span: &ReceivedSpan| {
        let mut names = vec![span.name.clone()];
        let mut at = span;
        while let Some(parent) = by_id.get(at.parent_span_id.as_str()) {
            names.push(parent.name.clone());
            at = parent;
        }
        assert!(at.parent_span_id.is_empty(), "{} has a parent the collector never received", at.name);
        names
    };
    let one = |name: &str| {
        let found: Vec<&&ReceivedSpan> = trace.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name} span in the trace");
        *found[0]
    };
    let (http_span, graphql, dispatch, job) =
        (one("POST /graphql"), one("mutation triggerRead"), one("dispatch"), one("job"));
    assert_eq!(http_span.service, "amplog-api");
    assert!(http_span.parent_span_id.is_empty(), "the request starts the trace");
    assert_eq!(http_span.attribute("http.response.status_code"), Some("200"));
    assert_eq!(graphql.attribute("graphql.operation.type"), Some("mutation"));
    assert_eq!(chain(request), ["append", "mutation triggerRead", "POST /graphql"]);
    assert_eq!(dispatch.service, "amplog-relay", "the relay turned the event into a job");
    assert_eq!(chain(dispatch), ["dispatch", "append", "mutation triggerRead", "POST /graphql"]);
    assert_eq!(job.service, "amplog-worker", "through Kafka, into the worker");
    assert_eq!(chain(job)[1..], chain(dispatch)[..]);
    let installation = world.installation.0.to_string();
    for span in [dispatch, job] {
        assert_eq!(span.attribute("operation.id"), Some(op.as_str()), "{}", span.name);
        assert_eq!(span.attribute("installation.id"), Some(installation.as_str()), "{}", span.name);
    }
    let below_job = |name: &str| {
        let found: Vec<&&ReceivedSpan> = trace.iter().filter(|s| s.name == name).collect();
        for span in &found {
            assert!(chain(span).contains(&"job".to_string()), "{name} under the job: {:?}", chain(span));
        }
        found.len()
    };
    let pages = below_job("provider.page");
    let deliveries = below_job("webhook.deliver");
    assert_eq!((pages, deliveries), (5, 5), "every page read and delivered, each in the trace");
    let recorded = trace.iter().filter(|s| s.name == "append" && chain(s).contains(&"job".to_string())).count();
    assert!(recorded >= 6, "the worker's records of its start, its pages and its end: {recorded}");
    let last_delivery = trace.iter().filter(|s| s.name == "webhook.deliver").map(|s| s.end_ns).max().unwrap();
    assert!(last_delivery <= job.end_ns && http_span.start_ns <= job.start_ns, "parents span their children");
    println!(
        "one trace of {} spans over {:?}: {:?}",
        trace.len(),
        Duration::from_nanos(job.end_ns - http_span.start_ns),
        trace.iter().map(|s| format!("{}/{}", s.service, s.name)).collect::<Vec<_>>()
    );

    // No secret in any span: the API key, the credential key, the sink's signing secret,
    // the provider's tokens and client secret.
    let mut tokens = Vec::new();
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM credentials WHERE project_id = $1")
        .bind(world.ctx.project_id.0)
        .fetch_all(&world.db.pool)
        .await
        .unwrap();
    let mut conn = world.db.pool.acquire().await.unwrap();
    for id in ids {
        let id = amplog_domain::CredentialId(id);
        let secret = world.service.credentials().get(&mut conn, world.ctx.project_id, id).await.unwrap().unwrap();
        let set: Value = serde_json::from_str(&secret.0).unwrap_or(Value::String(secret.0.clone()));
        let strings = set.as_object().map(|o| o.values().filter_map(Value::as_str).map(str::to_string).collect());
        tokens.extend(strings.unwrap_or_else(|| vec![secret.0.clone()]).into_iter().filter(|t| t.len() >= 16));
    }
    assert!(!tokens.is_empty(), "the connection's tokens are known to the test");
    let secrets: Vec<&str> = [api_key.as_str(), credential_key.as_str(), SINK_SECRET, "amplog-demo-secret"]
        .into_iter()
        .chain(tokens.iter().map(String::as_str))
        .collect();
    for span in &spans {
        for (key, value) in &span.attributes {
            for secret in &secrets {
                assert!(!value.contains(secret), "{}.{key} holds a secret", span.name);
            }
        }
    }

    // The worker's log lines, JSON with the ids of the span they were written in.
    let log = std::fs::read_to_string(logs.path().join("amplog-worker.log")).unwrap();
    let lines: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert!(!lines.is_empty() && !log.contains('\u{1b}'));
    let in_trace = lines.iter().filter(|l| l["trace_id"] == request.trace_id.as_str()).count();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()));
    assert!(in_trace >= 1, "the job's log line carries its trace's id: {log}");
    let job_done = lines.iter().find(|l| l["message"] == "job done").expect("a line for the job");
    assert_eq!(job_done["span_id"], job.span_id.as_str());
}
