//! Sync with the providers, in one room: the job handler (`sync`: read pages from a
//! provider, deliver them to webhook destinations, write records back), the worker and the
//! in-process dispatch (`worker`), the read scheduler (`scheduler`), the connectors and
//! their catalog (`connector`), tokens and their refresh (`tokens`), signed webhook
//! delivery (`webhook`), lifecycle notifications to destinations (`notify`), where outbound
//! requests may go (`egress`) and the proxy's outbound half (`proxy`). Kafka, when it
//! carries the jobs, is `amplog_streams`'s.

pub mod connector;
pub mod egress;
pub mod notify;
pub mod proxy;
pub mod scheduler;
pub mod sync;
pub mod tokens;
pub mod webhook;
pub mod worker;

/// The one error of the providers boundary (what a worker, the dispatch and the scheduler
/// return; a job's own failures are `worker::JobFailure`s, recorded on its operation).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Log(#[from] amplog_commands::CommandError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Streams(#[from] amplog_streams::StreamsError),
    #[error(transparent)]
    ReadModel(#[from] amplog_projections::ProjectionError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{0} lost its leadership (fenced)")]
    Fenced(String),
    /// A job's task ended abnormally (a panic in its handler).
    #[error("a job's task ended abnormally: {0}")]
    JobTask(String),
}

impl SyncError {
    /// A stable, machine-readable code (CLI exit messages).
    pub fn code(&self) -> String {
        match self {
            SyncError::Log(e) => e.code(),
            SyncError::Database(_) => "database".into(),
            SyncError::Streams(e) => e.code(),
            SyncError::ReadModel(_) => "read_model".into(),
            SyncError::Config(_) => "invalid_config".into(),
            SyncError::Fenced(_) => "fenced".into(),
            SyncError::JobTask(_) => "job_task".into(),
        }
    }
}

impl From<amplog_log::LogError> for SyncError {
    fn from(e: amplog_log::LogError) -> Self {
        SyncError::Log(e.into())
    }
}
