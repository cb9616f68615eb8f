//! Kafka for amplog, and the only crate that knows it: the relay that publishes the log (the
//! outbox) to CloudEvents topics and sync jobs to the jobs topic, the consumer-group
//! transport of jobs (`jobs::run_kafka_worker`, over the providers' worker), `tail`, and
//! the event JSON Schemas.

pub mod config;
pub mod envelope;
pub mod jobs;
pub mod notifications;
pub mod relay;
pub mod schema;
pub mod tail;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topics;

pub use config::KafkaConfig;
pub use envelope::CloudEvent;
pub use relay::{CaughtUp, Relay, RELAY};

use rdkafka::error::KafkaError;

/// The one error of the streams boundary.
#[derive(Debug, thiserror::Error)]
pub enum StreamsError {
    #[error(transparent)]
    Log(#[from] amplog_log::LogError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A producer or consumer setting that could reorder or drop messages.
    #[error("refusing Kafka setting {key}={value}: {why}")]
    UnsafeSetting { key: String, value: String, why: &'static str },
    #[error("invalid Kafka configuration: {0}")]
    Config(String),
    /// A message that is not a well-formed amplog envelope.
    #[error("malformed envelope: {0}")]
    Envelope(String),
    #[error("{0} lost its leadership (fenced)")]
    Fenced(String),
    /// A stage of the relay ended abnormally (a panic, or the stage it feeds stopped).
    #[error("the relay's {0}")]
    RelayStage(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl StreamsError {
    /// A stable, machine-readable code (CLI exit messages, dead-letter records).
    pub fn code(&self) -> String {
        match self {
            StreamsError::Log(e) => e.code(),
            StreamsError::Database(_) => "database".into(),
            StreamsError::Kafka(_) => "kafka".into(),
            StreamsError::UnsafeSetting { .. } => "unsafe_kafka_setting".into(),
            StreamsError::Config(_) => "invalid_config".into(),
            StreamsError::Envelope(_) => "malformed_envelope".into(),
            StreamsError::Fenced(_) => "fenced".into(),
            StreamsError::RelayStage(_) => "relay_stage".into(),
            StreamsError::Io(_) => "io".into(),
        }
    }
}
