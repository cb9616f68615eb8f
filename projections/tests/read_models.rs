//! Read models equal the log: incrementally, after a rebuild, and against an independent
//! fold written here; one leader at a time; no event skipped.

use amplog_commands::service::NewOperation;
use amplog_commands::testing::CommitGate;
use amplog_commands::testing::{
    credential_store, read_of, seed, start_read, test_db_with, Seeded, TestDb, SEED_SECRET,
};
use amplog_commands::{CommandError, CommandService};
use amplog_domain::operation::{Cursor, ErrorClass, OperationType, PageRecord, Trigger};
use amplog_domain::*;
use amplog_log::{EventStore, LogCursor, LogReader};
use amplog_projections::{rebuild, status, wait_for, Runner, READ_MODELS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

struct Workload {
    service: CommandService,
    projects: Vec<Seeded>,
    operations: Vec<(usize, OperationId, LeaseId)>,
}

/// One random command; refused ones are part of the workload (they append nothing).
async fn random_command(w: &Workload, rng: &mut StdRng) -> Result<Option<(usize, OperationId, LeaseId)>, CommandError> {
    let p = rng.gen_range(0..w.projects.len());
    let s = &w.projects[p];
    let ctx = &s.ctx;
    let objects = ["contacts", "companies", "deals"];
    let op_of = |rng: &mut StdRng| {
        let mine: Vec<_> = w.operations.iter().filter(|(q, _, _)| *q == p).collect();
        (!mine.is_empty()).then(|| *mine[rng.gen_range(0..mine.len())])
    };
    match rng.gen_range(0..100) {
        0..=24 => {
            let op_type = match rng.gen_range(0..10) {
                0 => OperationType::Write,
                1 => OperationType::Proxy,
                _ => OperationType::Read,
            };
            let trigger = if rng.gen_bool(0.2) { Trigger::Backfill } else { Trigger::Scheduled };
            let new = NewOperation {
                op_type,
                object: objects[rng.gen_range(0..3)].into(),
                since: None,
                until: None,
                trigger,
            };
            let outcome = w.service.request_operation(ctx, s.installation, &new).await?;
            let op = OperationId(outcome.id_of("operation").unwrap());
            return Ok(Some((p, op, LeaseId(Uuid::now_v7()))));
        }
        25..=39 => {
            if let Some((_, op, lease)) = op_of(rng) {
                w.service.start_operation(ctx, op, lease, chrono::Duration::minutes(10)).await?;
            }
        }
        40..=64 => {
            if let Some((_, op, lease)) = op_of(rng) {
                let records = rng.gen_range(0..500);
                let cursor =
                    Cursor { watermark: Some(chrono::Utc::now()), page_token: Some(format!("t{}", rng.gen::<u32>())) };
                if rng.gen_bool(0.2) {
                    let pages =
                        vec![PageRecord { records, bytes: records * 10, cursor, reread: 0 }; rng.gen_range(1..5)];
                    w.service.record_pages(ctx, op, lease, &pages).await?;
                } else {
                    w.service.record_page(ctx, op, lease, records, records * 10, &cursor).await?;
                }
            }
        }
        65..=74 => {
            if let Some((_, op, lease)) = op_of(rng) {
                w.service.succeed_operation(ctx, op, lease).await?;
            }
        }
        75..=80 => {
            if let Some((_, op, lease)) = op_of(rng) {
                let retryable = rng.gen_bool(0.6);
                w.service.fail_operation(ctx, op, lease, ErrorClass::Provider5xx, "503", retryable).await?;
            }
        }
        81..=84 => {
            if let Some((_, op, _)) = op_of(rng) {
                w.service.retry_operation(ctx, op).await?;
            }
        }
        85..=86 => {
            if let Some((_, op, _)) = op_of(rng) {
                w.service.cancel_operation(ctx, op, "user").await?;
            }
        }
        87..=90 => {
            if rng.gen_bool(0.5) {
                w.service.pause_installation(ctx, s.installation).await?;
            } else {
                w.service.unpause_installation(ctx, s.installation).await?;
            }
        }
        91..=94 => {
            let secret = amplog_commands::credentials::Secret(format!("token-{}", rng.gen::<u32>()));
            w.service.refresh_token(ctx, s.connection, &secret, None).await?;
        }
        95..=97 => {
            w.service.record_refresh_failure(ctx, s.connection, "invalid_grant").await?;
        }
        _ => {
            let secret = amplog_commands::credentials::Secret(format!("again-{}", rng.gen::<u32>()));
            w.service.reconnect(ctx, s.connection, &secret).await?;
        }
    }
    Ok(None)
}

/// Runs `rounds` rounds of 8 concurrent random commands; conflicts are retried once.
async fn run_workload(w: &mut Workload, seed: u64, rounds: usize) -> (usize, usize) {
    let (mut conflicts, mut refused) = (0, 0);
    for round in 0..rounds {
        let shared = Arc::new(Workload {
            service: w.service.clone(),
            projects: w.projects.iter().map(clone_seeded).collect(),
            operations: w.operations.clone(),
        });
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(round as u64 * 31 + t));
                let mut result = random_command(&shared, &mut rng).await;
                let mut conflicted = false;
                if matches!(result, Err(CommandError::Conflict { .. })) {
                    conflicted = true;
                    let mut rng =
                        StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(round as u64 * 31 + t));
                    result = random_command(&shared, &mut rng).await;
                }
                (result, conflicted)
            }));
        }
        for task in tasks {
            let (result, conflicted) = task.await.unwrap();
            conflicts += conflicted as usize;
            match result {
                Ok(Some(op)) => w.operations.push(op),
                Ok(None) => {}
                Err(CommandError::Domain(_) | CommandError::Conflict { .. }) => refused += 1,
                Err(other) => panic!("unexpected error {other:?}"),
            }
        }
    }
    (conflicts, refused)
}

