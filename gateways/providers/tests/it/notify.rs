//! Lifecycle notifications end to end: a scripted lifecycle (an install with a backfill, a
//! revoked grant, a reconnect, a read failing until dead-lettered, a destination answering
//! 410) yields exactly the expected topics, in log order, at a second sink, each verified by
//! the Standard Webhooks reference library, while another subscription's endpoint never
//! answers; a restart of the notifier and a projection rebuild deliver nothing again; a
//! deleted subscription gets nothing more.

use amplog_commands::credentials::Secret;
use amplog_commands::service::NewOperation;
use amplog_domain::operation::{OperationStatus, OperationType, Trigger};
use amplog_domain::{InstallationId, OperationId};
use amplog_providers::notify::{Notifier, NOTIFIER};
use amplog_simulator::sim::SimConfig;
use amplog_simulator::testing::{SyncWorld, SINK_SECRET};
use amplog_simulator::Sink;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn read(object: &str, trigger: Trigger) -> NewOperation {
    NewOperation { op_type: OperationType::Read, object: object.into(), since: None, until: None, trigger }
}

/// A notifier with quick retries, until the returned sender is dropped or sent to.
fn spawn_notifier(world: &SyncWorld, name: &str) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let mut notifier = Notifier::new(world.service.clone(), world.connectors.clone(), name);
    notifier.policy.backoff = Duration::from_millis(50);
    notifier.policy.max_backoff = Duration::from_millis(200);
    notifier.policy.poll = Duration::from_millis(100);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        notifier
            .run(async {
                let _ = stopped.await;
            })
            .await;
    });
    (stop, task)
}

