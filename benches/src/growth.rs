//! The log as it grows: append and reader rates at each size (100k, 1M, 10M events by
//! default), each as a ratio to the first size's, with the table's and its indexes' sizes.
//! The log is filled with realistic read operations through the command service (request,
//! start, 96 pages, succeed), so streams, snapshots and indexes grow as they do in use.

use crate::{drive, page, service, setup_writers, Report};
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
        let events = settled(pool).await?;
        eprintln!("{events} events: the reader over the newest {READ_WINDOW}...");
        let reads = read_newest(pool, events).await?;
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
    let per_round = fillers.len() as u64 * 10 * 100;
    let rounds = ((target - have).max(0) as u64).div_ceil(per_round);
    let bar = indicatif::ProgressBar::new(rounds * per_round);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "filling the log to {len} events [{bar:30}] {pos} ({per_sec}, {eta} left)",
        )
        .expect("a valid template"),
    );
    bar.set_position(have as u64);
    bar.set_length(target as u64);
    for round in 0..rounds {
        crate::fill_round(svc, fillers, round).await?;
        bar.inc(per_round);
    }
    bar.finish_and_clear();
    Ok(())
}

/// The log's size once two counts a second apart agree (the last appends of the writers
/// were seen landing just after their commands returned, on a durable cluster).
async fn settled(pool: &PgPool) -> Result<i64> {
    let mut last = -1;
    loop {
        let now: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(pool).await?;
        if now == last {
            return Ok(now);
        }
        last = now;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The reader's rate over the newest `READ_WINDOW` events: a catch-up from the cursor
/// before them to the end, as a projector or the relay that fell behind reads.
async fn read_newest(pool: &PgPool, events: i64) -> Result<f64> {
    // From the event `window` positions before the end; what follows it in log order is what
    // a reader resuming there must deliver.
    let window = READ_WINDOW.min(events / 2);
    let (xid, position): (String, i64) = sqlx::query_as(
        "SELECT transaction_id::text, position FROM events WHERE position >= (SELECT max(position) - $1 FROM events)
         ORDER BY position LIMIT 1",
    )
    .bind(window)
    .fetch_one(pool)
    .await?;
    let from = LogCursor { transaction_id: xid.parse().context("xid")?, position };
    let window: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE (transaction_id, position) > ($1::text::xid8, $2)")
            .bind(xid)
            .bind(position)
            .fetch_one(pool)
            .await?;
    let reader = LogReader::new(pool.clone());
    let start = Instant::now();
    let (mut cursor, mut events) = (from, 0i64);
    while events < window {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(300),
            "the reader stalled at {events} of {window} events"
        );
        let batch = reader.read_stored_batch(cursor, 5000).await?;
        let Some(last) = batch.last() else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        cursor = last.cursor();
        events += batch.len() as i64;
    }
    Ok(events as f64 / start.elapsed().as_secs_f64())
}