fn clone_seeded(s: &Seeded) -> Seeded {
    Seeded { ctx: s.ctx.clone(), integration: s.integration, connection: s.connection, installation: s.installation }
}

async fn workload(db: &TestDb, projects: usize) -> Workload {
    let service = db.service();
    let mut seeded = Vec::new();
    for _ in 0..projects {
        seeded.push(seed(&service).await);
    }
    Workload { service, projects: seeded, operations: Vec::new() }
}

/// What the read models must say, folded here from the raw log, independently of the
/// projector: per operation (status, records), per installation (paused, records read),
/// per connection status.
async fn independent_fold(
    pool: &sqlx::PgPool,
) -> (BTreeMap<String, (String, u64)>, BTreeMap<String, (bool, u64)>, BTreeMap<String, String>) {
    let reader = LogReader::new(pool.clone());
    let (mut ops, mut installs, mut conns) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let mut op_installation: BTreeMap<String, (String, String)> = BTreeMap::new();
    // Other tests' transactions on the cluster can hold the xmin back for a moment: a
    // catch-up waits for them.
    let mut log = reader.catch_up(LogCursor::default(), 1000).await.unwrap();
    while let Some(batch) = log.next().await.unwrap() {
        for e in &batch {
            let p = &e.payload;
            match (e.aggregate_type.as_str(), e.event_type.as_str()) {
                ("installation", "Created") => {
                    installs.insert(e.aggregate_id.clone(), (false, 0));
                }
                ("installation", "Paused") => installs.get_mut(&e.aggregate_id).unwrap().0 = true,
                ("installation", "Unpaused") => installs.get_mut(&e.aggregate_id).unwrap().0 = false,
                ("connection", t) => {
                    let status = match t {
                        "Created" => "created",
                        "TokenRefreshed" | "Reconnected" => "working",
                        "RefreshFailed" => "bad_credentials",
                        "Revoked" => "revoked",
                        other => panic!("unknown {other}"),
                    };
                    conns.insert(e.aggregate_id.clone(), status.to_string());
                }
                ("operation", "Requested") => {
                    ops.insert(e.aggregate_id.clone(), ("pending".to_string(), 0));
                    op_installation.insert(
                        e.aggregate_id.clone(),
                        (
                            p["installation_id"].as_str().unwrap().to_string(),
                            p["op_type"].as_str().unwrap().to_string(),
                        ),
                    );
                }
                ("operation", t) => {
                    let op = ops.get_mut(&e.aggregate_id).unwrap();
                    match t {
                        "Started" => op.0 = "running".into(),
                        "PageRecorded" => {
                            let records = p["records"].as_u64().unwrap();
                            op.1 += records;
                            let (installation, op_type) = &op_installation[&e.aggregate_id];
                            if op_type != "write" {
                                installs.get_mut(installation).unwrap().1 += records;
                            }
                        }
                        "Succeeded" => op.0 = "succeeded".into(),
                        "Failed" => op.0 = "failed".into(),
                        "Retried" => op.0 = "pending".into(),
                        "Cancelled" => op.0 = "cancelled".into(),
                        other => panic!("unknown {other}"),
                    }
                }
                _ => {}
            }
        }
    }
    (ops, installs, conns)
}

