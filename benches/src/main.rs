//! `amplog-bench`: load harnesses for the write side and the log reader, each run beside
//! its raw PostgreSQL baseline in the same run against the same server. Prints a Markdown
//! table (ratios are amplog ÷ raw) on stdout and progress on stderr. `benches/run` starts a
//! durable throwaway cluster and calls it; see BENCHMARKS.md.

/// The allocator of the binary (see the workspace Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod api;
mod cpu;
mod growth;
mod history;
mod proxy;
mod relay;
mod sync;

use amplog_commands::credentials::{CredentialKey, CredentialStore, Secret};
use amplog_commands::service::{NewInstallation, NewOperation};
use amplog_commands::{CommandContext, CommandService};
use amplog_domain::integration::{Manifest, ObjectDecl};
use amplog_domain::operation::{Cursor, OperationType, PageRecord, Trigger};
use amplog_domain::*;
use amplog_log::{EventStore, LogCursor, LogReader};
use anyhow::{Context, Result};
use clap::Parser;
use futures::TryStreamExt;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgPool};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    /// A maintenance database URL; the harness creates (and recreates) `amplog_bench`.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// How long each measured load runs.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Size of the log for the reader catch-up benchmark.
    #[arg(long, default_value_t = 1_000_000)]
    catchup_events: i64,
    /// Which benchmarks: `write` (commands, reader, projections), `api`, `relay` (Kafka),
    /// `sync` (workers, simulator → webhook sink), `history` (audit pages), `proxy`, `growth`
    /// (the log at 100k, 1M, 10M events), or `all`.
    #[arg(long, default_value = "all", value_parser = ["write", "api", "relay", "sync", "history", "proxy", "growth", "all"])]
    suite: String,
    /// The sync benchmark: installations read per round, and contacts each reads.
    #[arg(long, default_value_t = 16)]
    sync_installations: usize,
    #[arg(long, default_value_t = 3_000)]
    sync_records: usize,
    /// The Kafka-protocol broker of the relay benchmark (benches/run starts one).
    #[arg(long, env = "AMPLOG_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Events in the log the relay catches up on.
    #[arg(long, default_value_t = 200_000)]
    relay_events: usize,
    /// The API benchmark's seed: installations and operations.
    #[arg(long, default_value_t = 10_000)]
    api_installations: usize,
    #[arg(long, default_value_t = 1_000_000)]
    api_operations: usize,
    /// The log sizes the growth benchmark measures at, in events.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000,10000000")]
    growth_levels: Vec<i64>,
    /// Also measure the API on the full seed (`--api-installations`, `--api-operations`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    api_full_seed: bool,
    /// Read operations of each installation in the history benchmark (measured at a
    /// quarter of it and at all of it).
    #[arg(long, default_value_t = 2_000)]
    history_operations: usize,
    /// The `amplog` binary the API benchmark serves with.
    #[arg(long, default_value = "target/release/amplog")]
    amplog_bin: String,
}

#[derive(Default)]
struct Stats {
    ops: u64,
    events: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Stats {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        sorted.get(((sorted.len() as f64 - 1.0) * p) as usize).copied().unwrap_or_default()
    }
}

/// Runs `op(writer, i)` in a loop on `writers` tasks for `duration`; `op` returns how many
/// events it wrote.
async fn drive<F, Fut>(writers: usize, duration: Duration, op: F) -> Result<Stats>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<u64>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let (mut events, mut latencies) = (0u64, Vec::new());
            let mut i = 0;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                events += op(w, i).await?;
                latencies.push(t0.elapsed());
                i += 1;
            }
            Ok::<_, anyhow::Error>((events, latencies))
        }));
    }
    let mut stats = Stats { ops: 0, events: 0, elapsed: Duration::ZERO, latencies: Vec::new() };
    for task in tasks {
        let (events, latencies) = task.await??;
        stats.events += events;
        stats.ops += latencies.len() as u64;
        stats.latencies.extend(latencies);
    }
    stats.elapsed = start.elapsed();
    Ok(stats)
}

