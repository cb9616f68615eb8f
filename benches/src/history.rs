//! An installation's history paged by cursor (`audit::installation_history_in`, what the
//! GraphQL `installationHistory` and the export run) against the cheapest read of as many
//! events: pages of the log itself in log order. The installation's operations are
//! interleaved with other installations' in the log, and the history is measured at two
//! sizes, so a page that costs more as an installation's history grows shows.

use crate::{service, setup_writers, Report, Stats, Writer};
use amplog_domain::*;
use amplog_log::audit::{installation_history_in, HistoryRange};
use amplog_log::LogCursor;
use anyhow::Result;
use sqlx::PgPool;
use std::time::{Duration, Instant};

/// Pages each read operation records, and installations whose operations interleave.
const PAGES: u64 = 12;
const INSTALLATIONS: usize = 4;
const PAGE: i64 = 1000;

/// Requests, runs and finishes `operations` reads on each writer's installation, the
/// writers side by side, so their events interleave in the log.
async fn seed(seed_pool: &PgPool, writers: &[Writer], operations: usize) -> Result<()> {
    let tasks: Vec<_> = writers
        .iter()
        .cloned()
        .map(|w| {
            let svc = service(seed_pool);
            tokio::spawn(async move {
                let pages: Vec<_> = (0..PAGES).map(crate::page).collect();
                for _ in 0..operations {
                    crate::finished_read(&svc, &w, &pages).await?;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Pages through the whole history of `installation`; returns the pages' stats.
async fn page_history(pool: &PgPool, installation: InstallationId) -> Result<Stats> {
    let mut conn = pool.acquire().await?;
    let (mut after, mut stats) = (LogCursor::default(), Stats::default());
    let started = Instant::now();
    loop {
        let t0 = Instant::now();
        let range = HistoryRange { after, from: None, to: None, limit: PAGE + 1 };
        let mut events = installation_history_in(&mut conn, &installation.to_string(), range).await?;
        let more = events.len() as i64 > PAGE;
        events.truncate(PAGE as usize);
        stats.latencies.push(t0.elapsed());
        stats.ops += 1;
        stats.events += events.len() as u64;
        let Some(last) = events.last() else { break };
        after = last.cursor();
        if !more {
            break;
        }
    }
    stats.elapsed = started.elapsed();
    Ok(stats)
}

/// The baseline: as many events in pages of the same size, from the log itself in log
/// order (one index range each), decoded by the same reader.
async fn page_log(pool: &PgPool, events: u64) -> Result<Stats> {
    let mut conn = pool.acquire().await?;
    let (mut after, mut stats) = (LogCursor::default(), Stats::default());
    let started = Instant::now();
    while stats.events < events {
        let t0 = Instant::now();
        let page = amplog_log::reader::read_batch_in(&mut conn, after, PAGE).await?;
        stats.latencies.push(t0.elapsed());
        stats.ops += 1;
        stats.events += page.len() as u64;
        let Some(last) = page.last() else { break };
        after = last.cursor();
    }
    stats.elapsed = started.elapsed();
    Ok(stats)
}

pub async fn run(report: &mut Report, pool: &PgPool, seed_pool: &PgPool, operations: usize) -> Result<()> {
    let svc = service(pool);
    let writers = setup_writers(&svc, INSTALLATIONS).await?;
    let target = writers[0].installation;
    let mut seeded = 0;
    for size in [operations / 4, operations] {
        let started = Instant::now();
        seed(seed_pool, &writers, size - seeded).await?;
        seeded = size;
        sqlx::query("VACUUM ANALYZE events").execute(pool).await?;
        eprintln!("seeded {size} operations on each of {INSTALLATIONS} installations in {:.0} s", ms_s(started));
        // Warm both paths once, then measure.
        page_history(pool, target).await?;
        let ours = page_history(pool, target).await?;
        let raw = page_log(pool, ours.events).await?;
        report.pair(
            &format!(
                "history pages of {PAGE}, an installation of {size} operations ({} events; vs log pages)",
                ours.events
            ),
            "pages/s",
            &ours,
            &raw,
            false,
        );
    }
    Ok(())
}

fn ms_s(started: Instant) -> f64 {
    Duration::as_secs_f64(&started.elapsed())
}
