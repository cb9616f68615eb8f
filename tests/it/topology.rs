//! The whole topology, killed piece by piece: 3 `serve` replicas, 2 projectors, 2 relays,
//! 2 workers in a Kafka consumer group and the scheduler, on one PostgreSQL and one broker
//! of the test's own, on loopback. A client sends keyed mutations spread over the replicas
//! (retried on another one when refused) while a read of 3,000 records runs, and the test
//! SIGKILLs one process of each kind in turn, restarts PostgreSQL once and the broker once.
//! At the end: every request applied once, every record delivered, Kafka's per-aggregate
//! order kept, read models equal to a rebuild, `verify` clean; takeover times printed.

use crate::pg::Cluster;
use crate::process::{free_port, Process};
use amplog_commands::database::{Database, Hosts};
use amplog_domain::operation::OperationStatus;
use amplog_projections::{status, READ_MODELS};
use amplog_simulator::sim::{Faults, SimConfig};
use amplog_simulator::testing::SyncWorld;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RECORDS: usize = 3_000;
const REQUESTS: usize = 120;

/// The processes of one kind, by slot (each with its arguments); a killed one is replaced
/// in its slot.
struct Role {
    args: Vec<Vec<String>>,
    procs: Vec<Process>,
    started: usize,
}

struct Topology {
    env: Vec<(&'static str, String)>,
    logs: PathBuf,
    roles: BTreeMap<&'static str, Role>,
}

impl Topology {
    /// Starts one process of `role` per element of `slots`, each with those arguments.
    fn start(&mut self, role: &'static str, slots: Vec<Vec<String>>) {
        self.roles.insert(role, Role { args: slots.clone(), procs: Vec::new(), started: 0 });
        for slot in 0..slots.len() {
            self.spawn(role, slot);
        }
    }

    /// Starts (or restarts) the process of `role` in `slot`.
    fn spawn(&mut self, role: &'static str, slot: usize) {
        let logs = self.logs.clone();
        let env = self.env.clone();
        let r = self.roles.get_mut(role).unwrap();
        let log = logs.join(format!("{role}-{}.log", r.started));
        r.started += 1;
        let args: Vec<&str> = r.args[slot].iter().map(String::as_str).collect();
        let process = Process::amplog(&args, &env, &log);
        match r.procs.get_mut(slot) {
            Some(existing) => *existing = process,
            None => r.procs.push(process),
        }
    }