struct Report {
    rows: Vec<String>,
}

impl Report {
    /// A row of latency percentiles (no raw baseline), also printed as progress.
    fn latency_row(&mut self, name: &str, stats: &Stats, target: &str) {
        let row = format!(
            "| {name} | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | — | {target} |",
            ms(stats.percentile(0.5)),
            ms(stats.percentile(0.99)),
            ms(stats.percentile(1.0))
        );
        eprintln!("{row}");
        self.rows.push(row);
    }

    /// A row of two rates measured without per-operation latencies.
    fn rate_pair(&mut self, name: &str, unit: &str, ours: f64, raw: f64) {
        let row = format!("| {name} | {ours:.0} {unit} | {raw:.0} {unit} | **{:.2}** |", ours / raw);
        eprintln!("{row}");
        self.rows.push(row);
    }

    fn pair(&mut self, name: &str, unit: &str, ours: &Stats, raw: &Stats, per_event: bool) {
        let (a, b) = if per_event {
            (ours.events_per_sec(), raw.events_per_sec())
        } else {
            (ours.ops_per_sec(), raw.ops_per_sec())
        };
        let row = format!(
            "| {name} | {a:.0} {unit} (p50 {:.1} ms, p99 {:.1} ms) | {b:.0} {unit} (p50 {:.1} ms, p99 {:.1} ms) | **{:.2}** |",
            ms(ours.percentile(0.5)),
            ms(ours.percentile(0.99)),
            ms(raw.percentile(0.5)),
            ms(raw.percentile(0.99)),
            a / b
        );
        eprintln!("{row}");
        self.rows.push(row);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn fresh_database(url: &str, name: &str) -> Result<PgPool> {
    let admin_options = PgConnectOptions::from_str(url)?;
    let mut admin = sqlx::PgConnection::connect_with(&admin_options).await?;
    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await?;
    sqlx::raw_sql(&format!("CREATE DATABASE {name}")).execute(&mut admin).await?;
    admin.close().await?;
    let options = admin_options.database(name).disable_statement_logging();
    Ok(amplog_commands::connect_and_migrate(options, 48).await?)
}

/// A pool for seeding `database`: seeding is setup, not the measurement, so its commits need
/// not wait for the disk.
async fn seeding_pool(url: &str, database: &str, connections: u32) -> Result<PgPool> {
    let options = PgConnectOptions::from_str(url)?
        .database(database)
        .options([("synchronous_commit", "off")])
        .disable_statement_logging();
    Ok(sqlx::postgres::PgPoolOptions::new().max_connections(connections).connect_with(options).await?)
}

fn service(pool: &PgPool) -> CommandService {
    let key = CredentialKey::from_bytes(&CredentialKey::generate()).expect("32 bytes");
    CommandService::new(pool.clone(), EventStore::default(), CredentialStore::new(key))
}

/// A writer's project, installation and running read operation.
#[derive(Clone)]
struct Writer {
    ctx: CommandContext,
    installation: InstallationId,
    op: OperationId,
    lease: LeaseId,
}

/// One project per writer with an installation and a running read operation.
async fn setup_writers(service: &CommandService, writers: usize) -> Result<Vec<Writer>> {
    let mut out = Vec::new();
    for _ in 0..writers {
        let ctx = CommandContext::new(ProjectId(Uuid::now_v7()), "bench");
        service.create_project(&ctx, "bench").await?;
        let integration = IntegrationId(
            service.declare_integration(&ctx, "crm", "hubspot").await?.id_of("integration").context("id")?,
        );
        let decl = ObjectDecl::named("contacts");
        service.deploy_revision(&ctx, integration, &Manifest { objects: vec![decl] }).await?;
        let connection = ConnectionId(
            service
                .create_connection(&ctx, integration, "g", &Secret("token".into()))
                .await?
                .id_of("connection")
                .context("id")?,
        );
        let new = NewInstallation {
            integration_id: integration,
            revision: None,
            group_ref: "g".into(),
            consumer_ref: "c".into(),
            connection_id: connection,
            objects: None,
        };
        let installation =
            InstallationId(service.create_installation(&ctx, &new).await?.id_of("installation").context("id")?);
        let read = NewOperation {
            op_type: OperationType::Read,
            object: "contacts".into(),
            since: None,
            until: None,
            trigger: Trigger::Scheduled,
        };
        let op =
            OperationId(service.request_operation(&ctx, installation, &read).await?.id_of("operation").context("id")?);
        let lease = LeaseId(Uuid::now_v7());
        service.start_operation(&ctx, op, lease, chrono::Duration::days(1)).await?;
        out.push(Writer { ctx, installation, op, lease });
    }
    Ok(out)
}

/// A realistic read operation on the writer's installation, through the command service:
/// requested, started, its pages recorded in one command, succeeded.
async fn finished_read(svc: &CommandService, w: &Writer, pages: &[PageRecord]) -> Result<()> {
    let read = NewOperation {
        op_type: OperationType::Read,
        object: "contacts".into(),
        since: None,
        until: None,
        trigger: Trigger::Scheduled,
    };
    let op = OperationId(svc.request_operation(&w.ctx, w.installation, &read).await?.id_of("operation").context("id")?);
    let lease = LeaseId(Uuid::now_v7());
    svc.start_operation(&w.ctx, op, lease, chrono::Duration::hours(1)).await?;
    svc.record_pages(&w.ctx, op, lease, pages).await?;
    svc.succeed_operation(&w.ctx, op, lease).await?;
    Ok(())
}

const RAW_PAYLOAD: &str = r#"{"lease_id":"01a20987-4121-77f1-82b3-a126ef612179","records":100,"bytes":51200,"cursor":{"watermark":"2026-11-23T17:49:48.709844Z","page_token":"after-100"},"at":"2026-11-23T17:49:48.709844Z"}"#;

/// Raw baseline: one transaction, one INSERT of `rows` rows into the same events table.
async fn raw_insert(pool: &PgPool, stream: &str, first_sequence: i64, rows: i64) -> Result<u64> {
    let mut tx = amplog_log::tx::begin(pool).await?;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT 'raw', $1, s, 'PageRecorded', '2.0', $3::json, '{\"actor\":\"bench\"}'
         FROM generate_series($2::bigint, $2::bigint + $4 - 1) AS s",
    )
    .bind(stream)
    .bind(first_sequence)
    .bind(RAW_PAYLOAD)
    .bind(rows)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows as u64)
}