/// Waits until the notifier has read everything committed so far.
async fn notifier_caught_up(world: &SyncWorld) {
    let reader = amplog_log::LogReader::new(world.db.pool.clone());
    let end = reader.end().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut conn = world.db.pool.acquire().await.unwrap();
        let checkpoint = amplog_log::LogReader::checkpoint(&mut conn, NOTIFIER).await.unwrap();
        if reader.committed_after(checkpoint, end).await.unwrap() == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the notifier did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn finished(world: &SyncWorld, op: OperationId) -> OperationStatus {
    world.finished(op, Duration::from_secs(60)).await.status
}

async fn wait_for(notices: &Sink, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = notices.notifications();
        if got.len() >= n {
            return got.iter().map(|d| serde_json::from_slice(&d.body).unwrap()).collect();
        }
        assert!(Instant::now() < deadline, "{} of {n} notifications arrived: {:?}", got.len(), topics_of(&got));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn topics_of(got: &[amplog_simulator::sink::RawDelivery]) -> Vec<String> {
    got.iter()
        .map(|d| serde_json::from_slice::<Value>(&d.body).unwrap()["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_lifecycle_notifies_exactly_its_topics_once_each() {
    let world = SyncWorld::start(SimConfig { records: 120, ..SimConfig::default() }).await;
    let (service, ctx) = (&world.service, &world.ctx);
    let notices = Sink::new(SINK_SECRET);
    let (notices_addr, notices_task) = notices.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let url = format!("http://{notices_addr}/hooks/notify");
    service.put_destination(ctx, "notify", &url, Some(Secret(SINK_SECRET.into()))).await.unwrap();
    let topics: Vec<String> =
        ["installation.*", "connection.*", "read.*", "write.failed", "operation.dead_lettered", "destination.disabled"]
            .map(String::from)
            .to_vec();
    let (subscription, _) = service.subscribe_notifications(ctx, "notify", &topics).await.unwrap();
    // Another subscription, to an endpoint that never answers: it holds back only itself.
    service.put_destination(ctx, "stuck", "http://127.0.0.1:9/hooks", None).await.unwrap();
    let (stuck, _) = service.subscribe_notifications(ctx, "stuck", &["*".to_string()]).await.unwrap();
    // The receiver is down for the first two attempts: they are retried, in order.
    notices.fail_next(2);
    let (stop, notifier) = spawn_notifier(&world, "notifier-1");
    let dispatch = world.spawn_dispatch("worker-1", Duration::from_secs(10));

    // A new customer, with a backfill read.
    let connector = world.connectors.get("simulator").unwrap();
    let (connection, installation) =
        amplog_simulator::sim::install_customer(service, ctx, world.integration, &connector, "globex").await.unwrap();
    let request = |object: &str, trigger| {
        let new = read(object, trigger);
        async move {
            let outcome = service.request_operation(ctx, installation, &new).await.unwrap();
            OperationId(outcome.id_of("operation").unwrap())
        }
    };
    let backfill = request("contacts", Trigger::Backfill).await;
    assert_eq!(finished(&world, backfill).await, OperationStatus::Succeeded);
    // The customer's grant is revoked at the provider: the refresh is refused.
    world.sim_control("/_sim/revoke/globex", None).await;
    world.sim_control("/_sim/expire-tokens", None).await;
    let refused = request("companies", Trigger::Triggered).await;
    assert_eq!(finished(&world, refused).await, OperationStatus::Failed);
    // The customer connects again.
    let tokens = amplog_simulator::sim::connect_customer(&connector, "globex").await.unwrap();
    service.reconnect(ctx, connection, &Secret(serde_json::to_string(&tokens).unwrap())).await.unwrap();
    // The provider fails every call: the read is dead-lettered after its attempts.
    world.sim_control("/_sim/faults", Some(json!({"server_error": 1.0}))).await;
    let dead = request("deals", Trigger::Triggered).await;
    assert_eq!(finished(&world, dead).await, OperationStatus::Failed);
    world.sim_control("/_sim/faults", Some(json!({}))).await;
    // The page destination answers 410 Gone: it is disabled.
    world.sim_control("/_sim/touch/contacts/5", None).await;
    world.sink.answer_next(&[410]);
    let gone = request("contacts", Trigger::Triggered).await;
    assert_eq!(finished(&world, gone).await, OperationStatus::Failed);

    let expected = [
        "connection.created",
        "installation.created",
        "read.succeeded",
        "read.backfill_done",
        "connection.needs_reauth",
        "read.failed",
        "connection.reconnected",
        "read.failed",
        "operation.dead_lettered",
        "destination.disabled",
        "read.failed",
    ];
    let bodies = wait_for(&notices, expected.len()).await;
    let got: Vec<&str> = bodies.iter().map(|b| b["type"].as_str().unwrap()).collect();
    assert_eq!(got, expected);
    let inst = json!(installation);
    assert_eq!(bodies[1]["data"]["installation_id"], inst);
    assert_eq!(bodies[1]["data"]["group_ref"], "globex");
    assert_eq!(bodies[3]["data"]["operation_id"], json!(backfill));
    assert_eq!(bodies[3]["data"]["records"], 120);
    assert_eq!(bodies[4]["data"]["connection_id"], json!(connection));
    assert_eq!(bodies[5]["data"]["error_class"], "auth_invalidated");
    assert_eq!(bodies[8]["data"]["operation_id"], json!(dead));
    assert_eq!(bodies[9]["data"]["destination"], "default");
    assert_eq!(bodies[10]["data"]["error_class"], "destination_unavailable");
    assert!(bodies.iter().all(|b| b["timestamp"].is_string()));

    // Each verified by the Standard Webhooks reference library, ids all distinct.
    let raw = notices.notifications();
    let ids: std::collections::BTreeSet<&String> = raw.iter().map(|d| &d.headers["webhook-id"]).collect();
    assert_eq!(ids.len(), raw.len());
    let cases: Vec<Value> =
        raw.iter().map(|d| json!({"headers": d.headers, "body": String::from_utf8(d.body.clone()).unwrap()})).collect();
    let python = std::env::var("AMPLOG_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import json, sys\n\
from standardwebhooks.webhooks import Webhook\n\
case = json.load(sys.stdin)\n\
hook = Webhook(case['secret'])\n\
for c in case['cases']:\n    hook.verify(c['body'].encode(), c['headers'])\n\
print(len(case['cases']))\n";
    let mut child = std::process::Command::new(&python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python}: {e}"));
    use std::io::Write;
    let input = json!({"secret": SINK_SECRET, "cases": cases}).to_string();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let verified = child.wait_with_output().unwrap();
    assert!(verified.status.success(), "standardwebhooks refused one: {}", String::from_utf8_lossy(&verified.stderr));
    assert_eq!(String::from_utf8_lossy(&verified.stdout).trim(), expected.len().to_string());

    // A restart (another holder, from the checkpoint) and a projection rebuild deliver
    // nothing again.
    let _ = stop.send(());
    notifier.await.unwrap();
    let (stop, notifier) = spawn_notifier(&world, "notifier-2");
    world.project().await;
    amplog_projections::rebuild(&world.db.pool, service.store(), |_, _| {}).await.unwrap();
    notifier_caught_up(&world).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(notices.notifications().len(), expected.len(), "{:?}", topics_of(&notices.notifications()));
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM notification_deliveries WHERE subscription_id = $1")
        .bind(subscription)
        .fetch_one(&world.db.pool)
        .await
        .unwrap();
    assert_eq!(queued, expected.len() as i64);
    let (pending, tried): (i64, Option<i32>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE delivered_at IS NULL), max(attempts) FROM notification_deliveries
         WHERE subscription_id = $1",
    )
    .bind(stuck)
    .fetch_one(&world.db.pool)
    .await
    .unwrap();
    assert!(pending >= expected.len() as i64 && tried >= Some(2), "{pending} pending, {tried:?} attempts");

    // A deleted subscription gets nothing more.
    service.delete_notification_subscription(ctx, subscription).await.unwrap();
    service.pause_installation(ctx, InstallationId(installation.0)).await.unwrap();
    notifier_caught_up(&world).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(notices.notifications().len(), expected.len());
    let _ = stop.send(());
    notifier.await.unwrap();
    dispatch.abort();
    notices_task.abort();
}