    /// SIGKILLs the process of `role` with `pid` (or its first) and starts a replacement.
    fn kill(&mut self, role: &'static str, pid: Option<u32>) -> u32 {
        let r = self.roles.get_mut(role).unwrap();
        let slot = pid.and_then(|pid| r.procs.iter().position(|p| p.pid() == pid)).unwrap_or(0);
        let killed = r.procs[slot].pid();
        drop(std::mem::replace(&mut r.procs[slot], Process(None)));
        self.spawn(role, slot);
        killed
    }
}

/// The pid at the end of a singleton leader's holder name (`…:{host}:{pid}`).
async fn leader(pool: &sqlx::PgPool, singleton: &str) -> Option<u32> {
    let holder = status(pool, singleton).await.ok()?.leader?;
    holder.rsplit(':').next()?.parse().ok()
}

/// How long until `singleton` has a leader other than `killed`.
async fn taken_over(pool: &sqlx::PgPool, singleton: &str, killed: u32) -> Duration {
    let started = Instant::now();
    loop {
        if leader(pool, singleton).await.is_some_and(|pid| pid != killed) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(90), "nobody took {singleton} over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last lines of every process's log, for a failure's message.
fn tails(dir: &std::path::Path) -> String {
    let mut out = String::new();
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!("== {}\n{}\n", file.display(), lines[lines.len().saturating_sub(8)..].join("\n")));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_can_die() {
    let cluster = Cluster::primary();
    let admin = sqlx::PgPool::connect(&cluster.url("postgres")).await.unwrap();
    sqlx::query("CREATE DATABASE amplog").execute(&admin).await.unwrap();
    admin.close().await;
    let url = cluster.url("amplog");
    let database = Database::connect(Hosts::parse(&url).unwrap(), 16).await.unwrap();
    let db = amplog_commands::testing::TestDb { pool: database.pool.clone(), url: url.clone(), name: "amplog".into() };
    let faults = Faults { slow: 1.0, slow_ms: 300, ..Faults::default() };
    let world = SyncWorld::start_on(db, SimConfig { records: RECORDS, faults, ..SimConfig::default() }).await;
    let pool = world.db.pool.clone();
    let mut broker = amplog_streams::testing::OwnBroker::start();
    let kafka = amplog_streams::testing::config_on(&broker.address());
    let (_, api_key) = amplog_api::Keys::new(&world.service)
        .create(world.ctx.project_id, amplog_api::Scope::Write, None)
        .await
        .unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut topology = Topology {
        env: [crate::process::world_env(&world, &kafka), vec![("AMPLOG_LOG", "info,sqlx=error".into())]].concat(),
        logs: logs.path().to_path_buf(),
        roles: BTreeMap::new(),
    };
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let args = |list: &[&str], n: usize| vec![list.iter().map(|a| a.to_string()).collect::<Vec<_>>(); n];
    let serve = ports
        .iter()
        .map(|port| {
            ["serve", "--listen", &format!("127.0.0.1:{port}"), "--projectors", "off", "--workers", "off"]
                .map(String::from)
                .to_vec()
        })
        .collect();
    topology.start("serve", serve);
    topology.start("projector", args(&["projections", "run", "--batch-size", "50"], 2));
    topology.start("relay", args(&["relay"], 2));
    topology.start("worker", args(&["worker", "--no-scheduler", "--concurrency", "1", "--lease-secs", "3"], 2));
    topology.start("scheduler", args(&["scheduler"], 1));
    let http = amplog_providers::connector::http_client().timeout(Duration::from_secs(10)).build().unwrap();
    let ready = |port: u16| {
        let http = http.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            while !http.get(format!("http://127.0.0.1:{port}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
                assert!(Instant::now() < deadline, "serve on {port} did not become ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    for port in &ports {
        ready(*port).await;
    }

    // The client: keyed mutations spread over the replicas, each retried (on the next
    // replica) with its key until acknowledged.
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let client = {
        let (http, key, ports, acknowledged) = (http.clone(), api_key.clone(), ports.clone(), acknowledged.clone());
        let integration = world.integration.0;
        tokio::spawn(async move {
            let mutation = "mutation($input: CreateConnectionInput!) { createConnection(input: $input) { id } }";
            let mut refused = 0;
            for i in 0..REQUESTS {
                let variables = json!({"input": {"integrationId": integration, "groupRef": format!("topology-{i}"),
                    "credentials": {"access_token": format!("token-{i}")}}});
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut replica = i;
                let id = loop {
                    let port = ports[replica % ports.len()];
                    let answer = http
                        .post(format!("http://127.0.0.1:{port}/graphql"))
                        .header("x-api-key", &key)
                        .header("idempotency-key", format!("topology-{i}"))
                        .json(&json!({"query": mutation, "variables": variables}))
                        .send()
                        .await;
                    let body: Option<Value> = match answer {
                        Ok(response) => response.json().await.ok(),
                        Err(_) => None,
                    };
                    if let Some(id) = body.as_ref().and_then(|b| b["data"]["createConnection"]["id"].as_str()) {
                        break id.to_string();
                    }
                    refused += 1;
                    replica += 1;
                    assert!(Instant::now() < deadline, "request {i} never acknowledged: {body:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                acknowledged.lock().unwrap().push(id);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            refused
        })
    };
    // A full read (from the start of time): the scheduler's own reads of the installation
    // may have moved its watermark already.
    let full = amplog_commands::service::NewOperation {
        since: Some(chrono::DateTime::UNIX_EPOCH),
        ..amplog_commands::testing::read_of("contacts")
    };
    // Refused while the scheduler's own read of the object runs (one read per object at a
    // time): asked again until it is accepted.
    let deadline = Instant::now() + Duration::from_secs(60);
    let requested = loop {
        match world.service.request_operation(&world.ctx, world.installation, &full).await {
            Ok(outcome) => break outcome,
            Err(error) => assert!(Instant::now() < deadline, "the read was never accepted: {error} ({})", error.code()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let op = amplog_domain::OperationId(requested.id_of("operation").unwrap());
    let pages = || async {
        world
            .service
            .load::<amplog_domain::operation::Operation>(&world.ctx, op.0)
            .await
            .map(|l| l.state.pages)
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while pages().await < 2 {
        assert!(Instant::now() < deadline, "the read did not start:\n{}", tails(logs.path()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // One of each kind, in turn.
    let mut report = Vec::new();
    let killed = topology.kill("worker", None);
    report.push(format!("worker {killed} killed at page {}", pages().await));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = topology.kill("serve", None);
    report.push(format!("serve {killed} killed; the client moved to the other replicas"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (role, singleton) in [("projector", READ_MODELS), ("relay", amplog_streams::RELAY), ("scheduler", "scheduler")]
    {
        let pid = leader(&pool, singleton).await.expect("a leader");
        let killed = topology.kill(role, Some(pid));
        assert_eq!(killed, pid, "the {role} killed is the leader");
        let took = taken_over(&pool, singleton, killed).await;
        report.push(format!("{role} leader {killed} killed: {singleton} taken over in {took:?}"));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let restarted = Instant::now();
    cluster.restart();
    for port in &ports {
        ready(*port).await;
    }
    report.push(format!(
        "PostgreSQL restarted (immediate stop): every serve replica ready again after {:?}",
        restarted.elapsed()
    ));
    let restarted = Instant::now();
    broker.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.restart();
    report.push(format!("broker restarted in {:?}", restarted.elapsed()));

    let refused = client.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let state = loop {
        let state = world.service.load::<amplog_domain::operation::Operation>(&world.ctx, op.0).await.map(|l| l.state);
        match state {
            Ok(state) if state.status.is_terminal() => break state,
            state => assert!(
                Instant::now() < deadline,
                "the read did not finish: {state:?}\n{}\n{}",
                report.join("\n"),
                tails(logs.path())
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(state.status, OperationStatus::Succeeded);
    assert_eq!(state.records, RECORDS as u64);
    assert_eq!(world.sink.report().distinct_records, RECORDS, "every record delivered");

    // Every request applied once.
    let acknowledged: HashSet<String> = acknowledged.lock().unwrap().iter().cloned().collect();
    assert_eq!(acknowledged.len(), REQUESTS, "each request its own connection");
    let created: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM events WHERE aggregate_type = 'connection' AND sequence = 1 AND project_id = $1
           AND aggregate_id <> $2",
    )
    .bind(world.ctx.project_id.0)
    .bind(world.connection.0.to_string())
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(created.len(), REQUESTS, "no request applied twice");
    assert_eq!(created.into_iter().collect::<HashSet<_>>(), acknowledged);

    // Kafka: every event of the log, in order per aggregate.
    let deadline = Instant::now() + Duration::from_secs(120);
    while status(&pool, amplog_streams::RELAY).await.map(|s| s.lag_events).unwrap_or(1) > 0 {
        assert!(Instant::now() < deadline, "the relay did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let topics = [kafka.aggregate_topic("connection"), kafka.aggregate_topic("operation")];
    let logged: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT event_id FROM events WHERE aggregate_type IN ('connection', 'operation')")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut collector = amplog_streams::testing::Collector::new(&kafka, &topics).await;
    assert!(collector.until_distinct(logged.len(), Duration::from_secs(120)).await, "every event on Kafka");
    collector.drain(Duration::from_secs(1)).await;
    let order = amplog_streams::testing::order_report(&collector.received);
    assert!(order.out_of_order.is_empty(), "{:?}", order.out_of_order);
    let received: HashSet<String> = collector.received.iter().map(|r| r.event.id.clone()).collect();
    assert!(logged.iter().all(|id| received.contains(&id.to_string())), "no event skipped");

    // The read models equal a rebuild from the log; every chain verifies. Nothing appends
    // meanwhile (the scheduler and the workers stopped), so any difference is the rebuild's.
    topology.roles.remove("scheduler");
    topology.roles.remove("worker");
    let deadline = Instant::now() + Duration::from_secs(120);
    while status(&pool, READ_MODELS).await.map(|s| s.lag_events).unwrap_or(1) > 0 {
        assert!(Instant::now() < deadline, "the projector did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let incremental = amplog_projections::fingerprint(&pool).await.unwrap();
    topology.roles.remove("projector");
    amplog_projections::rebuild(&pool, &amplog_log::EventStore::default(), |_, _| {}).await.unwrap();
    assert_eq!(amplog_projections::fingerprint(&pool).await.unwrap(), incremental, "the read models equal a rebuild");
    let verify = std::process::Command::new(env!("CARGO_BIN_EXE_amplog"))
        .arg("verify")
        .env("DATABASE_URL", &url)
        .env("AMPLOG_LOG", "warn")
        .output()
        .unwrap();
    assert!(verify.status.success(), "verify: {}", String::from_utf8_lossy(&verify.stdout));
    drop(topology);
    report.push(format!(
        "{REQUESTS} requests applied once ({refused} attempts refused on the way), {RECORDS} records delivered, {} events on Kafka ({} sent twice)",
        order.distinct, order.duplicates
    ));
    println!("{}", report.join("\n"));
}
