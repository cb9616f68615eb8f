//! `amplog`: wires the crates into one binary. Thin: parse the CLI, build the
//! configuration, connect (embedded PostgreSQL or DATABASE_URL), run one job.

mod config;
mod demo;
mod embedded;
mod output;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "amplog", version, about = "Event-sourced backbone of a product-integration platform")]
struct Cli {
    /// PostgreSQL to use. Unset: amplog runs its own, in the data folder.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// Where the embedded PostgreSQL and the generated credential key live.
    #[arg(long, env = "AMPLOG_DATA_DIR", global = true, default_value = ".amplog")]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply the database migrations.
    Migrate,
    /// Run a realistic scripted scenario through the command layer and print what it appended.
    Demo,
    /// The auditor's timeline of an installation: its events, its connection's and its
    /// operations', in log order.
    History {
        #[arg(long)]
        installation: uuid::Uuid,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Recompute the hash chains (of one installation's streams, or of the whole log) and
    /// report any break. Exits with status 1 when a chain is broken.
    Verify {
        #[arg(long)]
        installation: Option<uuid::Uuid>,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AMPLOG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut app = config::App::open(cli.database_url.as_deref(), &cli.data_dir).await?;
    let result = run(&mut app, cli.command).await;
    app.close().await;
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => Err(e),
    }
}

async fn run(app: &mut config::App, command: Cmd) -> Result<i32> {
    match command {
        Cmd::Migrate => {
            println!("migrations applied; schema is current");
            Ok(0)
        }
        Cmd::Demo => {
            let service = app.service()?;
            demo::run(&service).await?;
            Ok(0)
        }
        Cmd::History { installation, json } => {
            let mut conn = app.pool.acquire().await?;
            let events = amplog_commands::audit::installation_history(&mut conn, &installation.to_string()).await?;
            if events.is_empty() {
                anyhow::bail!("installation {installation} has no events");
            }
            output::history(&events, json);
            Ok(0)
        }
        Cmd::Verify { installation } => {
            let mut conn = app.pool.acquire().await?;
            let streams = match installation {
                Some(id) => Some(amplog_commands::audit::installation_streams(&mut conn, &id.to_string()).await?),
                None => None,
            };
            let report = amplog_commands::audit::verify(&mut conn, streams.as_deref(), |n| {
                tracing::info!(events = n, "verifying")
            })
            .await
            .context("verifying hash chains")?;
            output::verify(&report);
            Ok(if report.is_intact() { 0 } else { 1 })
        }
    }
}