/// Polls the projector's status (every 25 ms, up to 10 s) until `done` holds.
async fn status_until(pool: &sqlx::PgPool, done: impl Fn(&amplog_projections::ProjectorStatus) -> bool) -> bool {
    for _ in 0..400 {
        if done(&status(pool, READ_MODELS).await.unwrap()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

async fn assert_matches_independent_fold(pool: &sqlx::PgPool) {
    let (ops, installs, conns) = independent_fold(pool).await;
    let rows: Vec<(String, Value)> = sqlx::query_as("SELECT key, doc FROM operations").fetch_all(pool).await.unwrap();
    let projected: BTreeMap<String, (String, u64)> = rows
        .into_iter()
        .map(|(k, d)| (k, (d["status"].as_str().unwrap().to_string(), d["records"].as_u64().unwrap())))
        .collect();
    assert_eq!(projected, ops, "operations: status and records");
    let rows: Vec<(String, bool)> =
        sqlx::query_as("SELECT key, paused FROM installations").fetch_all(pool).await.unwrap();
    let usage: Vec<(String, i64)> = sqlx::query_as(
        "SELECT installation_id, sum((doc->>'records_read')::bigint)::bigint FROM usage_daily GROUP BY installation_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let usage: BTreeMap<String, i64> = usage.into_iter().collect();
    let projected: BTreeMap<String, (bool, u64)> = rows
        .into_iter()
        .map(|(k, paused)| {
            let read = usage.get(&k).copied().unwrap_or(0) as u64;
            (k, (paused, read))
        })
        .collect();
    assert_eq!(projected, installs, "installations: paused, and usage records read");
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT key, status FROM connections").fetch_all(pool).await.unwrap();
    assert_eq!(rows.into_iter().collect::<BTreeMap<_, _>>(), conns, "connections: status");
}

#[tokio::test]
async fn incremental_rebuild_and_an_independent_fold_agree_on_a_random_workload() {
    let db = test_db_with(24).await;
    let mut w = workload(&db, 4).await;
    let mut runner = Runner::new(db.pool.clone(), EventStore::default(), "test");
    runner.batch_size = 37; // batches end anywhere
    let mut total_conflicts = 0;
    for step in 0..6 {
        let (conflicts, _) = run_workload(&mut w, 7 + step, 50).await;
        total_conflicts += conflicts;
        assert!(runner.catch_up().await.unwrap());
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&db.pool).await.unwrap();
    assert!(events > 500, "a sizeable workload: {events} events");
    let st = status(&db.pool, READ_MODELS).await.unwrap();
    assert_eq!(st.lag_events, 0);
    assert_matches_independent_fold(&db.pool).await;
    let incremental = amplog_projections::fingerprint(&db.pool).await.unwrap();
    assert!(
        incremental["operations"].0 > 50 && incremental["usage_daily"].0 > 0 && incremental["read_states"].0 > 0,
        "{incremental:?}"
    );

    let rebuilt_events = rebuild(&db.pool, &EventStore::default(), |_, _| {}).await.unwrap();
    assert_eq!(rebuilt_events as i64, events);
    assert_eq!(
        amplog_projections::fingerprint(&db.pool).await.unwrap(),
        incremental,
        "a rebuild gives byte-identical read models"
    );
    eprintln!("{events} events, {total_conflicts} conflicts retried");
}

#[tokio::test]
async fn a_rebuild_into_an_empty_database_matches_the_incremental_models() {
    let db = test_db_with(24).await;
    let mut w = workload(&db, 3).await;
    let runner = Runner::new(db.pool.clone(), EventStore::default(), "test");
    run_workload(&mut w, 99, 60).await;
    assert!(runner.catch_up().await.unwrap());
    let incremental = amplog_projections::fingerprint(&db.pool).await.unwrap();
    // Drop every read-model row and the checkpoint, then rebuild from the log alone.
    for table in amplog_projections::fold::TABLES {
        sqlx::query(&format!("DELETE FROM {table}")).execute(&db.pool).await.unwrap();
    }
    sqlx::query("DELETE FROM reader_checkpoints").execute(&db.pool).await.unwrap();
    rebuild(&db.pool, &EventStore::default(), |_, _| {}).await.unwrap();
    assert_eq!(amplog_projections::fingerprint(&db.pool).await.unwrap(), incremental);
    assert_eq!(status(&db.pool, READ_MODELS).await.unwrap().lag_events, 0);
}

#[tokio::test]
async fn a_projector_killed_mid_batch_loses_and_duplicates_nothing() {
    let db = test_db_with(24).await;
    let mut w = workload(&db, 3).await;
    run_workload(&mut w, 5, 60).await;
    // Kill the projector task again and again while it works, at random points.
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..8 {
        let mut runner = Runner::new(db.pool.clone(), EventStore::default(), "killed");
        runner.batch_size = 23;
        let task = tokio::spawn(async move { runner.run(std::future::pending()).await });
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5..120))).await;
        task.abort();
        let _ = task.await;
        run_workload(&mut w, rng.gen(), 5).await;
    }
    let runner = Runner::new(db.pool.clone(), EventStore::default(), "final");
    // The aborted leaders' sessions close asynchronously; wait for the lock to be free.
    let mut led = false;
    for _ in 0..100 {
        if runner.catch_up().await.unwrap() {
            led = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(led);
    assert_matches_independent_fold(&db.pool).await;
}

#[tokio::test]
async fn one_leader_at_a_time_and_a_takeover_when_it_dies() {
    let db = test_db_with(24).await;
    let mut w = workload(&db, 2).await;
    let a = tokio::spawn({
        let runner = Runner::new(db.pool.clone(), EventStore::default(), "process-a");
        async move { runner.run(std::future::pending()).await }
    });
    // Let a lead first.
    assert!(status_until(&db.pool, |st| st.leader.is_some()).await);
    assert_eq!(status(&db.pool, READ_MODELS).await.unwrap().leader.as_deref(), Some("process-a"));
    let b = tokio::spawn({
        let runner = Runner::new(db.pool.clone(), EventStore::default(), "process-b");
        async move { runner.run(std::future::pending()).await }
    });
    run_workload(&mut w, 11, 20).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(status(&db.pool, READ_MODELS).await.unwrap().leader.as_deref(), Some("process-a"), "b waits");

    a.abort();
    let _ = a.await;
    run_workload(&mut w, 12, 20).await;
    let took_over = status_until(&db.pool, |st| st.leader.as_deref() == Some("process-b") && st.lag_events == 0).await;
    assert!(took_over, "process-b took over and caught up");
    b.abort();
    let _ = b.await;
    assert_matches_independent_fold(&db.pool).await;
}

#[tokio::test]
async fn a_held_open_append_is_not_skipped_and_reads_can_wait_for_their_writes() {
    let db = test_db_with(24).await;
    let service = db.service();
    let s = seed(&service).await;
    let other = seed(&service).await;
    let runner = Runner::new(db.pool.clone(), EventStore::default(), "live");
    let projector = tokio::spawn(async move { runner.run(std::future::pending()).await });

    let gate = Arc::new(CommitGate::default());
    let slow =
        CommandService::new(db.pool.clone(), EventStore::default(), credential_store()).with_commit_gate(gate.clone());
    let held = {
        let ctx = s.ctx.clone().with_idempotency_key("held-pause");
        let installation = s.installation;
        tokio::spawn(async move { slow.pause_installation(&ctx, installation).await })
    };
    gate.reached.notified().await;
    let mut last = LogCursor::default();
    for _ in 0..50 {
        // Later appends to other streams commit while the pause is held.
        let outcome = service.request_operation(&other.ctx, other.installation, &read_of("contacts")).await;
        last = outcome.unwrap().last_cursor().unwrap();
    }
    // The projector cannot pass the held transaction, so the later requests wait too.
    assert!(!wait_for(&db.pool, READ_MODELS, last, Duration::from_millis(500)).await.unwrap());
    gate.release.add_permits(1);
    let pause = held.await.unwrap().unwrap().last_cursor().unwrap();
    assert!(pause < last, "the held command's transaction started first");
    assert!(wait_for(&db.pool, READ_MODELS, pause, Duration::from_secs(10)).await.unwrap());
    assert!(wait_for(&db.pool, READ_MODELS, last, Duration::from_secs(10)).await.unwrap());
    let paused: bool = sqlx::query_scalar("SELECT paused FROM installations WHERE key = $1")
        .bind(s.installation.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(paused, "the held pause was projected");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM operations").fetch_one(&db.pool).await.unwrap();
    assert_eq!(count, 50);
    projector.abort();
}

#[tokio::test]
async fn read_states_usage_and_health_follow_an_installation() {
    let db = test_db_with(12).await;
    let service = db.service();
    let s = seed(&service).await;
    let runner = Runner::new(db.pool.clone(), EventStore::default(), "t");
    let backfill = NewOperation {
        op_type: OperationType::Read,
        object: "contacts".into(),
        since: None,
        until: None,
        trigger: Trigger::Backfill,
    };
    let op = OperationId(
        service.request_operation(&s.ctx, s.installation, &backfill).await.unwrap().id_of("operation").unwrap(),
    );
    let lease = LeaseId(Uuid::now_v7());
    service.start_operation(&s.ctx, op, lease, chrono::Duration::minutes(5)).await.unwrap();
    let mark = chrono::DateTime::parse_from_rfc3339("2026-05-01T10:00:00Z").unwrap().with_timezone(&chrono::Utc);
    service
        .record_page(&s.ctx, op, lease, 100, 1000, &Cursor { watermark: Some(mark), page_token: Some("p2".into()) })
        .await
        .unwrap();
    runner.catch_up().await.unwrap();
    let state: Value =
        sqlx::query_scalar("SELECT doc FROM read_states WHERE installation_id = $1 AND object = 'contacts'")
            .bind(s.installation.to_string())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (state["mode"].as_str(), state["page_token"].as_str(), state["records_read"].as_u64()),
        (Some("backfill"), Some("p2"), Some(100))
    );
    service.succeed_operation(&s.ctx, op, lease).await.unwrap();
    service.record_refresh_failure(&s.ctx, s.connection, "invalid_grant").await.unwrap();
    runner.catch_up().await.unwrap();
    let state: Value = sqlx::query_scalar("SELECT doc FROM read_states WHERE installation_id = $1")
        .bind(s.installation.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (state["mode"].as_str(), state["page_token"].as_str(), state["watermark"].as_str()),
        (Some("incremental"), None, Some("2026-05-01T10:00:00Z"))
    );
    let inst: Value = sqlx::query_scalar("SELECT doc FROM installations WHERE key = $1")
        .bind(s.installation.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(inst["health"], "needs_reauth");
    assert_eq!(inst["connection_status"], "bad_credentials");
    assert_eq!(inst["last_operation"]["status"], "succeeded");
    assert!(inst["last_successful_read"]["contacts"].is_string());
    let usage: Value = sqlx::query_scalar("SELECT doc FROM usage_daily WHERE installation_id = $1")
        .bind(s.installation.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (usage["records_read"].as_u64(), usage["bytes"].as_u64(), usage["operations"]["read.succeeded"].as_u64()),
        (Some(100), Some(1000), Some(1))
    );
    let months =
        amplog_projections::usage::monthly(&mut db.pool.acquire().await.unwrap(), s.ctx.project_id.0).await.unwrap();
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    assert_eq!(months.len(), 1);
    assert_eq!(
        (months[0].month.as_str(), months[0].records_read, months[0].bytes, months[0].active_installations),
        (month.as_str(), 100, 1000, 1)
    );
    assert_eq!(months[0].operations.get("read.succeeded"), Some(&1));
    assert!(
        amplog_projections::usage::monthly(&mut db.pool.acquire().await.unwrap(), Uuid::now_v7())
            .await
            .unwrap()
            .is_empty(),
        "scoped by project"
    );
    let streams: i64 = sqlx::query_scalar("SELECT count(*) FROM installation_streams WHERE installation_id = $1")
        .bind(s.installation.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(streams, 3, "installation, connection, operation");
}

#[tokio::test]
async fn metrics_come_from_the_log_and_read_the_same_after_a_restart() {
    let db = test_db_with(12).await;
    let service = db.service();
    let s = seed(&service).await;
    let (op, lease) = start_read(&service, &s, "contacts").await;
    service.record_page(&s.ctx, op, lease, 120, 4096, &Cursor::default()).await.unwrap();
    service.succeed_operation(&s.ctx, op, lease).await.unwrap();
    service.request_operation(&s.ctx, s.installation, &read_of("deals")).await.unwrap();
    Runner::new(db.pool.clone(), EventStore::default(), "m").catch_up().await.unwrap();

    let text = amplog_projections::metrics::render(&db.pool, true).await.unwrap();
    let p = s.ctx.project_id;
    for line in [
        format!("amplog_records_read_total{{project=\"{p}\"}} 120"),
        format!("amplog_bytes_total{{project=\"{p}\"}} 4096"),
        format!("amplog_operations{{project=\"{p}\",type=\"read\",status=\"succeeded\"}} 1.0"),
        format!("amplog_operations{{project=\"{p}\",type=\"read\",status=\"pending\"}} 1.0"),
        format!("amplog_operations_finished_total{{project=\"{p}\",type=\"read\",status=\"succeeded\"}} 1"),
        format!("amplog_connections{{project=\"{p}\",status=\"created\"}} 1.0"),
        format!("amplog_active_installations{{project=\"{p}\",health=\"healthy\"}} 1.0"),
        "amplog_operation_duration_seconds_count{type=\"read\"} 1".to_string(),
        "amplog_projector_lag_events{projector=\"read_models\"} 0.0".to_string(),
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
    }
    // Buckets are cumulative: non-decreasing, ending at the count; the smallest holds
    // exactly the operations that took 100 ms or less.
    let buckets: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("amplog_operation_duration_seconds_bucket{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), amplog_projections::metrics::DURATION_BUCKETS.len() + 1, "{text}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]) && *buckets.last().unwrap() == 1, "{buckets:?}");
    let fast: i64 = sqlx::query_scalar("SELECT count(*) FROM operations WHERE (doc->>'duration_ms')::float8 <= 100")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(buckets[0], fast as u64);
    // Another process (a new pool) renders the same metrics: nothing lived in memory.
    let fresh = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&db.url).await.unwrap();
    let again = amplog_projections::metrics::render(&fresh, true).await.unwrap();
    let stable = |t: &str| {
        t.lines().filter(|l| !l.starts_with("amplog_projector_lag_seconds")).map(str::to_string).collect::<Vec<_>>()
    };
    assert_eq!(stable(&again), stable(&text));
    // Without per-project series, no tenant id appears; the totals are the same.
    let open = amplog_projections::metrics::render(&db.pool, false).await.unwrap();
    assert!(!open.contains(&p.0.to_string()) && !open.contains("project="), "{open}");
    assert!(open.lines().any(|l| l == "amplog_records_read_total 120"), "{open}");
    // The Prometheus text format names counters' series in HELP and TYPE, without # EOF.
    let prometheus = amplog_projections::metrics::as_prometheus_text(&open);
    assert!(prometheus.contains("# TYPE amplog_records_read_total counter\n"), "{prometheus}");
    assert!(prometheus.contains("# HELP amplog_records_read_total Records read"), "{prometheus}");
    assert!(prometheus.contains("# TYPE amplog_operation_duration_seconds histogram\n"), "{prometheus}");
    assert!(!prometheus.contains("# EOF") && open.ends_with("# EOF\n"));
}

#[tokio::test]
async fn a_rebuild_while_the_live_projector_runs_swaps_in_and_loses_nothing() {
    let db = test_db_with(32).await;
    let mut w = workload(&db, 3).await;
    run_workload(&mut w, 21, 30).await;
    let mut runner = Runner::new(db.pool.clone(), EventStore::default(), "live");
    runner.batch_size = 17;
    let live = tokio::spawn(async move { runner.run(std::future::pending()).await });
    // Writes go on during the rebuild; a reader of the live tables is never refused.
    let writer = {
        let mut w = Workload {
            service: w.service.clone(),
            projects: w.projects.iter().map(clone_seeded).collect(),
            operations: w.operations.clone(),
        };
        tokio::spawn(async move {
            run_workload(&mut w, 22, 30).await;
        })
    };
    let reader = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            for _ in 0..50 {
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM operations").fetch_one(&pool).await.unwrap();
                assert!(n >= 0);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    rebuild(&db.pool, &EventStore::default(), |_, _| {}).await.unwrap();
    writer.await.unwrap();
    reader.await.unwrap();
    let caught_up = status_until(&db.pool, |st| st.lag_events == 0).await;
    assert!(caught_up, "the fenced live projector resumed from the rebuilt checkpoint");
    live.abort();
    let _ = live.await;
    assert_matches_independent_fold(&db.pool).await;
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE tablename LIKE '%\\_\\_rebuild' OR tablename LIKE '%\\_\\_old'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(tables, 0, "no shadow table is left behind");
}

/// Text of every kind a tenant may send: controls, separators, non-characters, the largest
/// code point, combining marks, right-to-left text, emoji, escapes spelt out, and U+0000.
fn tricky_text(rng: &mut StdRng) -> String {
    const PIECES: &[&str] = &[
        "\u{0}",
        "\u{1}",
        "\u{1f}",
        "\u{7f}",
        "\u{85}",
        "\u{a0}",
        "\u{ad}",
        "\u{200b}",
        "\u{200f}",
        "\u{2028}",
        "\u{2029}",
        "\u{202e}",
        "\u{feff}",
        "\u{fffd}",
        "\u{fffe}",
        "\u{ffff}",
        "\u{10ffff}",
        "\u{1f600}",
        "e\u{301}",
        "\u{5d0}\u{5d1}",
        "分",
        "\\",
        "\\u0000",
        "\\\\u0000",
        "\"",
        "'",
        "%00",
        "a",
        "Z",
        " ",
        "\t",
        "\n",
    ];
    let n = rng.gen_range(1..6);
    (0..n).map(|_| PIECES[rng.gen_range(0..PIECES.len())]).collect()
}

/// Every command the domain accepts projects, whatever its text; text the read models could
/// not hold (U+0000) is refused at the command edge with a typed error; and an event that
/// holds such text anyway (a log written before the refusal) projects too, so one tenant's
/// input never stops every projector.
#[tokio::test]
async fn every_text_a_command_accepts_projects_and_a_logged_nul_does_not_stop_the_projector() {
    use amplog_commands::credentials::Secret;
    use amplog_commands::service::NewInstallation;
    use amplog_domain::integration::{Backfill, Manifest, ObjectDecl};
    let db = test_db_with(8).await;
    let service = db.service();
    let s = seed(&service).await;
    let runner = Runner::new(db.pool.clone(), EventStore::default(), "test");
    let mut rng = StdRng::seed_from_u64(18);
    let (mut accepted, mut refused) = (Vec::new(), 0);
    for _ in 0..120 {
        let text = tricky_text(&mut rng);
        let holds_nul = text.contains('\0');
        let expect = |result: Result<amplog_commands::CommandOutcome, CommandError>, what: &str| match result {
            Ok(outcome) => {
                assert!(!holds_nul, "{what} {text:?} was accepted with a NUL");
                Some(outcome)
            }
            Err(CommandError::UnstorableText(_)) if holds_nul => None,
            // Names and refs are printable text: the domain refuses control characters and
            // surrounding white space.
            Err(CommandError::Domain(_)) if text.chars().any(char::is_control) || text.trim() != text => None,
            Err(e) => panic!("{what} {text:?}: {e:?}"),
        };
        if holds_nul {
            // Where the domain sets no rule of its own (a field's name, a reason), the
            // command edge refuses what jsonb cannot hold.
            let object = ObjectDecl {
                optional: false,
                name: "contacts".into(),
                schedule: None,
                backfill: Backfill::None,
                fields: vec![text.clone()],
                destination: None,
                subscribe: vec![],
            };
            let refused = service.deploy_revision(&s.ctx, s.integration, &Manifest { objects: vec![object] }).await;
            assert!(matches!(refused, Err(CommandError::UnstorableText(_))), "{text:?}: {refused:?}");
            let (read, _) = start_read(&service, &s, "deals").await;
            let refused = service.cancel_operation(&s.ctx, read, &text).await;
            assert!(matches!(refused, Err(CommandError::UnstorableText(_))), "{text:?}: {refused:?}");
        }
        let integration =
            expect(service.declare_integration(&s.ctx, &format!("crm {text}"), "hubspot").await, "integration")
                .map(|i| IntegrationId(i.id_of("integration").unwrap()));
        let connection = match integration {
            Some(integration) => expect(
                service.create_connection(&s.ctx, integration, &text, &Secret(SEED_SECRET.into())).await,
                "groupRef",
            ),
            None => None,
        };
        if let (Some(connection), Some(integration)) = (connection, integration) {
            let object = ObjectDecl {
                optional: false,
                name: "contacts".into(),
                schedule: Some("@every 15m".into()),
                backfill: Backfill::Days(1),
                fields: vec![text.clone()],
                destination: Some(text.clone()),
                subscribe: vec![],
            };
            service.deploy_revision(&s.ctx, integration, &Manifest { objects: vec![object] }).await.unwrap();
            let new = NewInstallation {
                integration_id: integration,
                revision: None,
                group_ref: text.clone(),
                consumer_ref: text.clone(),
                connection_id: ConnectionId(connection.id_of("connection").unwrap()),
                objects: None,
            };
            let installation = service.create_installation(&s.ctx, &new).await.unwrap();
            let installation = InstallationId(installation.id_of("installation").unwrap());
            let read = service.request_operation(&s.ctx, installation, &read_of("contacts")).await.unwrap();
            let read = OperationId(read.id_of("operation").unwrap());
            service.cancel_operation(&s.ctx, read, &text).await.unwrap();
            accepted.push(text);
        } else {
            refused += 1;
        }
    }
    assert!(accepted.len() > 20 && refused > 20, "{} accepted, {refused} refused", accepted.len());
    assert!(runner.catch_up().await.unwrap());
    assert_eq!(status(&db.pool, READ_MODELS).await.unwrap().lag_events, 0);
    // What was accepted reads back byte for byte.
    let refs: Vec<String> =
        sqlx::query_scalar("SELECT doc->>'consumer_ref' FROM installations").fetch_all(&db.pool).await.unwrap();
    for text in &accepted {
        assert!(refs.contains(text), "{text:?} is not in the read model");
    }
    let fields: Vec<sqlx::types::Json<Value>> =
        sqlx::query_scalar("SELECT doc -> 'objects' FROM integrations").fetch_all(&db.pool).await.unwrap();
    let fields: Vec<String> = fields
        .iter()
        .flat_map(|o| o.0.as_array().cloned().unwrap_or_default())
        .flat_map(|o| o["fields"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    assert!(accepted.iter().all(|t| fields.contains(t)), "{fields:?}");

    // An event holding U+0000 in the log: a copy of a connection's creation under a new id.
    let created: (String, String, String) = sqlx::query_as(
        "SELECT event_type, event_version, payload::text FROM events WHERE aggregate_type = 'connection'
         ORDER BY position LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let mut payload: Value = serde_json::from_str(&created.2).unwrap();
    let path = if payload.pointer("/Created").is_some() { "/Created/group_ref" } else { "/group_ref" };
    let group = payload.pointer_mut(path).unwrap();
    *group = Value::String("legacy\u{0}group".into());
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, project_id)
         VALUES ('connection', $1, 1, $2, $5, $3::json, '{}', $4)",
    )
    .bind(id.to_string())
    .bind(&created.0)
    .bind(serde_json::to_string(&payload).unwrap())
    .bind(s.ctx.project_id.0)
    .bind(&created.1)
    .execute(&db.pool)
    .await
    .unwrap();
    assert!(runner.catch_up().await.unwrap(), "the projector passes the event");
    assert_eq!(status(&db.pool, READ_MODELS).await.unwrap().lag_events, 0);
    let group: String = sqlx::query_scalar("SELECT doc->>'group_ref' FROM connections WHERE key = $1")
        .bind(id.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(group, "legacy\u{fffd}group");
    // And a rebuild agrees with it, byte for byte.
    let incremental = amplog_projections::fingerprint(&db.pool).await.unwrap();
    rebuild(&db.pool, &EventStore::default(), |_, _| {}).await.unwrap();
    assert_eq!(amplog_projections::fingerprint(&db.pool).await.unwrap(), incremental);
}
