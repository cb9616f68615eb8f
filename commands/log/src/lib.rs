//! The log: the append-only, hash-chained `events` table and everything that reads or
//! guards it — the event store (load: snapshot + tail, upcast; append: one statement per
//! command), the hash chain, the log reader (commit-safe order, subscriptions, the binary
//! `COPY` decoder, checkpoints), leader election for every singleton, and the auditors'
//! history and chain verification. The write side (`amplog-commands`) is its only writer.

pub mod audit;
pub mod hash;
pub mod leader;
pub mod reader;
pub mod store;
pub mod telemetry;
pub mod tx;

pub use reader::{CatchUp, LogCursor, LogReader, RecordedEvent, StoredEvent, Subscription};
pub use store::{AppendedEvent, CommandOutcome, EventStore, Loaded};

/// The channel a commit NOTIFYs so log readers wake up.
pub const EVENTS_CHANNEL: &str = "amplog_events";

/// The one error of the log boundary.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A command decided on a loaded stream was refused by the domain.
    #[error(transparent)]
    Domain(#[from] amplog_domain::DomainError),
    /// Another writer appended to the stream since it was loaded; reload and retry.
    #[error("concurrent write to {stream}: reload and retry")]
    Conflict { stream: String },
    /// A stored event or snapshot could not be read back.
    #[error("stored {what} could not be decoded: {detail}")]
    Corrupt { what: String, detail: String },
    /// Text PostgreSQL cannot hold in `jsonb` (U+0000), which the read models would refuse.
    #[error("invalid text: {0} holds U+0000 (NUL), which cannot be stored")]
    UnstorableText(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl LogError {
    /// The same stable codes as `CommandError::code` for the same causes.
    pub fn code(&self) -> String {
        match self {
            LogError::Domain(e) => e.code(),
            LogError::Conflict { .. } => "conflict".into(),
            LogError::Corrupt { .. } => "corrupt_log".into(),
            LogError::UnstorableText(_) => "invalid_text".into(),
            LogError::Database(_) => "database".into(),
        }
    }

    pub fn corrupt(what: impl Into<String>, detail: impl ToString) -> Self {
        LogError::Corrupt { what: what.into(), detail: detail.to_string() }
    }
}
