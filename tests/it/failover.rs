//! PostgreSQL failover: a primary with a synchronous streaming standby, two throwaway
//! clusters. `amplog serve` (its projector in process) and `amplog relay`, configured with
//! both hosts, go on while the primary is SIGKILLed and the standby promoted: they move to
//! the new primary by themselves, every acknowledged mutation is in the new primary's log
//! once, the projector resumes from its checkpoint with nothing skipped or doubled, and the
//! relay with nothing skipped and per-aggregate order kept.

use crate::pg::Cluster;
use crate::process::{free_port, Process};
use amplog_commands::database::{Database, Hosts};
use base64::Engine;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

const REQUESTS: usize = 120;
const KILL_AT: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_moves_to_a_promoted_standby_and_loses_no_acknowledged_command() {
    let primary = Cluster::primary();
    let admin = sqlx::PgPool::connect(&primary.url("postgres")).await.unwrap();
    sqlx::query("CREATE DATABASE amplog").execute(&admin).await.unwrap();
    admin.close().await;
    let standby = Cluster::standby_of(&primary);
    // From here on a commit returns once the standby has it.
    let admin = sqlx::PgPool::connect(&primary.url("postgres")).await.unwrap();
    for statement in ["ALTER SYSTEM SET synchronous_standby_names = 'standby'", "SELECT pg_reload_conf()"] {
        sqlx::query(statement).execute(&admin).await.unwrap();
    }
    admin.close().await;
    let both = format!("postgres://postgres@127.0.0.1:{},127.0.0.1:{}/amplog", primary.port, standby.port);

    // The tenant, its installation and a key, written through the primary.
    let database = Database::connect(Hosts::parse(&both).unwrap(), 4).await.unwrap();
    let key = amplog_commands::credentials::CredentialKey::from_bytes(&amplog_commands::testing::TEST_KEY).unwrap();
    let service = amplog_commands::CommandService::new(
        database.pool.clone(),
        amplog_log::EventStore::default(),
        amplog_commands::credentials::CredentialStore::new(key),
    );
    let s = amplog_commands::testing::seed(&service).await;
    let (_, api_key) =
        amplog_api::Keys::new(&service).create(s.ctx.project_id, amplog_api::Scope::Write, None).await.unwrap();
    let synced = "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'standby' AND sync_state = 'sync'";
    assert_eq!(
        sqlx::query_scalar::<_, i64>(synced).fetch_one(&database.pool).await.unwrap(),
        1,
        "a synchronous standby"
    );
    drop(service);
    database.pool.close().await;
    drop(database);

    let logs = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let key = base64::engine::general_purpose::STANDARD.encode(amplog_commands::testing::TEST_KEY);
    let env =
        [("DATABASE_URL", both.clone()), ("AMPLOG_CREDENTIALS_KEY", key), ("AMPLOG_LOG", "info,sqlx=error".into())];
    let serve = Process::amplog(
        &["serve", "--listen", &listen, "--projectors", "on", "--workers", "off"],
        &env,
        &logs.path().join("serve.log"),
    );
    let kafka = amplog_streams::testing::kafka_config();
    let mut relay_env = env.to_vec();
    relay_env.extend([
        ("AMPLOG_KAFKA_BROKERS", kafka.brokers.clone()),
        ("AMPLOG_KAFKA_TOPIC_PREFIX", kafka.topic_prefix.clone()),
        ("AMPLOG_KAFKA_PARTITIONS", kafka.partitions.to_string()),
    ]);
    let relay = Process::amplog(&["relay"], &relay_env, &logs.path().join("relay.log"));
    let http = amplog_providers::connector::http_client().timeout(Duration::from_secs(10)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http.get(format!("http://{listen}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "serve did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Keyed mutations, each retried with its key until acknowledged; the primary dies
    // after the 40th.
    let mutation = "mutation($id: UUID!) { triggerRead(installationId: $id, objects: [\"contacts\"]) { id } }";
    let mut acknowledged = Vec::new();
    let (mut killed_at, mut failed_over, mut refused) = (None, None, 0);
    for i in 0..REQUESTS {
        if i == KILL_AT {
            primary.kill();
            killed_at = Some(Instant::now());
            standby.promote();
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        let id = loop {
            let answer = http
                .post(format!("http://{listen}/graphql"))
                .header("x-api-key", &api_key)
                .header("idempotency-key", format!("failover-{i}"))
                .json(&json!({"query": mutation, "variables": {"id": s.installation}}))
                .send()
                .await;
            let body: Option<Value> = match answer {
                Ok(response) => response.json().await.ok(),
                Err(_) => None,
            };
            if let Some(id) = body.as_ref().and_then(|b| b["data"]["triggerRead"][0]["id"].as_str()) {
                break id.to_string();
            }
            refused += 1;
            assert!(Instant::now() < deadline, "request {i} never acknowledged: {body:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if killed_at.is_some() && failed_over.is_none() {
            failed_over = killed_at.map(|t| t.elapsed());
        }
        acknowledged.push(id);
    }
    let failed_over = failed_over.unwrap();
    println!("the primary killed: serve answered again from the promoted standby after {failed_over:?} ({refused} attempts refused meanwhile)");

    // On the new primary: every acknowledged mutation, once; the read models caught up.
    let new_primary = sqlx::PgPool::connect(&standby.url("amplog")).await.unwrap();
    let recovering: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()").fetch_one(&new_primary).await.unwrap();
    assert!(!recovering);
    let mut logged: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM events WHERE aggregate_type = 'operation' AND event_type = 'Requested' AND project_id = $1",
    )
    .bind(s.ctx.project_id.0)
    .fetch_all(&new_primary)
    .await
    .unwrap();
    logged.sort();
    let mut expected = acknowledged.clone();
    expected.sort();
    expected.dedup();
    assert_eq!(expected.len(), REQUESTS, "each request its own operation");
    assert_eq!(logged, expected, "every acknowledged mutation is in the new primary's log, once");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = amplog_projections::status(&new_primary, amplog_projections::READ_MODELS).await.unwrap();
        if st.lag_events == 0 && st.leader.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the projector did not catch up on the new primary: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let projected: i64 = sqlx::query_scalar("SELECT count(*) FROM operations WHERE project_id = $1")
        .bind(s.ctx.project_id.0)
        .fetch_one(&new_primary)
        .await
        .unwrap();
    let in_log: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT aggregate_id) FROM events WHERE aggregate_type = 'operation' AND project_id = $1",
    )
    .bind(s.ctx.project_id.0)
    .fetch_one(&new_primary)
    .await
    .unwrap();
    assert_eq!(projected, in_log, "the projector resumed from its checkpoint: nothing skipped, nothing twice");
    // The relay resumed from its checkpoint too: every operation event on Kafka, in order
    // per operation.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = amplog_projections::status(&new_primary, amplog_streams::RELAY).await.unwrap();
        if st.lag_events == 0 && st.leader.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the relay did not catch up on the new primary: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM events WHERE aggregate_type = 'operation'")
        .fetch_all(&new_primary)
        .await
        .unwrap();
    let mut topic = amplog_streams::testing::Collector::new(&kafka, &[kafka.aggregate_topic("operation")]).await;
    assert!(topic.until_distinct(events.len(), Duration::from_secs(60)).await, "every operation event on Kafka");
    topic.drain(Duration::from_secs(1)).await;
    let received: std::collections::HashSet<String> = topic.received.iter().map(|r| r.event.id.clone()).collect();
    assert!(events.iter().all(|id| received.contains(&id.to_string())), "no event skipped");
    let order = amplog_streams::testing::order_report(&topic.received);
    assert!(order.out_of_order.is_empty(), "{order:?}");
    println!(
        "relay: {} events, {} sent again after the failover (at-least-once: the batch whose checkpoint the dead primary lost)",
        order.distinct, order.duplicates
    );
    drop((serve, relay));
    for process in ["serve", "relay"] {
        let log = std::fs::read_to_string(logs.path().join(format!("{process}.log"))).unwrap();
        assert!(log.contains("the database primary moved"), "{process}: {log}");
    }
    let verify = Command::new(env!("CARGO_BIN_EXE_amplog"))
        .args(["verify"])
        .env("DATABASE_URL", standby.url("amplog"))
        .env("AMPLOG_LOG", "warn")
        .output()
        .unwrap();
    assert!(verify.status.success(), "verify on the new primary: {}", String::from_utf8_lossy(&verify.stdout));
}
