//! The Kafka commands: `relay`, `tail`, `schemas`, and the Kafka settings they share.

use crate::config::App;
use amplog_commands::EventStore;
use amplog_streams::tail::TailOptions;
use amplog_streams::{KafkaConfig, Relay};
use anyhow::{Context, Result};
use std::path::Path;

/// Where Kafka is and how amplog's topics look. Without brokers there is no Kafka: jobs
/// dispatch in-process from the log.
#[derive(clap::Args, Clone, Debug)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (host:port,...).
    #[arg(long = "kafka-brokers", env = "AMPLOG_KAFKA_BROKERS", global = true)]
    pub brokers: Option<String>,
    /// Prefix of every topic name.
    #[arg(long = "kafka-topic-prefix", env = "AMPLOG_KAFKA_TOPIC_PREFIX", default_value = "amplog.", global = true)]
    pub topic_prefix: String,
    /// Partitions of the topics amplog creates.
    #[arg(long = "kafka-partitions", env = "AMPLOG_KAFKA_PARTITIONS", default_value_t = 6, global = true)]
    pub partitions: i32,
    /// Replication factor of the topics amplog creates.
    #[arg(long = "kafka-replication", env = "AMPLOG_KAFKA_REPLICATION", default_value_t = 1, global = true)]
    pub replication: i32,
    /// Extra librdkafka properties as key=value (repeatable; comma-separated in the
    /// variable). Settings that could reorder or drop messages are refused.
    #[arg(long = "kafka-property", env = "AMPLOG_KAFKA_PROPERTIES", value_delimiter = ',', global = true)]
    pub properties: Vec<String>,
}

impl KafkaArgs {
    /// The Kafka configuration, or an error naming the missing setting.
    pub fn config(&self) -> Result<KafkaConfig> {
        let brokers =
            self.brokers.clone().context("no Kafka configured: set AMPLOG_KAFKA_BROKERS (or --kafka-brokers)")?;
        let mut config = KafkaConfig::new(brokers);
        config.topic_prefix = self.topic_prefix.clone();
        anyhow::ensure!(self.partitions >= 1, "--kafka-partitions must be at least 1");
        anyhow::ensure!(self.replication >= 1, "--kafka-replication must be at least 1");
        config.partitions = self.partitions;
        config.replication = self.replication;
        Ok(config.with_properties(&self.properties)?)
    }
}

/// `amplog relay`: relays the log to Kafka until Ctrl-C or SIGTERM.
pub async fn relay(app: &App, kafka: &KafkaArgs) -> Result<i32> {
    let holder = format!("relay:{}:{}", crate::hostname(), std::process::id());
    let relay = Relay::new(app.pool.clone(), EventStore::default(), kafka.config()?, holder)?;
    relay.run(crate::serve::shutdown_signal()).await?;
    tracing::info!("relay stopped");
    Ok(0)
}

/// `amplog tail`: prints a topic's messages, one JSON object per line.
pub async fn tail(kafka: &KafkaArgs, options: TailOptions) -> Result<i32> {
    let config = kafka.config()?;
    amplog_streams::tail::tail(&config, &options, std::io::stdout().lock(), crate::serve::shutdown_signal()).await?;
    Ok(0)
}

/// `amplog schemas`: writes the JSON Schemas of every published event.
pub fn schemas(out: &Path) -> Result<i32> {
    let written = amplog_streams::schema::write_schemas(out).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {written} schemas to {}", out.display());
    Ok(0)
}
