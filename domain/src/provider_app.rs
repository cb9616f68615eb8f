//! ProviderApp: a project's OAuth client at one provider (client id, the secret's reference
//! and fingerprint, the scopes it asks for, the return URLs connect sessions may go back
//! to). One per project and provider: its id is derived from both ([`ProviderApp::id_for`]).
//! `none → live ⇄ (updated) → deleted → live again`.

use crate::aggregate::{Aggregate, DomainEvent};
use crate::connection::CredentialRef;
use crate::ids::ProjectId;
use crate::project::valid_name;
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Most scopes and return URLs one app may list.
pub const MAX_LIST: usize = 50;
/// Longest scope, client id or return URL, in bytes.
pub const MAX_TEXT: usize = 2_000;

/// What an app is configured with (every field at once: an update gives the whole new
/// configuration, so an event alone says what the app was from then on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AppConfig {
    pub client_id: String,
    /// The client secret's place in the credential store and its keyed fingerprint.
    pub secret: CredentialRef,
    pub scopes: Vec<String>,
    /// Where a connect session may return the user to (scheme, host, port and path matched
    /// exactly; the query is free).
    pub return_urls: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub enum ProviderAppCommand {
    Create { project_id: ProjectId, provider: String, config: AppConfig, at: DateTime<Utc> },
    Update { config: AppConfig, at: DateTime<Utc> },
    Delete { at: DateTime<Utc> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum ProviderAppEvent {
    Created { project_id: ProjectId, provider: String, config: AppConfig, at: DateTime<Utc> },
    Updated { config: AppConfig, at: DateTime<Utc> },
    Deleted { at: DateTime<Utc> },
}

impl DomainEvent for ProviderAppEvent {
    fn event_version(&self) -> &'static str {
        "1.0"
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProviderAppError {
    #[error("the project already has an app for this provider")]
    AlreadyExists,
    #[error("no provider app for this provider")]
    NotFound,
    #[error("a provider name must be 1 to 100 printable characters")]
    InvalidProvider,
    #[error("a client id must be 1 to 2000 printable characters")]
    InvalidClientId,
    #[error("scope `{0}` is not 1 to 2000 printable characters without spaces")]
    InvalidScope(String),
    #[error("return URL `{0}` is not an absolute https URL (http only for loopback) without a fragment")]
    InvalidReturnUrl(String),
    #[error("at most 50 scopes and 50 return URLs")]
    TooMany,
    #[error("a credential fingerprint must not be empty")]
    InvalidCredential,
}

impl ProviderAppError {
    /// The variant's stable code (part of the public `extensions.code`).
    pub fn code(&self) -> &'static str {
        match self {
            ProviderAppError::AlreadyExists => "already_exists",
            ProviderAppError::NotFound => "not_found",
            ProviderAppError::InvalidProvider => "invalid_provider",
            ProviderAppError::InvalidClientId => "invalid_client_id",
            ProviderAppError::InvalidScope(_) => "invalid_scope",
            ProviderAppError::InvalidReturnUrl(_) => "invalid_return_url",
            ProviderAppError::TooMany => "too_many",
            ProviderAppError::InvalidCredential => "invalid_credential",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProviderApp {
    /// Created and not deleted.
    pub exists: bool,
    pub project_id: ProjectId,
    pub provider: String,
    pub config: Option<AppConfig>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

fn printable(text: &str) -> bool {
    !text.is_empty() && text.len() <= MAX_TEXT && !text.chars().any(char::is_control)
}

/// An absolute `https` URL, or `http` on a loopback host; no fragment, no user info. The
/// API parses it fully; this is the part the domain can check without a URL parser.
pub fn acceptable_return_url(url: &str) -> bool {
    let rest = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
        (Some(rest), _) => rest,
        (None, Some(rest)) if ["127.0.0.1", "localhost", "[::1]"].iter().any(|h| loopback(rest, h)) => rest,
        _ => return false,
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    printable(url)
        && !authority.is_empty()
        && !authority.contains('@')
        && !url.contains('#')
        && !url.chars().any(char::is_whitespace)
}

fn loopback(rest: &str, host: &str) -> bool {
    rest.strip_prefix(host).is_some_and(|after| after.is_empty() || after.starts_with([':', '/', '?']))
}

fn check(config: &AppConfig) -> Result<(), ProviderAppError> {
    if !printable(&config.client_id) || config.client_id.trim() != config.client_id {
        return Err(ProviderAppError::InvalidClientId);
    }
    if config.scopes.len() > MAX_LIST || config.return_urls.len() > MAX_LIST {
        return Err(ProviderAppError::TooMany);
    }
    if let Some(scope) = config.scopes.iter().find(|s| !printable(s) || s.contains(char::is_whitespace)) {
        return Err(ProviderAppError::InvalidScope(scope.clone()));
    }
    if let Some(url) = config.return_urls.iter().find(|u| !acceptable_return_url(u)) {
        return Err(ProviderAppError::InvalidReturnUrl(url.clone()));
    }
    if config.secret.fingerprint.trim().is_empty() {
        return Err(ProviderAppError::InvalidCredential);
    }
    Ok(())
}

impl ProviderApp {
    /// The app's stream id: one per project and provider, found without a lookup table.
    pub fn id_for(project: ProjectId, provider: &str) -> Uuid {
        Uuid::new_v5(&project.0, format!("provider_app:{provider}").as_bytes())
    }
}

impl Aggregate for ProviderApp {
    const TYPE: &'static str = "provider_app";
    type Command = ProviderAppCommand;
    type Event = ProviderAppEvent;
    type Error = ProviderAppError;

    fn decide(&self, command: &ProviderAppCommand) -> Result<Vec<ProviderAppEvent>, ProviderAppError> {
        use ProviderAppCommand as C;
        use ProviderAppEvent as E;
        match command {
            C::Create { project_id, provider, config, at } => {
                if self.exists {
                    return Err(ProviderAppError::AlreadyExists);
                }
                if !valid_name(provider) {
                    return Err(ProviderAppError::InvalidProvider);
                }
                check(config)?;
                Ok(vec![E::Created {
                    project_id: *project_id,
                    provider: provider.clone(),
                    config: config.clone(),
                    at: *at,
                }])
            }
            C::Update { config, at } => {
                if !self.exists {
                    return Err(ProviderAppError::NotFound);
                }
                check(config)?;
                Ok(vec![E::Updated { config: config.clone(), at: *at }])
            }
            C::Delete { at } => {
                if !self.exists {
                    return Err(ProviderAppError::NotFound);
                }
                Ok(vec![E::Deleted { at: *at }])
            }
        }
    }

    fn apply(&mut self, event: &ProviderAppEvent) {
        match event {
            ProviderAppEvent::Created { project_id, provider, config, at } => {
                *self = ProviderApp {
                    exists: true,
                    project_id: *project_id,
                    provider: provider.clone(),
                    config: Some(config.clone()),
                    created_at: Some(*at),
                    updated_at: Some(*at),
                }
            }
            ProviderAppEvent::Updated { config, at } => {
                self.config = Some(config.clone());
                self.updated_at = Some(*at);
            }
            ProviderAppEvent::Deleted { at } => {
                self.exists = false;
                self.config = None;
                self.updated_at = Some(*at);
            }
        }
    }
}
