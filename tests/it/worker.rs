//! `amplog worker` processes SIGKILLed, or stopped with SIGTERM, in the middle of a read, in
//! both transports: the in-process dispatch from the log (the embedded default's) and a Kafka
//! consumer group fed by the relay. The next worker process takes the operation over — when
//! the dead one's lease expires, or at once when a stopping one released it — and goes on
//! from the last recorded page: nothing is skipped, no page is recorded twice, the provider
//! is not read from the start again.

use amplog_domain::operation::{Operation, OperationStatus};
use amplog_simulator::sim::{Faults, SimConfig};
use amplog_simulator::testing::SyncWorld;
use amplog_streams::Relay;
use base64::Engine;
use std::process::{Child, Command};
use std::time::Duration;

const RECORDS: usize = 3_000;

/// A worker process, SIGKILLed when dropped (also when an assertion fails first).
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How the first worker goes.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    Kill,
    Term,
}

impl Stop {
    /// A killed worker's lease must run out: a short one. A stopping worker releases its
    /// lease: a long one, which the next worker must not wait for.
    fn lease_secs(self) -> &'static str {
        match self {
            Stop::Kill => "2",
            Stop::Term => "600",
        }
    }
}

fn spawn_worker(world: &SyncWorld, kafka: Option<&amplog_streams::KafkaConfig>, stop: Stop) -> Worker {
    let key = base64::engine::general_purpose::STANDARD.encode(amplog_commands::testing::TEST_KEY);
    let mut command = Command::new(env!("CARGO_BIN_EXE_amplog"));
    command
        .args(["worker", "--concurrency", "1", "--no-scheduler", "--lease-secs", stop.lease_secs()])
        .env("DATABASE_URL", &world.db.url)
        .env("AMPLOG_CREDENTIALS_KEY", key)
        .env("AMPLOG_PROVIDER_SIMULATOR_URL", world.sim.url())
        // The simulator and the sink are on loopback.
        .env("AMPLOG_ALLOW_PRIVATE_NETWORKS", "true")
        .env("AMPLOG_LOG", std::env::var("AMPLOG_TEST_WORKER_LOG").unwrap_or_else(|_| "warn".into()));
    if let Some(config) = kafka {
        command
            .env("AMPLOG_KAFKA_BROKERS", &config.brokers)
            .env("AMPLOG_KAFKA_TOPIC_PREFIX", &config.topic_prefix)
            .env("AMPLOG_KAFKA_PARTITIONS", config.partitions.to_string())
            // A dead member's partitions move after the session timeout (45 s by default).
            .env("AMPLOG_KAFKA_PROPERTIES", "session.timeout.ms=6000,heartbeat.interval.ms=1000");
    }
    Worker(command.spawn().expect("start amplog worker"))
}

/// Sends SIGTERM and waits (bounded) for a clean exit.
fn terminate(mut worker: Worker) {
    Command::new("kill").args(["-TERM", &worker.0.id().to_string()]).status().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = worker.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the worker did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "a stopping worker exits cleanly: {status}");
}

async fn stopped_mid_read_and_resumed(kafka: Option<amplog_streams::KafkaConfig>, stop: Stop) {
    let faults = Faults { slow: 1.0, slow_ms: 40, ..Faults::default() };
    let world = SyncWorld::start(SimConfig { records: RECORDS, faults, ..SimConfig::default() }).await;
    let relay = kafka.as_ref().map(|config| {
        let relay = Relay::new(world.db.pool.clone(), Default::default(), config.clone(), "test-relay").unwrap();
        tokio::spawn(async move { relay.run(std::future::pending()).await })
    });
    let op = world.request_read("contacts").await;
    let first = spawn_worker(&world, kafka.as_ref(), stop);
    let load = || async { world.service.load::<Operation>(&world.ctx, op.0).await.unwrap().state };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while load().await.pages < 8 {
        assert!(std::time::Instant::now() < deadline, "the first worker made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match stop {
        Stop::Kill => drop(first),
        Stop::Term => terminate(first),
    }
    let at_kill = load().await;
    let served_at_kill = world.sim_stats().await.records_served;
    let second = spawn_worker(&world, kafka.as_ref(), stop);
    let state = world.finished(op, Duration::from_secs(180)).await;
    drop(second);
    if let Some(relay) = relay {
        relay.abort();
    }
    assert_eq!(state.status, OperationStatus::Succeeded);
    assert_eq!(state.records, RECORDS as u64, "every record recorded once");
    let events = world.events_of("operation", op.0).await;
    let count = |kind: &str| events.iter().filter(|(t, _)| t == kind).count();
    assert_eq!(count("Started"), 2, "the second worker took the operation over");
    assert_eq!(count("PageRecorded"), RECORDS / 100);
    assert_eq!(count("Succeeded"), 1);
    if stop == Stop::Term {
        // The stopping worker gave its lease up, and the next one started long before that
        // lease would have ended.
        assert_eq!(count("LeaseReleased"), 1, "{:?}", events.iter().map(|(t, _)| t).collect::<Vec<_>>());
        let started: Vec<_> = events.iter().filter(|(t, _)| t == "Started").map(|(_, p)| p).collect();
        let time = |v: &serde_json::Value| v.as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap();
        let released = events.iter().find(|(t, _)| t == "LeaseReleased").map(|(_, p)| p).unwrap();
        assert_eq!(released["lease_id"], started[0]["lease_id"]);
        let first_until = events
            .iter()
            .filter(|(t, p)| (t == "Started" || t == "LeaseRenewed") && p["lease_id"] == started[0]["lease_id"])
            .map(|(_, p)| time(&p["lease_until"]))
            .max()
            .unwrap();
        assert!(time(&started[1]["at"]) < first_until, "taken over before the released lease's end");
    }
    let resumed = world.sim_stats().await.records_served - served_at_kill;
    println!("killed after {} recorded pages; the next worker read {resumed} records", at_kill.pages);
    // At most the two pages in flight at the kill (being delivered, and prefetched) again.
    assert!(resumed <= RECORDS as u64 - at_kill.records + 200, "{resumed} records read after the kill");
    let report = world.sink.report();
    assert_eq!(report.distinct_records, RECORDS, "nothing skipped");
    assert!(report.duplicate_deliveries <= 1, "at most the page in flight again: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_killed_mid_read_in_process_dispatch() {
    stopped_mid_read_and_resumed(None, Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_killed_mid_read_kafka_consumer_group() {
    stopped_mid_read_and_resumed(Some(amplog_streams::testing::kafka_config()), Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_stopped_mid_read_releases_its_lease_in_process_dispatch() {
    stopped_mid_read_and_resumed(None, Stop::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_stopped_mid_read_releases_its_lease_kafka_consumer_group() {
    stopped_mid_read_and_resumed(Some(amplog_streams::testing::kafka_config()), Stop::Term).await;
}