fn page(i: u64) -> PageRecord {
    PageRecord {
        records: 100,
        bytes: 51_200,
        cursor: Cursor { watermark: None, page_token: Some(format!("after-{i}")) },
        reread: 0,
    }
}

async fn single_event(pool: &PgPool, report: &mut Report, writers: usize, duration: Duration) -> Result<()> {
    let svc = service(pool);
    let setup = Arc::new(setup_writers(&svc, writers).await?);
    eprintln!("single-event commands, {writers} writer(s)...");
    let ours = drive(writers, duration, move |w, i| {
        let (svc, setup) = (svc.clone(), setup.clone());
        async move {
            let Writer { ctx, op, lease, .. } = &setup[w];
            Ok(svc.record_page(ctx, *op, *lease, 100, 51_200, &page(i).cursor).await?.events.len() as u64)
        }
    })
    .await?;
    let pool2 = pool.clone();
    let run = Uuid::now_v7();
    let raw = drive(writers, duration, move |w, i| {
        let pool = pool2.clone();
        async move { raw_insert(&pool, &format!("{run}-{w}"), i as i64 + 1, 1).await }
    })
    .await?;
    report.pair(
        &format!("single-event commands, {writers} writer(s) (vs one-row INSERT transactions)"),
        "cmd/s",
        &ours,
        &raw,
        false,
    );
    Ok(())
}

