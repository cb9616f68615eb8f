//! The Kafka commands: `relay`, `tail`, `schemas`, and the Kafka settings they share.

use crate::config::App;
use crate::settings::KafkaArgs;
use amplog_log::EventStore;
use amplog_streams::tail::TailOptions;
use amplog_streams::Relay;
use anyhow::{Context, Result};
use std::path::Path;

/// `amplog relay`: relays the log to Kafka until Ctrl-C or SIGTERM.
pub async fn relay(app: &App, kafka: &KafkaArgs) -> Result<i32> {
    let holder = format!("relay:{}:{}", crate::hostname(), std::process::id());
    let relay = Relay::new(app.pool.clone(), EventStore::default(), kafka.config()?, holder)?;
    relay.run(crate::shutdown::signal()).await?;
    tracing::info!("relay stopped");
    Ok(0)
}

/// `amplog tail`: prints a topic's messages, one JSON object per line.
pub async fn tail(kafka: &KafkaArgs, options: TailOptions) -> Result<i32> {
    let config = kafka.config()?;
    amplog_streams::tail::tail(&config, &options, std::io::stdout().lock(), crate::shutdown::signal()).await?;
    Ok(0)
}

/// `amplog schemas`: writes the JSON Schemas of every published event.
pub fn schemas(out: &Path) -> Result<i32> {
    let written = amplog_streams::schema::write_schemas(out).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {written} schemas to {}", out.display());
    Ok(0)
}
