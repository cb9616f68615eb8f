//! Projections: checkpointed projectors that fold the log into the read models
//! (integrations, installations, connections, operations, read_states, usage, the installation timeline
//! index), one leader per projector, exactly-once in effect, rebuildable into shadow tables.
//! They read the log only through `amplog_log::reader`.

pub mod docs;
pub mod fold;
pub mod metrics;
pub mod queries;
pub mod reads;
pub mod runtime;
pub mod usage;

pub use runtime::{fingerprint, rebuild, status, wait_for, ProjectorStatus, Runner, PROJECTED_CHANNEL, READ_MODELS};

/// The one error of the projections boundary.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Log(#[from] amplog_log::LogError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("projector {0} lost its leadership (fenced)")]
    Fenced(String),
    #[error("a read-model document could not be decoded: {0}")]
    Corrupt(String),
}
