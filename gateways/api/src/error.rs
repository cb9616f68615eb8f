//! The one error of the API boundary, and its one mapping to an HTTP status and a GraphQL
//! `extensions.code` (plus `extensions.status`, the same status for GraphQL clients).

use amplog_commands::CommandError;
use amplog_domain::DomainError;
use amplog_projections::ProjectionError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Duration;

/// Cheap to clone (resolvers and DataLoaders share errors), so causes are behind `Arc`s.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ApiError {
    #[error("a valid API key (header X-Api-Key) or end-user token (Authorization: Bearer) is required")]
    Unauthenticated,
    #[error("this API key's scope ({have}) does not allow this; it needs {need}")]
    Forbidden { need: &'static str, have: &'static str },
    /// An end user's token: its own group's objects only, and nothing project-wide.
    #[error("an end-user token acts on its own group (`group_ref`) only; this needs an API key")]
    EndUser,
    /// Unknown, or another project's: the two answer alike.
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the request did not finish within {0:?}")]
    Timeout(Duration),
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    #[error("{0}")]
    TooManyRequests(String),
    /// A proxy call's connection needs the customer to connect again.
    #[error("the connection needs re-authentication: {0}")]
    NeedsReauth(String),
    /// The provider behind a proxy call could not be reached, or broke off.
    #[error("the provider could not be reached: {0}")]
    ProviderUnreachable(String),
    #[error("the provider did not answer in time: {0}")]
    ProviderTimeout(String),
    /// A provider's webhook that is not authentic or not fresh: nothing of it is stored.
    #[error("webhook refused: {1}")]
    WebhookRefused(&'static str, String),
    #[error(transparent)]
    Command(Arc<CommandError>),
    #[error(transparent)]
    Projection(Arc<ProjectionError>),
    #[error("database: {0}")]
    Database(Arc<sqlx::Error>),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        ApiError::Command(Arc::new(e))
    }
}

impl From<ProjectionError> for ApiError {
    fn from(e: ProjectionError) -> Self {
        match e {
            // A read-model query's database error is the API's own (503 when the database
            // is unreachable, a timeout, ...).
            ProjectionError::Database(e) => ApiError::Database(Arc::new(e)),
            e => ApiError::Projection(Arc::new(e)),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Database(Arc::new(e))
    }
}

impl From<serde_json::Error> for ApiError {
    fn from(e: serde_json::Error) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest { code, message: message.into() }
    }

    /// A stable machine-readable code: `unauthenticated`, `not_found`,
    /// `installation.paused`, `conflict`, ...
    pub fn code(&self) -> String {
        match self {
            ApiError::Unauthenticated => "unauthenticated".into(),
            ApiError::Forbidden { .. } | ApiError::EndUser => "forbidden".into(),
            ApiError::NotFound(_) => "not_found".into(),
            ApiError::BadRequest { code, .. } => (*code).into(),
            ApiError::TooLarge(_) => "payload_too_large".into(),
            ApiError::Timeout(_) => "timeout".into(),
            ApiError::MethodNotAllowed(_) => "method_not_allowed".into(),
            ApiError::TooManyRequests(_) => "too_many_requests".into(),
            ApiError::NeedsReauth(_) => "connection.needs_reauth".into(),
            ApiError::ProviderUnreachable(_) => "provider_unreachable".into(),
            ApiError::ProviderTimeout(_) => "provider_timeout".into(),
            ApiError::WebhookRefused(code, _) => (*code).into(),
            _ if self.database_unavailable() => "database_unavailable".into(),
            ApiError::Command(e) if is_not_found(e) => "not_found".into(),
            ApiError::Command(e) => e.code(),
            ApiError::Projection(e) => match &**e {
                ProjectionError::Log(e) => e.code(),
                _ => "internal".into(),
            },
            ApiError::Database(_) | ApiError::Internal(_) => "internal".into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } | ApiError::EndUser => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NeedsReauth(_) => StatusCode::CONFLICT,
            ApiError::ProviderUnreachable(_) => StatusCode::BAD_GATEWAY,
            ApiError::ProviderTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::WebhookRefused(..) => StatusCode::UNAUTHORIZED,
            _ if self.database_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Command(e) if is_not_found(e) => StatusCode::NOT_FOUND,
            ApiError::Command(e) => match &**e {
                CommandError::Conflict { .. } => StatusCode::CONFLICT,
                CommandError::Invalid(_) | CommandError::UnstorableText(_) => StatusCode::BAD_REQUEST,
                e if e.is_client_error() => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Projection(_) | ApiError::Database(_) | ApiError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// What the client is told. Server-side failures say nothing of their cause (it is
    /// logged where it happens); client errors say exactly what was wrong.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Command(e) if is_not_found(e) => format!("{} not found", not_found_what(e)),
            _ if self.database_unavailable() => "the database is unavailable; retry shortly".into(),
            _ if self.status().is_server_error()
                && !matches!(
                    self,
                    ApiError::Timeout(_) | ApiError::ProviderUnreachable(_) | ApiError::ProviderTimeout(_)
                ) =>
            {
                "internal error; the server log has the details".into()
            }
            _ => self.to_string(),
        }
    }

