//! The relay process end to end: `amplog relay` SIGKILLed again and again while 100k events
//! across 1,000 aggregates are appended, restarted each time; every `(aggregate, sequence)`
//! arrives on the broker, first arrivals in order per aggregate, duplicates counted.

use amplog_commands::testing::{read_of, seed, test_db};
use amplog_domain::operation::{Cursor, PageRecord};
use amplog_domain::{LeaseId, OperationId};
use amplog_log::LogReader;
use amplog_streams::testing::{config_on, order_report, Collector, OwnBroker};
use amplog_streams::{KafkaConfig, RELAY};
use std::collections::HashSet;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// 1,000 operations × (Requested + Started + 7 × 14 pages) = 100,000 operation events.
const OPERATIONS: usize = 1000;
const ROUNDS: usize = 8;

fn spawn_relay(url: &str, config: &KafkaConfig) -> Child {
    Command::new(env!("CARGO_BIN_EXE_amplog"))
        .arg("relay")
        .env("DATABASE_URL", url)
        .env("AMPLOG_KAFKA_BROKERS", &config.brokers)
        .env("AMPLOG_KAFKA_TOPIC_PREFIX", &config.topic_prefix)
        .env("AMPLOG_KAFKA_PARTITIONS", config.partitions.to_string())
        .env("AMPLOG_LOG", "warn")
        .spawn()
        .expect("start amplog relay")
}

/// A pseudo-random pause between `min` and `min + spread` milliseconds.
fn jitter(min: u64, spread: u64) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    Duration::from_millis(min + nanos % spread)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_processes_killed_with_sigkill_lose_and_reorder_nothing() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    // A broker of its own: this load would slow the shared broker for the other tests. In
    // memory: the collector reads every partition from its start, which that storage serves
    // far faster than sqlite.
    let broker = OwnBroker::in_memory();
    let config = config_on(&broker.address());
    let started = Instant::now();
    // 1,000 operations (their Requested events, and the installation's stream of requests).
    let mut operations = Vec::new();
    for _ in 0..OPERATIONS {
        let outcome = service.request_operation(&s.ctx, s.installation, &read_of("contacts")).await.unwrap();
        operations.push(OperationId(outcome.id_of("operation").unwrap()));
    }
    // Four writers: each operation gets Started and 98 pages in 7 commands: 100 events each.
    let writers: Vec<_> = operations
        .chunks(OPERATIONS / 4)
        .map(|chunk| {
            let (service, ctx, chunk) = (service.clone(), s.ctx.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for round in 0..ROUNDS {
                    for op in &chunk {
                        let lease = LeaseId(uuid::Uuid::from_u128(op.0.as_u128() ^ 1));
                        if round == 0 {
                            service.start_operation(&ctx, *op, lease, chrono::Duration::hours(1)).await.unwrap();
                        } else {
                            let page = PageRecord { records: 10, bytes: 1000, cursor: Cursor::default(), reread: 0 };
                            service.record_pages(&ctx, *op, lease, &vec![page; 14]).await.unwrap();
                        }
                    }
                }
            })
        })
        .collect();

    eprintln!("[{:.0} s] operations requested; writers and relay kills start", started.elapsed().as_secs_f64());
    let mut kills = 0;
    while kills < 5 || writers.iter().any(|w| !w.is_finished()) {
        let mut relay = spawn_relay(&db.url, &config);
        tokio::time::sleep(jitter(700, 1500)).await;
        relay.kill().unwrap(); // SIGKILL
        relay.wait().unwrap();
        kills += 1;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    eprintln!("[{:.0} s] writers done after {kills} kills", started.elapsed().as_secs_f64());
    // A last relay runs until its checkpoint reaches the log's end, then stops on SIGTERM.
    let mut relay = spawn_relay(&db.url, &config);
    let end = LogReader::new(service.pool().clone()).end().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let checkpoint = LogReader::checkpoint(&mut service.pool().acquire().await.unwrap(), RELAY).await.unwrap();
        // This relay leads (so its signal handler is installed) and the log is relayed.
        let holder: Option<String> = sqlx::query_scalar("SELECT holder FROM projector_leases WHERE name = $1")
            .bind(RELAY)
            .fetch_optional(service.pool())
            .await
            .unwrap();
        if checkpoint.position >= end && holder.is_some_and(|h| h.ends_with(&format!(":{}", relay.id()))) {
            break;
        }
        assert!(Instant::now() < deadline, "the relay did not reach the log's end");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Command::new("kill").args(["-TERM", &relay.id().to_string()]).status().unwrap();
    assert!(relay.wait().unwrap().success(), "the relay stops cleanly on SIGTERM");

    eprintln!("[{:.0} s] relayed to the log's end", started.elapsed().as_secs_f64());
    let expected: Vec<(String, i64)> =
        sqlx::query_as("SELECT aggregate_id, sequence FROM events").fetch_all(service.pool()).await.unwrap();
    let operation_events = expected.iter().filter(|(id, _)| operations.iter().any(|o| o.to_string() == *id)).count();
    assert!(
        operation_events >= OPERATIONS * (1 + (ROUNDS - 1) * 14 + 1),
        "{operation_events} events of 1,000 operations"
    );
    let topics: Vec<String> =
        amplog_streams::config::AGGREGATE_TYPES.iter().map(|t| config.aggregate_topic(t)).collect();
    let mut collector = Collector::new(&config, &topics).await;
    let total = expected.len();
    let arrived = collector.until_distinct(total, Duration::from_secs(240)).await;
    eprintln!("[{:.0} s] collected", started.elapsed().as_secs_f64());
    collector.drain(Duration::from_secs(2)).await;
    let report = order_report(&collector.received);
    eprintln!(
        "relay SIGKILLed {kills} times in {:.0} s: {} distinct events of {total} arrived, {} duplicates, {} out of order",
        started.elapsed().as_secs_f64(),
        report.distinct,
        report.duplicates,
        report.out_of_order.len()
    );
    assert!(arrived, "only {} distinct of {total}", report.distinct);
    let seen: HashSet<(String, i64)> =
        collector.received.iter().map(|m| (m.event.subject.clone(), m.event.sequence.unwrap())).collect();
    let missing: Vec<_> = expected.iter().filter(|e| !seen.contains(*e)).take(10).collect();
    assert!(missing.is_empty(), "missing {missing:?}");
    assert_eq!(report.distinct, total);
    assert!(report.out_of_order.is_empty(), "{:?}", &report.out_of_order[..report.out_of_order.len().min(10)]);
    drop(broker);
}

