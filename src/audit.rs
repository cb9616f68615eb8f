//! The auditors' and operators' commands on the log and the read models: `history`,
//! `verify`, `projections run|status|rebuild|metrics`.

use crate::cli::ProjectionsCmd;
use crate::config::App;
use crate::output;
use anyhow::{Context, Result};
use uuid::Uuid;

/// `amplog history`: an installation's timeline.
pub async fn history(app: &App, installation: Uuid, json: bool) -> Result<i32> {
    let mut conn = app.pool.acquire().await?;
    let events = amplog_log::audit::installation_history(&mut conn, &installation.to_string()).await?;
    if events.is_empty() {
        anyhow::bail!("installation {installation} has no events");
    }
    output::history(&events, json);
    Ok(0)
}

/// `amplog verify`: recomputes the hash chains; exit status 1 when one is broken.
pub async fn verify(app: &App, installation: Option<Uuid>) -> Result<i32> {
    let mut conn = app.pool.acquire().await?;
    let streams = match installation {
        Some(id) => Some(amplog_log::audit::installation_streams(&mut conn, &id.to_string()).await?),
        None => None,
    };
    // About the whole log's size, for the bar (its last position, read from an index).
    let total: i64 = match streams {
        Some(_) => 0,
        None => sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events").fetch_one(&mut *conn).await?,
    };
    let bar = output::progress(total as u64, "verify");
    let report = amplog_log::audit::verify(&mut conn, streams.as_deref(), |n| bar.set_position(n))
        .await
        .context("verifying hash chains")?;
    bar.finish_and_clear();
    output::verify(&report);
    Ok(if report.is_intact() { 0 } else { 1 })
}

/// `amplog projections …`.
pub async fn projections(app: &App, command: ProjectionsCmd) -> Result<i32> {
    use amplog_projections::{rebuild, status, Runner, READ_MODELS};
    match command {
        ProjectionsCmd::Run { batch_size } => {
            let holder = format!("{}:{}", hostname(), std::process::id());
            let mut runner = Runner::new(app.pool.clone(), amplog_log::EventStore::default(), holder);
            runner.batch_size = batch_size.clamp(1, 100_000);
            runner.run(crate::shutdown::signal()).await?;
            Ok(0)
        }
        ProjectionsCmd::Status => {
            let st = status(&app.pool, READ_MODELS).await?;
            println!("{}", serde_json::to_string_pretty(&st)?);
            Ok(0)
        }
        ProjectionsCmd::Rebuild { name } => {
            anyhow::ensure!(name == READ_MODELS, "unknown projector `{name}` (there is one: {READ_MODELS})");
            let started = std::time::Instant::now();
            let bar = output::progress(0, "rebuild");
            let events = rebuild(&app.pool, &amplog_log::EventStore::default(), |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .await?;
            bar.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            println!(
                "rebuilt {name} from {events} events in {secs:.1} s ({:.0} events/s)",
                events as f64 / secs.max(1e-9)
            );
            Ok(0)
        }
        ProjectionsCmd::Metrics => {
            let text = amplog_projections::metrics::render(&app.pool, true).await?;
            print!("{}", amplog_projections::metrics::as_prometheus_text(&text));
            Ok(0)
        }
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "amplog".into())
}
