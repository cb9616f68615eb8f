//! Integration: declared by a project from a manifest; each deploy is a numbered Revision.

use crate::aggregate::{Aggregate, DomainEvent};
use crate::ids::ProjectId;
use crate::project::valid_name;
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How much history the first read of an object fetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "snake_case", tag = "mode", content = "days")]
pub enum Backfill {
    #[default]
    None,
    Days(u32),
    Full,
}

/// One object a revision can read or write.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ObjectDecl {
    pub name: String,
    /// Default schedule: `@every 15m`-style or a five-field cron expression.
    pub schedule: Option<String>,
    #[serde(default)]
    pub backfill: Backfill,
    #[serde(default)]
    pub fields: Vec<String>,
    /// The project destination (webhook) that receives this object's reads; `default` when
    /// unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// The end user may leave it out when connecting (the connect page offers it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
    /// The changes the provider pushes (webhooks) that are delivered as they happen, each
    /// with the record as it then is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscribe: Vec<crate::change::ChangeKind>,
}

impl ObjectDecl {
    /// An object read on demand only: no schedule, no backfill, every field, the `default`
    /// destination, nothing pushed.
    pub fn named(name: &str) -> ObjectDecl {
        ObjectDecl { name: name.into(), ..ObjectDecl::default() }
    }
}

/// The parsed manifest of one deploy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Manifest {
    pub objects: Vec<ObjectDecl>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub enum IntegrationCommand {
    Declare { project_id: ProjectId, name: String, provider: String, at: DateTime<Utc> },
    DeployRevision { manifest: Manifest, manifest_digest: String, at: DateTime<Utc> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum IntegrationEvent {
    Declared { project_id: ProjectId, name: String, provider: String, at: DateTime<Utc> },
    RevisionDeployed { revision: u32, objects: Vec<ObjectDecl>, manifest_digest: String, at: DateTime<Utc> },
}

impl DomainEvent for IntegrationEvent {
    fn event_version(&self) -> &'static str {
        "1.0"
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IntegrationError {
    #[error("the integration is already declared")]
    AlreadyDeclared,
    #[error("no such integration")]
    NotFound,
    #[error("an integration name must be 1 to 100 printable characters")]
    InvalidName,
    #[error("a provider name must be 1 to 100 printable characters")]
    InvalidProvider,
    #[error("a manifest must declare at least one object")]
    EmptyManifest,
    #[error("object `{0}` is declared twice")]
    DuplicateObject(String),
    #[error("object name `{0}` is not valid")]
    InvalidObjectName(String),
    #[error("schedule `{0}` is neither `@every <n>m|h|d` nor a five-field cron expression")]
    InvalidSchedule(String),
}

impl IntegrationError {
    /// The variant's stable code (part of the public `extensions.code`: renaming a variant
    /// must not change it).
    pub fn code(&self) -> &'static str {
        match self {
            IntegrationError::AlreadyDeclared => "already_declared",
            IntegrationError::NotFound => "not_found",
            IntegrationError::InvalidName => "invalid_name",
            IntegrationError::InvalidProvider => "invalid_provider",
            IntegrationError::EmptyManifest => "empty_manifest",
            IntegrationError::DuplicateObject(_) => "duplicate_object",
            IntegrationError::InvalidObjectName(_) => "invalid_object_name",
            IntegrationError::InvalidSchedule(_) => "invalid_schedule",
        }
    }
}

/// A deployed revision with its objects by name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Revision {
    pub number: u32,
    pub objects: BTreeMap<String, ObjectDecl>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Integration {
    pub exists: bool,
    pub project_id: ProjectId,
    pub name: String,
    pub provider: String,
    pub revisions: Vec<Revision>,
}

impl Integration {
    pub fn revision(&self, number: u32) -> Option<&Revision> {
        self.revisions.iter().find(|r| r.number == number)
    }
}

/// Accepts `@every <n>m|h|d` (n ≥ 1) or a five-field cron expression of `0-9 * / , -`.
pub fn valid_schedule(schedule: &str) -> bool {
    crate::schedule::Schedule::parse(schedule).is_some()
}

pub(crate) fn valid_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

impl Aggregate for Integration {
    const TYPE: &'static str = "integration";
    type Command = IntegrationCommand;
    type Event = IntegrationEvent;
    type Error = IntegrationError;

    fn decide(&self, command: &IntegrationCommand) -> Result<Vec<IntegrationEvent>, IntegrationError> {
        match command {
            IntegrationCommand::Declare { project_id, name, provider, at } => {
                if self.exists {
                    return Err(IntegrationError::AlreadyDeclared);
                }
                if !valid_name(name) {
                    return Err(IntegrationError::InvalidName);
                }
                if !valid_name(provider) {
                    return Err(IntegrationError::InvalidProvider);
                }
                Ok(vec![IntegrationEvent::Declared {
                    project_id: *project_id,
                    name: name.clone(),
                    provider: provider.clone(),
                    at: *at,
                }])
            }
            IntegrationCommand::DeployRevision { manifest, manifest_digest, at } => {
                if !self.exists {
                    return Err(IntegrationError::NotFound);
                }
                if manifest.objects.is_empty() {
                    return Err(IntegrationError::EmptyManifest);
                }
                let mut seen = std::collections::BTreeSet::new();
                for object in &manifest.objects {
                    if !valid_object_name(&object.name) {
                        return Err(IntegrationError::InvalidObjectName(object.name.clone()));
                    }
                    if !seen.insert(object.name.as_str()) {
                        return Err(IntegrationError::DuplicateObject(object.name.clone()));
                    }
                    if let Some(schedule) = &object.schedule {
                        if !valid_schedule(schedule) {
                            return Err(IntegrationError::InvalidSchedule(schedule.clone()));
                        }
                    }
                }
                Ok(vec![IntegrationEvent::RevisionDeployed {
                    revision: self.revisions.len() as u32 + 1,
                    objects: manifest.objects.clone(),
                    manifest_digest: manifest_digest.clone(),
                    at: *at,
                }])
            }
        }
    }

    fn apply(&mut self, event: &IntegrationEvent) {
        match event {
            IntegrationEvent::Declared { project_id, name, provider, .. } => {
                self.exists = true;
                self.project_id = *project_id;
                self.name = name.clone();
                self.provider = provider.clone();
            }
            IntegrationEvent::RevisionDeployed { revision, objects, .. } => self.revisions.push(Revision {
                number: *revision,
                objects: objects.iter().map(|o| (o.name.clone(), o.clone())).collect(),
            }),
        }
    }
}
