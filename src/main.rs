//! `amplog`: wires the crates into one binary. Thin: parse the command line, connect
//! (embedded PostgreSQL or DATABASE_URL), run one command (`cli.rs`).

/// The allocator of the binary (see the workspace Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod audit;
mod cli;
mod config;
mod demo;
mod embedded;
mod output;
mod serve;
mod settings;
mod shutdown;
mod streams;
mod sync;
mod telemetry;

use anyhow::Result;
use clap::Parser;

pub use audit::hostname;

#[tokio::main]
async fn main() -> Result<()> {
    let telemetry = telemetry::init()?;
    let per_project = std::env::var("AMPLOG_METRICS_PER_PROJECT").is_ok_and(|v| v.trim() == "true");
    amplog_log::telemetry::metrics().set_per_project(per_project);
    let cli = cli::Cli::parse();
    let code = async {
        if let Some(result) = cli::run_offline(&cli).await {
            return result;
        }
        let mut app = config::App::open(cli.database_url.as_deref(), &cli.data_dir).await?;
        let _ops = match cli.ops_listen.filter(|_| cli.command.runs_until_stopped()) {
            Some(listen) => Some(amplog_api::ops::serve(listen, app.pool.clone()).await?),
            None => None,
        };
        let result = cli::run(&mut app, cli.command, &cli.kafka).await;
        app.close().await;
        result
    }
    .await;
    telemetry.shutdown().await;
    std::process::exit(code?)
}