    /// Whether PostgreSQL could not be reached or went away mid-request (a restart, a
    /// failover, an exhausted pool): worth a retry, unlike a fault of the server.
    pub fn database_unavailable(&self) -> bool {
        let sql = match self {
            ApiError::Database(e) => &**e,
            ApiError::Command(e) => match &**e {
                CommandError::Database(e) => e,
                _ => return false,
            },
            ApiError::Projection(e) => match &**e {
                ProjectionError::Database(e) | ProjectionError::Log(amplog_log::LogError::Database(e)) => e,
                _ => return false,
            },
            _ => return false,
        };
        connection_lost(sql)
    }

    /// Logs a server-side failure with its cause (the client only learns its code).
    pub fn log(&self) {
        if self.status().is_server_error() {
            tracing::error!(error = %self, code = %self.code(), "request failed");
        }
    }

    /// The body of an HTTP error, shaped like a GraphQL error response.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"errors": [{
            "message": self.public_message(),
            "extensions": {"code": self.code(), "status": self.status().as_u16()},
        }]})
    }
}

/// An error of the connection rather than of the statement: SQLSTATE classes 08
/// (connection exception) and 57P (operator intervention: shutdown, crash, starting up).
pub fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::WorkerCrashed | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

/// A command that named an aggregate that does not exist (or is another project's).
fn is_not_found(e: &CommandError) -> bool {
    matches!(e, CommandError::Domain(d) if d.code().ends_with("not_found"))
}

fn not_found_what(e: &CommandError) -> &'static str {
    use amplog_domain::{connection::ConnectionError as C, installation::InstallationError as I};
    match e {
        CommandError::Domain(DomainError::Project(amplog_domain::project::ProjectError::SubscriptionNotFound)) => {
            "notification subscription"
        }
        CommandError::Domain(DomainError::Project(_)) => "project",
        CommandError::Domain(DomainError::Integration(_) | DomainError::Installation(I::IntegrationNotFound)) => {
            "integration"
        }
        CommandError::Domain(
            DomainError::Connection(C::NotFound) | DomainError::Installation(I::ConnectionNotFound),
        ) => "connection",
        CommandError::Domain(DomainError::Operation(_)) => "operation",
        CommandError::Domain(DomainError::ProviderApp(_)) => "provider app",
        CommandError::Domain(DomainError::ConnectSession(_)) => "connect session",
        _ => "installation",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        (self.status(), axum::Json(self.body())).into_response()
    }
}

impl From<ApiError> for async_graphql::Error {
    fn from(e: ApiError) -> Self {
        e.log();
        let mut error = async_graphql::Error::new(e.public_message());
        error.extensions = Some(Default::default());
        if let Some(ext) = error.extensions.as_mut() {
            ext.set("code", e.code());
            ext.set("status", e.status().as_u16());
        }
        error
    }
}

impl From<amplog_log::LogError> for ApiError {
    fn from(e: amplog_log::LogError) -> Self {
        CommandError::from(e).into()
    }
}