#[tokio::test]
async fn tail_prints_a_topics_messages_and_the_relay_refuses_unsafe_settings() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let config = amplog_streams::testing::kafka_config();
    let relay =
        amplog_streams::Relay::new(service.pool().clone(), amplog_log::EventStore::default(), config.clone(), "t")
            .unwrap();
    relay.catch_up().await.unwrap();
    let topic = config.aggregate_topic("installation");
    let output = Command::new(env!("CARGO_BIN_EXE_amplog"))
        .args(["tail", "--topic", &topic, "--from-beginning", "--max", "1"])
        .env("AMPLOG_KAFKA_BROKERS", &config.brokers)
        .env("AMPLOG_LOG", "warn")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["topic"], topic.as_str());
    assert_eq!(lines[0]["key"], s.installation.to_string());
    assert_eq!(lines[0]["value"]["type"], "amplog.installation.Created.v1.0");
    assert_eq!(lines[0]["value"]["projectid"], s.ctx.project_id.to_string());

    let refused = Command::new(env!("CARGO_BIN_EXE_amplog"))
        .arg("relay")
        .env("DATABASE_URL", &db.url)
        .env("AMPLOG_KAFKA_BROKERS", &config.brokers)
        .env("AMPLOG_KAFKA_PROPERTIES", "compression.type=lz4,acks=1")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("refusing Kafka setting acks=1"), "{stderr}");
}
