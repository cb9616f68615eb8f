//! Connection: the credentials of one customer group for one provider.
//! `created → working ⇄ bad_credentials → revoked`. Events carry a credential reference and
//! a fingerprint, never the secret.

use crate::aggregate::{Aggregate, DomainEvent};
use crate::ids::{CredentialId, IntegrationId, ProjectId};
use crate::project::valid_name;
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionStatus {
    #[default]
    Created,
    Working,
    BadCredentials,
    Revoked,
}

impl ConnectionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Working => "working",
            Self::BadCredentials => "bad_credentials",
            Self::Revoked => "revoked",
        }
    }
}

/// Where the encrypted secret is, and a keyed fingerprint of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CredentialRef {
    pub id: CredentialId,
    pub fingerprint: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub enum ConnectionCommand {
    Create {
        project_id: ProjectId,
        integration_id: IntegrationId,
        provider: String,
        group_ref: String,
        credential: CredentialRef,
        at: DateTime<Utc>,
    },
    RefreshToken {
        credential: CredentialRef,
        expires_at: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    },
    RecordRefreshFailure {
        reason: String,
        at: DateTime<Utc>,
    },
    Reconnect {
        credential: CredentialRef,
        at: DateTime<Utc>,
    },
    Revoke {
        at: DateTime<Utc>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum ConnectionEvent {
    Created {
        project_id: ProjectId,
        integration_id: IntegrationId,
        provider: String,
        group_ref: String,
        credential: CredentialRef,
        at: DateTime<Utc>,
    },
    TokenRefreshed {
        credential: CredentialRef,
        expires_at: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    },
    RefreshFailed {
        reason: String,
        at: DateTime<Utc>,
    },
    Reconnected {
        credential: CredentialRef,
        at: DateTime<Utc>,
    },
    Revoked {
        at: DateTime<Utc>,
    },
}

impl DomainEvent for ConnectionEvent {
    fn event_version(&self) -> &'static str {
        "1.0"
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    #[error("the connection already exists")]
    AlreadyExists,
    #[error("no such connection")]
    NotFound,
    #[error("the connection is revoked")]
    Revoked,
    #[error("the connection has bad credentials and must be reconnected first")]
    NeedsReconnect,
    #[error("the connection already has bad credentials")]
    AlreadyBadCredentials,
    #[error("a group_ref must be 1 to 100 printable characters")]
    InvalidGroupRef,
    #[error("a provider name must be 1 to 100 printable characters")]
    InvalidProvider,
    #[error("a credential fingerprint must not be empty")]
    InvalidCredential,
}

impl ConnectionError {
    /// The variant's stable code (part of the public `extensions.code`: renaming a variant
    /// must not change it).
    pub fn code(&self) -> &'static str {
        match self {
            ConnectionError::AlreadyExists => "already_exists",
            ConnectionError::NotFound => "not_found",
            ConnectionError::Revoked => "revoked",
            ConnectionError::NeedsReconnect => "needs_reconnect",
            ConnectionError::AlreadyBadCredentials => "already_bad_credentials",
            ConnectionError::InvalidGroupRef => "invalid_group_ref",
            ConnectionError::InvalidProvider => "invalid_provider",
            ConnectionError::InvalidCredential => "invalid_credential",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Connection {
    pub exists: bool,
    pub project_id: ProjectId,
    pub integration_id: IntegrationId,
    pub provider: String,
    pub group_ref: String,
    pub status: ConnectionStatus,
    pub credential: Option<CredentialRef>,
    pub last_refresh_at: Option<DateTime<Utc>>,
    pub failure_reason: Option<String>,
}

fn check_credential(credential: &CredentialRef) -> Result<(), ConnectionError> {
    if credential.fingerprint.trim().is_empty() {
        return Err(ConnectionError::InvalidCredential);
    }
    Ok(())
}

impl Connection {
    fn live(&self) -> Result<ConnectionStatus, ConnectionError> {
        match (self.exists, self.status) {
            (false, _) => Err(ConnectionError::NotFound),
            (true, ConnectionStatus::Revoked) => Err(ConnectionError::Revoked),
            (true, status) => Ok(status),
        }
    }
}

impl Aggregate for Connection {
    const TYPE: &'static str = "connection";
    type Command = ConnectionCommand;
    type Event = ConnectionEvent;
    type Error = ConnectionError;

    fn decide(&self, command: &ConnectionCommand) -> Result<Vec<ConnectionEvent>, ConnectionError> {
        use ConnectionCommand as C;
        use ConnectionEvent as E;
        match command {
            C::Create { project_id, integration_id, provider, group_ref, credential, at } => {
                if self.exists {
                    return Err(ConnectionError::AlreadyExists);
                }
                if !valid_name(group_ref) {
                    return Err(ConnectionError::InvalidGroupRef);
                }
                if !valid_name(provider) {
                    return Err(ConnectionError::InvalidProvider);
                }
                check_credential(credential)?;
                Ok(vec![E::Created {
                    project_id: *project_id,
                    integration_id: *integration_id,
                    provider: provider.clone(),
                    group_ref: group_ref.clone(),
                    credential: credential.clone(),
                    at: *at,
                }])
            }
            C::RefreshToken { credential, expires_at, at } => {
                if self.live()? == ConnectionStatus::BadCredentials {
                    return Err(ConnectionError::NeedsReconnect);
                }
                check_credential(credential)?;
                Ok(vec![E::TokenRefreshed { credential: credential.clone(), expires_at: *expires_at, at: *at }])
            }
            C::RecordRefreshFailure { reason, at } => {
                if self.live()? == ConnectionStatus::BadCredentials {
                    return Err(ConnectionError::AlreadyBadCredentials);
                }
                Ok(vec![E::RefreshFailed { reason: reason.clone(), at: *at }])
            }
            C::Reconnect { credential, at } => {
                self.live()?;
                check_credential(credential)?;
                Ok(vec![E::Reconnected { credential: credential.clone(), at: *at }])
            }
            C::Revoke { at } => {
                self.live()?;
                Ok(vec![E::Revoked { at: *at }])
            }
        }
    }

    fn apply(&mut self, event: &ConnectionEvent) {
        match event {
            ConnectionEvent::Created { project_id, integration_id, provider, group_ref, credential, .. } => {
                *self = Connection {
                    exists: true,
                    project_id: *project_id,
                    integration_id: *integration_id,
                    provider: provider.clone(),
                    group_ref: group_ref.clone(),
                    status: ConnectionStatus::Created,
                    credential: Some(credential.clone()),
                    last_refresh_at: None,
                    failure_reason: None,
                }
            }
            ConnectionEvent::TokenRefreshed { credential, at, .. } => {
                self.status = ConnectionStatus::Working;
                self.credential = Some(credential.clone());
                self.last_refresh_at = Some(*at);
                self.failure_reason = None;
            }
            ConnectionEvent::RefreshFailed { reason, .. } => {
                self.status = ConnectionStatus::BadCredentials;
                self.failure_reason = Some(reason.clone());
            }
            ConnectionEvent::Reconnected { credential, at } => {
                self.status = ConnectionStatus::Working;
                self.credential = Some(credential.clone());
                self.last_refresh_at = Some(*at);
                self.failure_reason = None;
            }
            ConnectionEvent::Revoked { .. } => self.status = ConnectionStatus::Revoked,
        }
    }
}
