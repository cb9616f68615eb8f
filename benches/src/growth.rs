//! The log as it grows: append and reader rates at each size (100k, 1M, 10M events by
//! default), each as a ratio to the first size's, with the table's and its indexes' sizes.
//! The log is filled with realistic read operations through the command service (request,
//! start, 96 pages, succeed), so streams, snapshots and indexes grow as they do in use.

use crate::{drive, finished_read, page, service, setup_writers, Report};
use amplog_domain::operation::PageRecord;
use amplog_log::{LogCursor, LogReader};
use anyhow::{Context, Result};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The newest events a reader measurement reads (a reader that keeps up reads the end).
const READ_WINDOW: i64 = 100_000;

struct Level {
    events: i64,
    appends: f64,
    append_p99_ms: f64,
    reads: f64,
    table_mib: f64,
    indexes_mib: f64,
}

pub async fn run(report: &mut Report, pool: &PgPool, levels: &[i64], duration: Duration) -> Result<()> {
    let svc = service(pool);
    let fillers = Arc::new(setup_writers(&svc, 8).await?);
    let appenders = Arc::new(setup_writers(&svc, 32).await?);
    let mut measured = Vec::new();
    for &target in levels {
        fill(&svc, &fillers, pool, target).await?;
        sqlx::raw_sql("CHECKPOINT").execute(pool).await?;
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(pool).await?;
        eprintln!("{events} events: appends (32 writers, single-event commands) for {} s...", duration.as_secs());
        let appended = {
            let (svc, appenders) = (svc.clone(), appenders.clone());
            drive(32, duration, move |w, i| {
                let (svc, appenders) = (svc.clone(), appenders.clone());
                async move {
                    let w = &appenders[w];
                    let cursor = page(i).cursor;
                    Ok(svc.record_page(&w.ctx, w.op, w.lease, 100, 51_200, &cursor).await?.events.len() as u64)
                }
            })
            .await?
        };
        eprintln!("{events} events: the reader over the newest {READ_WINDOW}...");
        let reads = read_newest(pool).await?;
        let (table, indexes): (i64, i64) =
            sqlx::query_as("SELECT pg_table_size('events'), pg_indexes_size('events')").fetch_one(pool).await?;
        let level = Level {
            events,
            appends: appended.ops_per_sec(),
            append_p99_ms: crate::ms(appended.percentile(0.99)),
            reads,
            table_mib: table as f64 / 1048576.0,
            indexes_mib: indexes as f64 / 1048576.0,
        };
        eprintln!(
            "  appends {:.0} cmd/s (p99 {:.1} ms), reader {:.0} events/s, table {:.0} MiB, indexes {:.0} MiB",
            level.appends, level.append_p99_ms, level.reads, level.table_mib, level.indexes_mib
        );
        measured.push(level);
    }
    let first = measured.first().context("at least one level")?;
    for level in &measured {
        report.rows.push(format!(
            "| log of {} events: appends, 32 writers / reader over the newest {READ_WINDOW} | {:.0} cmd/s (p99 {:.1} ms) / {:.0} events/s | at {} events: {:.0} cmd/s / {:.0} events/s | **{:.2}** / **{:.2}**; table {:.0} MiB, indexes {:.0} MiB |",
            level.events,
            level.appends,
            level.append_p99_ms,
            level.reads,
            first.events,
            first.appends,
            first.reads,
            level.appends / first.appends,
            level.reads / first.reads,
            level.table_mib,
            level.indexes_mib,
        ));
    }
    Ok(())
}

/// Appends finished read operations (100 events each) until the log holds `target` events.
async fn fill(
    svc: &amplog_commands::CommandService,
    fillers: &Arc<Vec<crate::Writer>>,
    pool: &PgPool,
    target: i64,
) -> Result<()> {
    let have: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(pool).await?;
    let rounds = (target - have).max(0) as u64 / (fillers.len() as u64 * 10 * 100);
    let bar = indicatif::ProgressBar::new(rounds * fillers.len() as u64 * 10 * 100);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "filling the log to {len} events [{bar:30}] {pos} ({per_sec}, {eta} left)",
        )
        .expect("a valid template"),
    );
    bar.set_position(have as u64);
    bar.set_length(target as u64);
    for round in 0..rounds {
        let tasks: Vec<_> = fillers
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
        bar.inc(fillers.len() as u64 * 10 * 100);
    }
    bar.finish_and_clear();
    Ok(())
}

/// The reader's rate over the newest `READ_WINDOW` events: a catch-up from the cursor
/// before them to the end, as a projector or the relay that fell behind reads.
async fn read_newest(pool: &PgPool) -> Result<f64> {
    let (xid, position): (String, i64) = sqlx::query_as(
        "SELECT transaction_id::text, position FROM events ORDER BY transaction_id DESC, position DESC
         OFFSET $1 LIMIT 1",
    )
    .bind(READ_WINDOW)
    .fetch_one(pool)
    .await?;
    let from = LogCursor { transaction_id: xid.parse().context("xid")?, position };
    let start = Instant::now();
    let mut log = LogReader::new(pool.clone()).catch_up(from, 5000).await?;
    let mut events = 0u64;
    while let Some(batch) = log.next_stored().await? {
        events += batch.len() as u64;
    }
    anyhow::ensure!(events as i64 >= READ_WINDOW, "the reader delivered {events} of {READ_WINDOW} events");
    Ok(events as f64 / start.elapsed().as_secs_f64())
}
