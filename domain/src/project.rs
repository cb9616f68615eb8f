//! Project: the tenant. Owns integrations, connections, installations, provider apps and
//! connect sessions; its own stream records its configuration: API keys made and revoked
//! (ids and scopes, never the keys), destinations (URLs and secret fingerprints) and the
//! public keys its end users' tokens are verified with, and its notification subscriptions.

use crate::aggregate::{Aggregate, DomainEvent};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub enum ProjectCommand {
    Create {
        name: String,
        at: DateTime<Utc>,
    },
    Rename {
        name: String,
        at: DateTime<Utc>,
    },
    RecordApiKey {
        key_id: Uuid,
        scope: String,
        label: Option<String>,
        at: DateTime<Utc>,
    },
    RevokeApiKey {
        key_id: Uuid,
        at: DateTime<Utc>,
    },
    PutDestination {
        name: String,
        url: String,
        secret_fingerprint: String,
        at: DateTime<Utc>,
    },
    DisableDestination {
        name: String,
        reason: String,
        at: DateTime<Utc>,
    },
    RecordJwtKey {
        kid: Uuid,
        algorithm: String,
        fingerprint: String,
        at: DateTime<Utc>,
    },
    RevokeJwtKey {
        kid: Uuid,
        at: DateTime<Utc>,
    },
    JoinOrganization {
        organization_id: Uuid,
        at: DateTime<Utc>,
    },
    /// Subscribes a destination (the command service says whether it exists) to topics or
    /// patterns (`read.failed`, `installation.*`, `*`).
    SubscribeNotifications {
        subscription_id: Uuid,
        destination: String,
        destination_exists: bool,
        topics: Vec<String>,
        at: DateTime<Utc>,
    },
    DeleteNotificationSubscription {
        subscription_id: Uuid,
        at: DateTime<Utc>,
    },
}

/// The most notification subscriptions a project keeps.
pub const SUBSCRIPTIONS_MAX: usize = 50;