async fn hundred_event(pool: &PgPool, report: &mut Report, writers: usize, duration: Duration) -> Result<()> {
    let svc = service(pool);
    let setup = Arc::new(setup_writers(&svc, writers).await?);
    eprintln!("100-event commands, {writers} writers...");
    let ours = drive(writers, duration, move |w, i| {
        let (svc, setup) = (svc.clone(), setup.clone());
        async move {
            let Writer { ctx, op, lease, .. } = &setup[w];
            let pages: Vec<PageRecord> = (0..100).map(|p| page(i * 100 + p)).collect();
            Ok(svc.record_pages(ctx, *op, *lease, &pages).await?.events.len() as u64)
        }
    })
    .await?;
    let pool2 = pool.clone();
    let run = Uuid::now_v7();
    let raw = drive(writers, duration, move |w, i| {
        let pool = pool2.clone();
        async move { raw_insert(&pool, &format!("{run}-{w}"), i as i64 * 100 + 1, 100).await }
    })
    .await?;
    report.pair(
        &format!("100-event commands, {writers} writers (vs 100-row INSERT transactions)"),
        "events/s",
        &ours,
        &raw,
        true,
    );
    Ok(())
}

/// Ten finished read operations (100 events each) per writer, all writers at once.
async fn fill_round(svc: &CommandService, writers: &[Writer], round: u64) -> Result<()> {
    let tasks: Vec<_> = writers
        .iter()
        .cloned()
        .map(|w| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let pages: Vec<PageRecord> = (0..96).map(|p| page(round * 100 + p)).collect();
                for _ in 0..10 {
                    finished_read(&svc, &w, &pages).await?;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn catch_up(pool: &PgPool, report: &mut Report, target: i64) -> Result<()> {
    let svc = service(pool);
    let setup = Arc::new(setup_writers(&svc, 8).await?);
    let mut have: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(pool).await?;
    eprintln!(
        "filling the log to {target} events: read operations of 100 events each (request, start, 96 pages, succeed)..."
    );
    let mut round = 0u64;
    while have < target {
        fill_round(&svc, &setup, round).await?;
        have += 8 * 10 * 100;
        round += 1;
        if round.is_multiple_of(20) {
            eprintln!("  {have} events");
        }
    }
    sqlx::raw_sql("VACUUM ANALYZE events").execute(pool).await?;
    let have: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(pool).await?;

    eprintln!("reader catch-up over {have} events...");
    let reader = LogReader::new(pool.clone());
    let start = Instant::now();
    let (mut cursor, mut events, mut latencies) = (LogCursor::default(), 0u64, Vec::new());
    // Read until every event is delivered: a batch can come back empty while any other
    // transaction (autovacuum's ANALYZE, say) holds the snapshot's xmin back.
    while (events as i64) < have {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(600), "the reader stalled at {events} of {have} events");
        let t0 = Instant::now();
        let batch = reader.read_batch(cursor, 5000).await?;
        latencies.push(t0.elapsed());
        let Some(last) = batch.last() else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        cursor = last.cursor();
        events += batch.len() as u64;
        if events % 200_000 < 5000 {
            eprintln!("  {events} events");
        }
    }
    let ours = Stats { ops: latencies.len() as u64, events, elapsed: start.elapsed(), latencies };

    let start = Instant::now();
    let mut conn = pool.acquire().await?;
    let mut rows = sqlx::query(
        "SELECT event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, payload::text, metadata::text,
                position, transaction_id::text, recorded_at, project_id, hash
         FROM events ORDER BY transaction_id, position",
    )
    .fetch(&mut *conn);
    let mut raw_events = 0u64;
    while let Some(row) = rows.try_next().await? {
        use sqlx::Row;
        let _: (Uuid, String, String, i64, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get::<String, _>(6));
        raw_events += 1;
    }
    drop(rows);
    let raw = Stats { ops: 1, events: raw_events, elapsed: start.elapsed(), latencies: vec![start.elapsed()] };
    anyhow::ensure!(raw_events == events, "the reader delivered {events} events of {raw_events}");
    report.pair(
        &format!("log reader catch-up over {have} events (vs one ordered SELECT scan)"),
        "events/s",
        &ours,
        &raw,
        true,
    );

    eprintln!("rebuild of every read model from {have} events...");
    let start = Instant::now();
    let mut last_report = Instant::now();
    let rebuilt = amplog_projections::rebuild(pool, &EventStore::default(), |done, total| {
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!("  {done}/{total}");
        }
    })
    .await?;
    let elapsed = start.elapsed();
    let ours = Stats { ops: 1, events: rebuilt, elapsed, latencies: vec![elapsed] };
    report.pair(
        &format!("rebuild of all read models from {have} events (vs the same ordered SELECT scan)"),
        "events/s",
        &ours,
        &raw,
        true,
    );
    Ok(())
}

/// Projection lag at a steady command rate: the time from a command's commit until the
/// projector's checkpoint has passed its event, for every command.
async fn projection_lag(pool: &PgPool, report: &mut Report, rate: u64, duration: Duration) -> Result<()> {
    let svc = service(pool);
    let per_tick = (rate / 100).max(1) as usize;
    // One stream per command of a tick, so commands of a tick never conflict.
    let setup = Arc::new(setup_writers(&svc, per_tick).await?);
    let runner = amplog_projections::Runner::new(pool.clone(), EventStore::default(), "bench");
    let projector = tokio::spawn(async move { runner.run(std::future::pending()).await });
    tokio::time::sleep(Duration::from_secs(2)).await; // leadership and catch-up
    eprintln!("projection lag at {rate} events/s for {} s...", duration.as_secs());
    let pending: Arc<std::sync::Mutex<Vec<(LogCursor, Instant)>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let (pool, pending, done) = (pool.clone(), pending.clone(), done.clone());
        tokio::spawn(async move {
            let mut lags = Vec::new();
            loop {
                if pending.lock().unwrap().is_empty() && done.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok::<_, anyhow::Error>(lags);
                }
                let mut conn = pool.acquire().await?;
                let checkpoint = LogReader::checkpoint(&mut conn, amplog_projections::READ_MODELS).await?;
                drop(conn);
                let now = Instant::now();
                pending.lock().unwrap().retain(|(cursor, t)| {
                    if *cursor <= checkpoint {
                        lags.push(now - *t);
                        false
                    } else {
                        true
                    }
                });
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let start = Instant::now();
    while start.elapsed() < duration {
        tick.tick().await;
        let mut batch = Vec::new();
        for k in 0..per_tick {
            let (svc, setup, pending) = (svc.clone(), setup.clone(), pending.clone());
            let w = k;
            batch.push(tokio::spawn(async move {
                let Writer { ctx, op, lease, .. } = &setup[w];
                let outcome = svc.record_page(ctx, *op, *lease, 10, 100, &Cursor::default()).await?;
                pending.lock().unwrap().push((outcome.last_cursor().context("cursor")?, Instant::now()));
                Ok::<_, anyhow::Error>(())
            }));
        }
        for t in batch {
            t.await??;
        }
    }
    let elapsed = start.elapsed();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let lags = tokio::time::timeout(Duration::from_secs(60), probe).await???;
    projector.abort();
    let stats = Stats { ops: lags.len() as u64, events: lags.len() as u64, elapsed, latencies: lags };
    report.latency_row(
        &format!(
            "projection lag at a steady {rate} events/s (achieved {:.0}/s, {} events)",
            stats.events_per_sec(),
            stats.ops
        ),
        &stats,
        "target p99 < 500 ms",
    );
    Ok(())
}

/// A fresh database `name` seeded for the API benchmark: its pool, the seed, its URL.
async fn api_seed(
    args: &Args,
    name: &str,
    installations: usize,
    operations: usize,
) -> Result<(PgPool, api::Seeded, String)> {
    let pool = fresh_database(&args.database_url, name).await?;
    let seed_pool = seeding_pool(&args.database_url, name, 40).await?;
    let seeded = api::seed(&pool, &seed_pool, installations, operations).await?;
    seed_pool.close().await;
    let url = PgConnectOptions::from_str(&args.database_url)?.database(name).to_url_lossy().to_string();
    Ok((pool, seeded, url))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let duration = Duration::from_secs(args.seconds);
    let mut report = Report { rows: Vec::new() };
    let wants = |suite: &str| args.suite == suite || args.suite == "all";
    if wants("write") {
        let pool = fresh_database(&args.database_url, "amplog_bench").await?;
        single_event(&pool, &mut report, 1, duration).await?;
        single_event(&pool, &mut report, 32, duration).await?;
        hundred_event(&pool, &mut report, 8, duration).await?;
        catch_up(&pool, &mut report, args.catchup_events).await?;
        projection_lag(&pool, &mut report, 1000, Duration::from_secs(args.seconds.max(10))).await?;
        pool.close().await;
    }
    if wants("relay") {
        let brokers = args.kafka_brokers.as_deref().context("the relay benchmark needs AMPLOG_KAFKA_BROKERS")?;
        relay::run(&mut report, &args.database_url, brokers, args.relay_events, 1000, args.seconds.max(10)).await?;
    }
    if wants("sync") {
        let pool = fresh_database(&args.database_url, "amplog_bench_sync").await?;
        let setup = sync::Setup { installations: args.sync_installations, records: args.sync_records };
        sync::run(&mut report, &pool, setup).await?;
        pool.close().await;
    }
    if wants("proxy") {
        let pool = fresh_database(&args.database_url, "amplog_bench_proxy").await?;
        proxy::run(&mut report, &pool, args.seconds).await?;
        pool.close().await;
    }
    if wants("history") {
        let pool = fresh_database(&args.database_url, "amplog_bench_history").await?;
        let seed_pool = seeding_pool(&args.database_url, "amplog_bench_history", 8).await?;
        history::run(&mut report, &pool, &seed_pool, args.history_operations).await?;
        seed_pool.close().await;
        pool.close().await;
    }
    if wants("growth") {
        let pool = fresh_database(&args.database_url, "amplog_bench_growth").await?;
        growth::run(&mut report, &pool, &args.growth_levels, duration).await?;
        pool.close().await;
    }
    if wants("api") {
        // The small seed (1k installations, 20k operations) measured in full, then the full
        // seed's installation query at the same rate: does the cost grow with the data?
        let secs = args.seconds.max(10);
        let small = api_seed(&args, "amplog_bench_api", 1_000, 20_000).await?;
        let target = api::Target { bin: &args.amplog_bin, url: &small.2, secs, label: "small seed", step: true };
        let small = api::run(&mut report, &small.0, small.1, target).await?;
        if args.api_full_seed {
            let full = api_seed(&args, "amplog_bench_api_full", args.api_installations, args.api_operations).await?;
            let label = format!(
                "full seed, {}k installations, {}k operations",
                args.api_installations / 1000,
                args.api_operations / 1000
            );
            let target = api::Target { bin: &args.amplog_bin, url: &full.2, secs, label: &label, step: false };
            let full = api::run(&mut report, &full.0, full.1, target).await?;
            let (a, b) = (full.api.percentile(0.99), small.api.percentile(0.99));
            let (ta, tb) = (full.tenant.percentile(0.99), small.tenant.percentile(0.99));
            report.rows.push(format!(
                "| API: installation query p99 at 1,000 requests/s, {label} ÷ small seed | {:.1} ms ÷ {:.1} ms = **{:.2}×** | raw-tenant {:.1} ms ÷ {:.1} ms = {:.2}× | target ≤ 1.5× |",
                ms(a), ms(b), ms(a) / ms(b).max(1e-9), ms(ta), ms(tb), ms(ta) / ms(tb).max(1e-9)
            ));
        }
    }
    println!("| benchmark | amplog | raw baseline | ratio |");
    println!("|---|---|---|---|");
    for row in report.rows {
        println!("{row}");
    }
    Ok(())
}
