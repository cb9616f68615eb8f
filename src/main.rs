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

use anyhow::Result;
use clap::Parser;

pub use audit::hostname;

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AMPLOG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::Cli::parse();
    if let Some(result) = cli::run_offline(&cli).await {
        std::process::exit(result?);
    }
    let mut app = config::App::open(cli.database_url.as_deref(), &cli.data_dir).await?;
    let result = cli::run(&mut app, cli.command, &cli.kafka).await;
    app.close().await;
    std::process::exit(result?)
}