/// A destination subscribed to notifications.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NotificationSubscription {
    pub destination: String,
    pub topics: Vec<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum ProjectEvent {
    Created {
        name: String,
        at: DateTime<Utc>,
    },
    Renamed {
        name: String,
        at: DateTime<Utc>,
    },
    ApiKeyCreated {
        key_id: Uuid,
        scope: String,
        label: Option<String>,
        at: DateTime<Utc>,
    },
    ApiKeyRevoked {
        key_id: Uuid,
        at: DateTime<Utc>,
    },
    DestinationPut {
        name: String,
        url: String,
        secret_fingerprint: String,
        at: DateTime<Utc>,
    },
    DestinationDisabled {
        name: String,
        reason: String,
        at: DateTime<Utc>,
    },
    /// A public key end users' tokens are verified with: its id, algorithm and a digest.
    JwtKeyCreated {
        kid: Uuid,
        algorithm: String,
        fingerprint: String,
        at: DateTime<Utc>,
    },
    JwtKeyRevoked {
        kid: Uuid,
        at: DateTime<Utc>,
    },
    /// The project belongs to an organization from now on (made in it).
    JoinedOrganization {
        organization_id: Uuid,
        at: DateTime<Utc>,
    },
    /// Notifications of these topics (or patterns) go to the destination, from the next
    /// event in the log on.
    NotificationSubscriptionCreated {
        subscription_id: Uuid,
        destination: String,
        topics: Vec<String>,
        at: DateTime<Utc>,
    },
    NotificationSubscriptionDeleted {
        subscription_id: Uuid,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for ProjectEvent {
    fn event_version(&self) -> &'static str {
        "1.0"
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProjectError {
    #[error("the project already exists")]
    AlreadyExists,
    #[error("no such project")]
    NotFound,
    #[error("a project name must be 1 to 100 printable characters")]
    InvalidName,
    #[error("the API key is already revoked")]
    KeyRevoked,
    #[error("a scope, label, destination name, URL or reason is not 1 to 2000 printable characters")]
    InvalidConfig,
    #[error("the destination is already disabled")]
    DestinationDisabled,
    #[error("no live JWT key with this id")]
    JwtKeyNotFound,
    #[error("the project already belongs to an organization")]
    AlreadyInOrganization,
    #[error("{0}")]
    InvalidTopics(String),
    #[error("the project has no destination `{0}`")]
    UnknownDestination(String),
    #[error("no such notification subscription")]
    SubscriptionNotFound,
    #[error("a project keeps at most 50 notification subscriptions")]
    TooManySubscriptions,
}

impl ProjectError {
    /// The variant's stable code (part of the public `extensions.code`: renaming a variant
    /// must not change it).
    pub fn code(&self) -> &'static str {
        match self {
            ProjectError::AlreadyExists => "already_exists",
            ProjectError::NotFound => "not_found",
            ProjectError::InvalidName => "invalid_name",
            ProjectError::KeyRevoked => "key_revoked",
            ProjectError::InvalidConfig => "invalid_config",
            ProjectError::DestinationDisabled => "destination_disabled",
            ProjectError::JwtKeyNotFound => "jwt_key_not_found",
            ProjectError::AlreadyInOrganization => "already_in_organization",
            ProjectError::InvalidTopics(_) => "invalid_topics",
            ProjectError::UnknownDestination(_) => "unknown_destination",
            ProjectError::SubscriptionNotFound => "subscription_not_found",
            ProjectError::TooManySubscriptions => "too_many_subscriptions",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Project {
    pub exists: bool,
    pub name: String,
    /// API keys recorded in the log: live or not. (Keys made before keys were recorded
    /// are not here; revoking one is accepted.)
    #[serde(default)]
    pub api_keys: BTreeMap<Uuid, bool>,
    /// Destinations by name: enabled or not.
    #[serde(default)]
    pub destinations: BTreeMap<String, bool>,
    /// JWT keys by id: live or not.
    #[serde(default)]
    pub jwt_keys: BTreeMap<Uuid, bool>,
    #[serde(default)]
    pub organization_id: Option<Uuid>,
    #[serde(default)]
    pub notification_subscriptions: BTreeMap<Uuid, NotificationSubscription>,
}

/// Checks a subscription's topics: 1 to `TOPICS_MAX`, each a topic or a pattern, no repeats.
fn check_topics(topics: &[String]) -> Result<(), ProjectError> {
    use crate::notification::{is_pattern, TOPICS_MAX};
    if topics.is_empty() || topics.len() > TOPICS_MAX {
        return Err(ProjectError::InvalidTopics(format!("a subscription names 1 to {TOPICS_MAX} topics")));
    }
    if let Some(bad) = topics.iter().find(|t| !is_pattern(t)) {
        let shown: String = bad.chars().take(100).collect();
        return Err(ProjectError::InvalidTopics(format!(
            "`{shown}` is not a topic (see notificationTopics), a `group.*` pattern or `*`"
        )));
    }
    let distinct: std::collections::BTreeSet<&String> = topics.iter().collect();
    if distinct.len() != topics.len() {
        return Err(ProjectError::InvalidTopics("a topic is named twice".into()));
    }
    Ok(())
}

fn text(value: &str) -> bool {
    !value.is_empty() && value.len() <= 2000 && !value.chars().any(char::is_control)
}

pub(crate) fn valid_name(name: &str) -> bool {
    let trimmed = name.trim();
    !trimmed.is_empty()
        && trimmed.len() == name.len()
        && name.chars().count() <= 100
        && !name.chars().any(char::is_control)
}

impl Aggregate for Project {
    const TYPE: &'static str = "project";
    type Command = ProjectCommand;
    type Event = ProjectEvent;
    type Error = ProjectError;

    fn decide(&self, command: &ProjectCommand) -> Result<Vec<ProjectEvent>, ProjectError> {
        match command {
            ProjectCommand::Create { name, at } => {
                if self.exists {
                    return Err(ProjectError::AlreadyExists);
                }
                if !valid_name(name) {
                    return Err(ProjectError::InvalidName);
                }
                Ok(vec![ProjectEvent::Created { name: name.clone(), at: *at }])
            }
            ProjectCommand::Rename { name, at } => {
                if !self.exists {
                    return Err(ProjectError::NotFound);
                }
                if !valid_name(name) {
                    return Err(ProjectError::InvalidName);
                }
                Ok(vec![ProjectEvent::Renamed { name: name.clone(), at: *at }])
            }
            ProjectCommand::RecordApiKey { key_id, scope, label, at } => {
                if !self.exists {
                    return Err(ProjectError::NotFound);
                }
                if !text(scope) || label.as_deref().is_some_and(|l| !text(l)) {
                    return Err(ProjectError::InvalidConfig);
                }
                Ok(vec![ProjectEvent::ApiKeyCreated {
                    key_id: *key_id,
                    scope: scope.clone(),
                    label: label.clone(),
                    at: *at,
                }])
            }
            ProjectCommand::RevokeApiKey { key_id, at } => {
                if !self.exists {
                    return Err(ProjectError::NotFound);
                }
                if self.api_keys.get(key_id) == Some(&false) {
                    return Err(ProjectError::KeyRevoked);
                }
                Ok(vec![ProjectEvent::ApiKeyRevoked { key_id: *key_id, at: *at }])
            }
            ProjectCommand::PutDestination { name, url, secret_fingerprint, at } => {
                if !self.exists {
                    return Err(ProjectError::NotFound);
                }
                if ![name, url, secret_fingerprint].into_iter().all(|t| text(t)) {
                    return Err(ProjectError::InvalidConfig);
                }
                Ok(vec![ProjectEvent::DestinationPut {
                    name: name.clone(),
                    url: url.clone(),
                    secret_fingerprint: secret_fingerprint.clone(),
                    at: *at,
                }])
            }
            ProjectCommand::DisableDestination { name, reason, at } => {
                if !self.exists {
                    return Err(ProjectError::NotFound);
                }
                if self.destinations.get(name) == Some(&false) {
                    return Err(ProjectError::DestinationDisabled);
                }
                if !text(name) || !text(reason) {
                    return Err(ProjectError::InvalidConfig);
                }
                Ok(vec![ProjectEvent::DestinationDisabled { name: name.clone(), reason: reason.clone(), at: *at }])
            }
            ProjectCommand::RecordJwtKey { kid, algorithm, fingerprint, at } => {
                if !self.exists {
                    return Err(ProjectError::NotFound);
                }
                if !["EdDSA", "ES256", "RS256"].contains(&algorithm.as_str()) || !text(fingerprint) {
                    return Err(ProjectError::InvalidConfig);
                }
                Ok(vec![ProjectEvent::JwtKeyCreated {
                    kid: *kid,
                    algorithm: algorithm.clone(),
                    fingerprint: fingerprint.clone(),
                    at: *at,
                }])
            }
            ProjectCommand::RevokeJwtKey { kid, at } => {
                if !self.exists {
                    return Err(ProjectError::NotFound);
                }
                if self.jwt_keys.get(kid) != Some(&true) {
                    return Err(ProjectError::JwtKeyNotFound);
                }
                Ok(vec![ProjectEvent::JwtKeyRevoked { kid: *kid, at: *at }])
            }
            ProjectCommand::JoinOrganization { organization_id, at } => {
                if !self.exists {
                    return Err(ProjectError::NotFound);
                }
                if self.organization_id.is_some() {
                    return Err(ProjectError::AlreadyInOrganization);
                }
                Ok(vec![ProjectEvent::JoinedOrganization { organization_id: *organization_id, at: *at }])
            }
            ProjectCommand::SubscribeNotifications { subscription_id, destination, destination_exists, topics, at } => {
                if !self.exists {
                    return Err(ProjectError::NotFound);
                }
                check_topics(topics)?;
                if !text(destination) || !destination_exists {
                    let shown: String = destination.chars().take(100).collect();
                    return Err(ProjectError::UnknownDestination(shown));
                }
                if self.notification_subscriptions.len() >= SUBSCRIPTIONS_MAX {
                    return Err(ProjectError::TooManySubscriptions);
                }
                if self.notification_subscriptions.contains_key(subscription_id) {
                    return Err(ProjectError::InvalidConfig);
                }
                Ok(vec![ProjectEvent::NotificationSubscriptionCreated {
                    subscription_id: *subscription_id,
                    destination: destination.clone(),
                    topics: topics.clone(),
                    at: *at,
                }])
            }
            ProjectCommand::DeleteNotificationSubscription { subscription_id, at } => {
                if !self.exists {
                    return Err(ProjectError::NotFound);
                }
                if !self.notification_subscriptions.contains_key(subscription_id) {
                    return Err(ProjectError::SubscriptionNotFound);
                }
                Ok(vec![ProjectEvent::NotificationSubscriptionDeleted { subscription_id: *subscription_id, at: *at }])
            }
        }
    }

    fn apply(&mut self, event: &ProjectEvent) {
        match event {
            ProjectEvent::Created { name, .. } => {
                self.exists = true;
                self.name = name.clone();
            }
            ProjectEvent::Renamed { name, .. } => self.name = name.clone(),
            ProjectEvent::ApiKeyCreated { key_id, .. } => {
                self.api_keys.insert(*key_id, true);
            }
            ProjectEvent::ApiKeyRevoked { key_id, .. } => {
                self.api_keys.insert(*key_id, false);
            }
            ProjectEvent::DestinationPut { name, .. } => {
                self.destinations.insert(name.clone(), true);
            }
            ProjectEvent::DestinationDisabled { name, .. } => {
                self.destinations.insert(name.clone(), false);
            }
            ProjectEvent::JwtKeyCreated { kid, .. } => {
                self.jwt_keys.insert(*kid, true);
            }
            ProjectEvent::JwtKeyRevoked { kid, .. } => {
                self.jwt_keys.insert(*kid, false);
            }
            ProjectEvent::JoinedOrganization { organization_id, .. } => self.organization_id = Some(*organization_id),
            ProjectEvent::NotificationSubscriptionCreated { subscription_id, destination, topics, at } => {
                let subscription = NotificationSubscription {
                    destination: destination.clone(),
                    topics: topics.clone(),
                    created_at: *at,
                };
                self.notification_subscriptions.insert(*subscription_id, subscription);
            }
            ProjectEvent::NotificationSubscriptionDeleted { subscription_id, .. } => {
                self.notification_subscriptions.remove(subscription_id);
            }
        }
    }
}
