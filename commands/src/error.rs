//! The one error of the command boundary.

use amplog_domain::DomainError;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The command was refused by the domain (invalid transition, bad input, not found).
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Another writer appended to the stream since it was loaded; reload and retry.
    #[error("concurrent write to {stream}: reload and retry")]
    Conflict { stream: String },
    /// The idempotency key was already used for a different request.
    #[error("idempotency key `{0}` was already used for a different request")]
    IdempotencyKeyReused(String),
    /// A stored event or snapshot could not be read back.
    #[error("stored {what} could not be decoded: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("credential store: {0}")]
    Credentials(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    /// Text PostgreSQL cannot hold in `jsonb` (U+0000), which the read models would refuse.
    #[error("invalid text: {0} holds U+0000 (NUL), which cannot be stored")]
    UnstorableText(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Migration(#[from] amplog_migrations::MigrationError),
}

impl CommandError {
    /// A stable, machine-readable code, shared by the CLI, HTTP and GraphQL mappings.
    pub fn code(&self) -> String {
        match self {
            CommandError::Domain(e) => e.code(),
            CommandError::Conflict { .. } => "conflict".into(),
            CommandError::IdempotencyKeyReused(_) => "idempotency_key_reused".into(),
            CommandError::Corrupt { .. } => "corrupt_log".into(),
            CommandError::Credentials(_) => "credentials".into(),
            CommandError::Invalid(_) => "invalid_input".into(),
            CommandError::UnstorableText(_) => "invalid_text".into(),
            CommandError::Database(_) | CommandError::Migration(_) => "database".into(),
        }
    }

    /// Whether the caller's input is at fault (a 4xx), as opposed to the server (a 5xx).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            CommandError::Domain(_)
                | CommandError::Conflict { .. }
                | CommandError::IdempotencyKeyReused(_)
                | CommandError::Invalid(_)
                | CommandError::UnstorableText(_)
        )
    }

    pub fn corrupt(what: impl Into<String>, detail: impl ToString) -> Self {
        CommandError::Corrupt { what: what.into(), detail: detail.to_string() }
    }
}

impl From<amplog_log::LogError> for CommandError {
    fn from(e: amplog_log::LogError) -> Self {
        use amplog_log::LogError as L;
        match e {
            L::Domain(e) => CommandError::Domain(e),
            L::Conflict { stream } => CommandError::Conflict { stream },
            L::Corrupt { what, detail } => CommandError::Corrupt { what, detail },
            L::UnstorableText(what) => CommandError::UnstorableText(what),
            L::Database(e) => CommandError::Database(e),
        }
    }
}
