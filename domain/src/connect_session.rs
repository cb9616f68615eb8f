//! ConnectSession: one end user's way through the connect page, from the link a builder's
//! backend asked for to a connected account and an installation.
//! `open → authorizing (→ open again when the provider refuses) → connected → completed`;
//! every step before its expiry, each bound to the OAuth `state` of the current attempt.
//! The events hold digests of the link token and the state, never the values.

use crate::aggregate::{Aggregate, DomainEvent};
use crate::ids::{ConnectionId, InstallationId, IntegrationId, ProjectId};
use crate::project::valid_name;
use chrono::{DateTime, Duration, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The longest a connect link may live.
pub const MAX_LIFETIME_MINUTES: i64 = 24 * 60;
/// How long after its expiry a connected session may still be completed (the user was
/// choosing objects when the link ran out).
pub const COMPLETION_GRACE_MINUTES: i64 = 60;
/// The most attempts (presses of "Connect") one session takes.
pub const MAX_ATTEMPTS: u32 = 20;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    #[default]
    Open,
    Authorizing,
    Connected,
    Completed,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Authorizing => "authorizing",
            Self::Connected => "connected",
            Self::Completed => "completed",
        }
    }
}

/// What a builder asks a session for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SessionRequest {
    pub integration_id: IntegrationId,
    pub provider: String,
    pub group_ref: String,
    pub consumer_ref: String,
    /// Where the user goes back to at the end (already checked against the provider app's
    /// return URLs); none: the page tells its opener and stays.
    pub return_url: Option<String>,
    /// A connection to reconnect instead of creating one.
    pub reconnect: Option<ConnectionId>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub enum ConnectSessionCommand {
    Create {
        project_id: ProjectId,
        request: SessionRequest,
        token_digest: String,
        expires_at: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    /// The user pressed "Connect": a new attempt with a new state.
    StartAuthorization { state_digest: String, at: DateTime<Utc> },
    /// The provider sent the user back without a grant, or the code did not exchange.
    RecordFailure { state_digest: String, reason: String, at: DateTime<Utc> },
    /// The code was exchanged and the connection recorded.
    Connect { state_digest: String, connection_id: ConnectionId, at: DateTime<Utc> },
    /// The installation is made (none when reconnecting).
    Complete { state_digest: String, installation_id: Option<InstallationId>, at: DateTime<Utc> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum ConnectSessionEvent {
    Created {
        project_id: ProjectId,
        request: SessionRequest,
        token_digest: String,
        expires_at: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    AuthorizationStarted {
        state_digest: String,
        at: DateTime<Utc>,
    },
    AuthorizationFailed {
        reason: String,
        at: DateTime<Utc>,
    },
    Connected {
        connection_id: ConnectionId,
        at: DateTime<Utc>,
    },
    Completed {
        installation_id: Option<InstallationId>,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for ConnectSessionEvent {
    fn event_version(&self) -> &'static str {
        "1.0"
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectSessionError {
    #[error("the session already exists")]
    AlreadyExists,
    #[error("no such connect session")]
    NotFound,
    #[error("the connect link has expired")]
    Expired,
    #[error("the connect session is already completed")]
    AlreadyCompleted,
    #[error("the account is already connected in this session")]
    AlreadyConnected,
    #[error("the authorization was not started in this browser, or a newer one replaced it")]
    StateMismatch,
    #[error("this authorization was already used")]
    StateUsed,
    #[error("no authorization is in progress")]
    NotAuthorizing,
    #[error("no account is connected in this session yet")]
    NotConnected,
    #[error("group_ref, consumer_ref and provider must be 1 to 100 printable characters")]
    InvalidRef,
    #[error("a connect link lives 1 minute to 24 hours")]
    InvalidExpiry,
    #[error("a digest must not be empty")]
    InvalidDigest,
    #[error("a failure reason must be 1 to 100 printable characters")]
    InvalidReason,
    #[error("this connect link was tried too many times; ask for a new one")]
    TooManyAttempts,
}

impl ConnectSessionError {
    /// The variant's stable code (part of the public `extensions.code`).
    pub fn code(&self) -> &'static str {
        match self {
            ConnectSessionError::AlreadyExists => "already_exists",
            ConnectSessionError::NotFound => "not_found",
            ConnectSessionError::Expired => "expired",
            ConnectSessionError::AlreadyCompleted => "already_completed",
            ConnectSessionError::AlreadyConnected => "already_connected",
            ConnectSessionError::StateMismatch => "state_mismatch",
            ConnectSessionError::StateUsed => "state_used",
            ConnectSessionError::NotAuthorizing => "not_authorizing",
            ConnectSessionError::NotConnected => "not_connected",
            ConnectSessionError::InvalidRef => "invalid_ref",
            ConnectSessionError::InvalidExpiry => "invalid_expiry",
            ConnectSessionError::InvalidDigest => "invalid_digest",
            ConnectSessionError::InvalidReason => "invalid_reason",
            ConnectSessionError::TooManyAttempts => "too_many_attempts",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConnectSession {
    pub exists: bool,
    pub project_id: ProjectId,
    pub request: Option<SessionRequest>,
    pub token_digest: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub status: SessionStatus,
    /// The current attempt's state digest (kept once used: a replay is recognised).
    pub state_digest: Option<String>,
    pub connection_id: Option<ConnectionId>,
    pub installation_id: Option<InstallationId>,
    pub failures: u32,
    pub last_failure: Option<String>,
    /// Attempts started (presses of "Connect").
    #[serde(default)]
    pub attempts: u32,
}

impl ConnectSession {
    /// The session as the step at `at` may see it: existing, not expired (a connected one
    /// has a grace period to complete), not completed.
    fn live(&self, at: DateTime<Utc>) -> Result<SessionStatus, ConnectSessionError> {
        if !self.exists {
            return Err(ConnectSessionError::NotFound);
        }
        if self.status == SessionStatus::Completed {
            return Err(ConnectSessionError::AlreadyCompleted);
        }
        let grace = match self.status {
            SessionStatus::Connected => Duration::minutes(COMPLETION_GRACE_MINUTES),
            _ => Duration::zero(),
        };
        if self.expires_at.is_none_or(|end| at >= end + grace) {
            return Err(ConnectSessionError::Expired);
        }
        Ok(self.status)
    }

    /// The presented state is the current attempt's.
    fn attempt(&self, state_digest: &str) -> Result<(), ConnectSessionError> {
        match &self.state_digest {
            Some(current) if current == state_digest => Ok(()),
            _ => Err(ConnectSessionError::StateMismatch),
        }
    }
}

fn digest(value: &str) -> Result<(), ConnectSessionError> {
    match value.trim().is_empty() || value.len() > 200 {
        true => Err(ConnectSessionError::InvalidDigest),
        false => Ok(()),
    }
}

impl Aggregate for ConnectSession {
    const TYPE: &'static str = "connect_session";
    type Command = ConnectSessionCommand;
    type Event = ConnectSessionEvent;
    type Error = ConnectSessionError;

    fn decide(&self, command: &ConnectSessionCommand) -> Result<Vec<ConnectSessionEvent>, ConnectSessionError> {
        use ConnectSessionCommand as C;
        use ConnectSessionError as Error;
        use ConnectSessionEvent as E;
        use SessionStatus as S;
        match command {
            C::Create { project_id, request, token_digest, expires_at, at } => {
                if self.exists {
                    return Err(Error::AlreadyExists);
                }
                if ![&request.group_ref, &request.consumer_ref, &request.provider].into_iter().all(|r| valid_name(r)) {
                    return Err(Error::InvalidRef);
                }
                let lifetime = *expires_at - *at;
                if lifetime < Duration::minutes(1) || lifetime > Duration::minutes(MAX_LIFETIME_MINUTES) {
                    return Err(Error::InvalidExpiry);
                }
                digest(token_digest)?;
                Ok(vec![E::Created {
                    project_id: *project_id,
                    request: request.clone(),
                    token_digest: token_digest.clone(),
                    expires_at: *expires_at,
                    at: *at,
                }])
            }
            C::StartAuthorization { state_digest, at } => {
                if matches!(self.live(*at)?, S::Connected) {
                    return Err(Error::AlreadyConnected);
                }
                if self.attempts >= MAX_ATTEMPTS {
                    return Err(Error::TooManyAttempts);
                }
                digest(state_digest)?;
                Ok(vec![E::AuthorizationStarted { state_digest: state_digest.clone(), at: *at }])
            }
            C::RecordFailure { state_digest, reason, at } => {
                match self.live(*at)? {
                    S::Authorizing => self.attempt(state_digest)?,
                    S::Connected => return Err(Error::StateUsed),
                    _ => return Err(Error::NotAuthorizing),
                }
                if !valid_name(reason) {
                    return Err(Error::InvalidReason);
                }
                Ok(vec![E::AuthorizationFailed { reason: reason.clone(), at: *at }])
            }
            C::Connect { state_digest, connection_id, at } => {
                match self.live(*at)? {
                    S::Authorizing => self.attempt(state_digest)?,
                    S::Connected => return Err(Error::StateUsed),
                    _ => return Err(Error::NotAuthorizing),
                }
                Ok(vec![E::Connected { connection_id: *connection_id, at: *at }])
            }
            C::Complete { state_digest, installation_id, at } => {
                if self.live(*at)? != S::Connected {
                    return Err(Error::NotConnected);
                }
                self.attempt(state_digest)?;
                Ok(vec![E::Completed { installation_id: *installation_id, at: *at }])
            }
        }
    }

    fn apply(&mut self, event: &ConnectSessionEvent) {
        match event {
            ConnectSessionEvent::Created { project_id, request, token_digest, expires_at, .. } => {
                *self = ConnectSession {
                    exists: true,
                    project_id: *project_id,
                    request: Some(request.clone()),
                    token_digest: token_digest.clone(),
                    expires_at: Some(*expires_at),
                    ..ConnectSession::default()
                }
            }
            ConnectSessionEvent::AuthorizationStarted { state_digest, .. } => {
                self.status = SessionStatus::Authorizing;
                self.state_digest = Some(state_digest.clone());
                self.attempts += 1;
            }
            ConnectSessionEvent::AuthorizationFailed { reason, .. } => {
                self.status = SessionStatus::Open;
                self.state_digest = None;
                self.failures += 1;
                self.last_failure = Some(reason.clone());
            }
            ConnectSessionEvent::Connected { connection_id, .. } => {
                self.status = SessionStatus::Connected;
                self.connection_id = Some(*connection_id);
            }
            ConnectSessionEvent::Completed { installation_id, .. } => {
                self.status = SessionStatus::Completed;
                self.installation_id = *installation_id;
            }
        }
    }
}
