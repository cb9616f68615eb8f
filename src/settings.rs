//! Every setting of the binary in one place: the server's (defaults, then the config file,
//! then variables and flags; unknown file keys refused; every problem reported at once),
//! Kafka's, the workers', the simulator's, and what `serve` runs in its process.

use amplog_api::ServerConfig;
use amplog_simulator::{Faults, SimConfig};
use amplog_streams::KafkaConfig;
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Whether a part (projectors, workers) runs inside `serve`: `auto` means on the embedded
/// PostgreSQL only.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum InProcessMode {
    Auto,
    On,
    Off,
}

impl InProcessMode {
    pub fn enabled(self, embedded: bool) -> bool {
        matches!((self, embedded), (InProcessMode::On, _) | (InProcessMode::Auto, true))
    }
}

/// What `serve` runs beside the API.
#[derive(Clone, Copy, Debug)]
pub struct InProcess {
    pub projectors: InProcessMode,
    pub workers: InProcessMode,
    pub demo: bool,
}

/// `serve --config FILE`: every key optional, unknown keys refused (with their place).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    dev: Option<bool>,
    body_limit_bytes: Option<usize>,
    request_timeout_ms: Option<u64>,
    statement_timeout_ms: Option<u64>,
    max_depth: Option<usize>,
    max_complexity: Option<usize>,
    max_aliases: Option<usize>,
    metrics_token: Option<String>,
    metrics_per_project: Option<bool>,
    public_url: Option<String>,
    compiled_reads: Option<bool>,
}

/// The server's settings: defaults, then the config file, then variables and flags. Every
/// problem found is reported at once.
pub fn server_config(file: Option<&Path>, listen: Option<SocketAddr>, dev: bool) -> Result<ServerConfig> {
    let from_file: FileConfig = match file {
        None => FileConfig::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("{} is not a valid amplog config", path.display()))?
        }
    };
    let mut problems = Vec::new();
    let mut config = ServerConfig::default();
    config.listen = listen.or(from_file.listen).unwrap_or(config.listen);
    config.dev = dev || from_file.dev.unwrap_or(false);
    config.body_limit = from_file.body_limit_bytes.unwrap_or(config.body_limit);
    config.request_timeout = from_file.request_timeout_ms.map(Duration::from_millis).unwrap_or(config.request_timeout);
    config.statement_timeout_ms = from_file.statement_timeout_ms.unwrap_or(config.statement_timeout_ms);
    config.limits.depth = from_file.max_depth.unwrap_or(config.limits.depth);
    config.limits.complexity = from_file.max_complexity.unwrap_or(config.limits.complexity);
    config.limits.aliases = from_file.max_aliases.unwrap_or(config.limits.aliases);
    config.compiled_reads = from_file.compiled_reads.unwrap_or(config.compiled_reads);
    for (name, value) in [
        ("body_limit_bytes", config.body_limit as u64),
        ("request_timeout_ms", config.request_timeout.as_millis() as u64),
        ("statement_timeout_ms", config.statement_timeout_ms),
        ("max_depth", config.limits.depth as u64),
        ("max_complexity", config.limits.complexity as u64),
        ("max_aliases", config.limits.aliases as u64),
    ] {
        if value == 0 {
            problems.push(format!("{name} must be above 0"));
        }
    }
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    config.metrics_token = var("AMPLOG_METRICS_TOKEN").or(from_file.metrics_token);
    let per_project = match var("AMPLOG_METRICS_PER_PROJECT").as_deref() {
        None => from_file.metrics_per_project,
        Some("1" | "true" | "yes") => Some(true),
        Some("0" | "false" | "no") => Some(false),
        Some(other) => {
            problems.push(format!("AMPLOG_METRICS_PER_PROJECT is `{other}`: true or false"));
            None
        }
    };
    config.metrics_per_project = per_project.unwrap_or(false);
    config.public_url = var("AMPLOG_PUBLIC_URL").or(from_file.public_url);
    if let Some(url) = &config.public_url {
        let absolute = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
        if absolute.is_none_or(|rest| rest.is_empty() || rest.contains(['?', '#'])) {
            problems.push(format!("public_url `{url}` must be an http(s) URL without query or fragment"));
        }
    }
    if config.metrics_per_project && config.metrics_token.is_none() {
        problems.push(
            "per-project metrics name every tenant: they need a metrics token (AMPLOG_METRICS_TOKEN or metrics_token)"
                .into(),
        );
    }
    if !problems.is_empty() {
        bail!("the server's settings: {}", problems.join("; "));
    }
    Ok(config)
}

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

#[derive(clap::Args, Clone, Debug)]
pub struct SimArgs {
    #[arg(long, env = "AMPLOG_SIM_LISTEN", default_value = "127.0.0.1:8091")]
    pub listen: SocketAddr,
    /// Records per object (contacts, companies, deals).
    #[arg(long, default_value_t = 2_000)]
    pub records: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Access-token lifetime.
    #[arg(long, default_value_t = 1800)]
    pub token_ttl_secs: u64,
    /// Fraction of data requests answered 429 (with Retry-After).
    #[arg(long, default_value_t = 0.0)]
    pub rate_limited: f64,
    #[arg(long, default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Fraction answered 503.
    #[arg(long, default_value_t = 0.0)]
    pub server_error: f64,
    /// Fraction answered after `slow_ms`.
    #[arg(long, default_value_t = 0.0)]
    pub slow: f64,
    #[arg(long, default_value_t = 200)]
    pub slow_ms: u64,
}

impl SimArgs {
    pub fn config(&self) -> SimConfig {
        SimConfig {
            records: self.records,
            seed: self.seed,
            token_ttl: Duration::from_secs(self.token_ttl_secs),
            faults: Faults {
                rate_limited: self.rate_limited,
                retry_after_secs: self.retry_after_secs,
                server_error: self.server_error,
                slow: self.slow,
                slow_ms: self.slow_ms,
            },
            ..SimConfig::default()
        }
    }
}

/// `amplog provider-sim`: serves the simulator until Ctrl-C or SIGTERM.
/// How many jobs run at once, and how long their leases hold.
#[derive(Clone, Copy, Debug)]
pub struct WorkerOptions {
    pub concurrency: usize,
    pub lease: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self { concurrency: 4, lease: Duration::from_secs(60) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("amplog.toml");
        std::fs::write(&path, "listen = \"0.0.0.0:9000\"\nmax_aliases = 5\nrequest_timeout_ms = 2500\n").unwrap();
        let config = server_config(Some(&path), None, false).unwrap();
        assert_eq!(config.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.limits.aliases, 5);
        assert_eq!(config.request_timeout, Duration::from_millis(2500));
        assert_eq!(config.limits.depth, ServerConfig::default().limits.depth);
        let config = server_config(Some(&path), Some("127.0.0.1:1".parse().unwrap()), true).unwrap();
        assert_eq!(config.listen, "127.0.0.1:1".parse().unwrap());
        assert!(config.dev);
        std::fs::write(&path, "listen = \"0.0.0.0:9000\"\nmax_alias = 5\n").unwrap();
        let error = format!("{:#}", server_config(Some(&path), None, false).unwrap_err());
        assert!(error.contains("max_alias"), "{error}");
        std::fs::write(&path, "max_depth = 0\nmax_aliases = 0\n").unwrap();
        let error = format!("{:#}", server_config(Some(&path), None, false).unwrap_err());
        assert!(error.contains("max_depth") && error.contains("max_aliases"), "every problem at once: {error}");
    }
}
