//! Installation: an integration installed for one customer group, pinned to a revision, with
//! a per-object schedule and backfill. It is also where operations are requested, so that a
//! pause and a request are ordered by one stream.

use crate::aggregate::{Aggregate, DomainEvent};
use crate::connection::{Connection, ConnectionStatus};
use crate::ids::{ConnectionId, IntegrationId, OperationId, ProjectId};
use crate::integration::{valid_schedule, Backfill, Integration};
use crate::operation::{OperationType, Trigger};
use crate::project::valid_name;
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Per-object settings of one installation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ObjectConfig {
    pub enabled: bool,
    pub schedule: String,
    pub backfill: Backfill,
}

/// What an installation needs to know of its integration: taken from the loaded
/// Integration aggregate by the command layer.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct IntegrationFacts {
    pub id: IntegrationId,
    pub state: Integration,
}

/// What an installation needs to know of its connection.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct ConnectionFacts {
    pub id: ConnectionId,
    pub state: Connection,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub enum InstallationCommand {
    Create {
        project_id: ProjectId,
        integration: IntegrationFacts,
        revision: u32,
        group_ref: String,
        consumer_ref: String,
        connection: ConnectionFacts,
        objects: BTreeMap<String, ObjectConfig>,
        at: DateTime<Utc>,
    },
    UpdateConfig {
        integration: IntegrationFacts,
        revision: u32,
        objects: BTreeMap<String, ObjectConfig>,
        at: DateTime<Utc>,
    },
    Pause {
        at: DateTime<Utc>,
    },
    Unpause {
        at: DateTime<Utc>,
    },
    Delete {
        at: DateTime<Utc>,
    },
    RequestOperation {
        operation_id: OperationId,
        op_type: OperationType,
        object: String,
        trigger: Trigger,
        connection: ConnectionFacts,
        at: DateTime<Utc>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum InstallationEvent {
    Created {
        project_id: ProjectId,
        integration_id: IntegrationId,
        revision: u32,
        group_ref: String,
        consumer_ref: String,
        connection_id: ConnectionId,
        objects: BTreeMap<String, ObjectConfig>,
        at: DateTime<Utc>,
    },
    ConfigUpdated {
        revision: u32,
        objects: BTreeMap<String, ObjectConfig>,
        at: DateTime<Utc>,
    },
    Paused {
        at: DateTime<Utc>,
    },
    Unpaused {
        at: DateTime<Utc>,
    },
    Deleted {
        at: DateTime<Utc>,
    },
    OperationRequested {
        operation_id: OperationId,
        op_type: OperationType,
        object: String,
        trigger: Trigger,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for InstallationEvent {
    fn event_version(&self) -> &'static str {
        "1.0"
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InstallationError {
    #[error("the installation already exists")]
    AlreadyExists,
    #[error("no such installation")]
    NotFound,
    #[error("the installation is deleted")]
    Deleted,
    #[error("the installation is paused")]
    Paused,
    #[error("the installation is already paused")]
    AlreadyPaused,
    #[error("the installation is not paused")]
    NotPaused,
    #[error("no such integration")]
    IntegrationNotFound,
    #[error("the integration has no revision {0}")]
    UnknownRevision(u32),
    #[error("object `{0}` is not declared by the pinned revision")]
    UnknownObject(String),
    #[error("object `{0}` is disabled on this installation")]
    ObjectDisabled(String),
    #[error("schedule `{0}` is neither `@every <n>m|h|d` nor a five-field cron expression")]
    InvalidSchedule(String),
    #[error("no such connection")]
    ConnectionNotFound,
    #[error("the connection belongs to another group or integration")]
    ConnectionMismatch,
    #[error("the connection is revoked")]
    ConnectionRevoked,
    #[error("the connection has bad credentials: the installation needs re-authentication")]
    NeedsReauth,
    #[error("a group_ref and a consumer_ref must be 1 to 100 printable characters")]
    InvalidRef,
    #[error("an installation must configure at least one object")]
    NoObjects,
}

impl InstallationError {
    /// The variant's stable code (part of the public `extensions.code`: renaming a variant
    /// must not change it).
    pub fn code(&self) -> &'static str {
        match self {
            InstallationError::AlreadyExists => "already_exists",
            InstallationError::NotFound => "not_found",
            InstallationError::Deleted => "deleted",
            InstallationError::Paused => "paused",
            InstallationError::AlreadyPaused => "already_paused",
            InstallationError::NotPaused => "not_paused",
            InstallationError::IntegrationNotFound => "integration_not_found",
            InstallationError::UnknownRevision(_) => "unknown_revision",
            InstallationError::UnknownObject(_) => "unknown_object",
            InstallationError::ObjectDisabled(_) => "object_disabled",
            InstallationError::InvalidSchedule(_) => "invalid_schedule",
            InstallationError::ConnectionNotFound => "connection_not_found",
            InstallationError::ConnectionMismatch => "connection_mismatch",
            InstallationError::ConnectionRevoked => "connection_revoked",
            InstallationError::NeedsReauth => "needs_reauth",
            InstallationError::InvalidRef => "invalid_ref",
            InstallationError::NoObjects => "no_objects",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Installation {
    pub exists: bool,
    pub deleted: bool,
    pub paused: bool,
    pub project_id: ProjectId,
    pub integration_id: IntegrationId,
    pub revision: u32,
    pub group_ref: String,
    pub consumer_ref: String,
    pub connection_id: ConnectionId,
    pub objects: BTreeMap<String, ObjectConfig>,
    pub operations_requested: u64,
}

impl Installation {
    fn live(&self) -> Result<(), InstallationError> {
        if !self.exists {
            return Err(InstallationError::NotFound);
        }
        if self.deleted {
            return Err(InstallationError::Deleted);
        }
        Ok(())
    }
}

fn check_config(
    project_id: ProjectId,
    integration: &IntegrationFacts,
    revision: u32,
    objects: &BTreeMap<String, ObjectConfig>,
) -> Result<(), InstallationError> {
    if !integration.state.exists || integration.state.project_id != project_id {
        return Err(InstallationError::IntegrationNotFound);
    }
    let declared = integration.state.revision(revision).ok_or(InstallationError::UnknownRevision(revision))?;
    if objects.is_empty() {
        return Err(InstallationError::NoObjects);
    }
    for (name, config) in objects {
        if !declared.objects.contains_key(name) {
            return Err(InstallationError::UnknownObject(name.clone()));
        }
        if !valid_schedule(&config.schedule) {
            return Err(InstallationError::InvalidSchedule(config.schedule.clone()));
        }
    }
    Ok(())
}

fn check_connection(project_id: ProjectId, connection: &ConnectionFacts) -> Result<(), InstallationError> {
    let state = &connection.state;
    if !state.exists || state.project_id != project_id {
        return Err(InstallationError::ConnectionNotFound);
    }
    match state.status {
        ConnectionStatus::Revoked => Err(InstallationError::ConnectionRevoked),
        ConnectionStatus::BadCredentials => Err(InstallationError::NeedsReauth),
        ConnectionStatus::Created | ConnectionStatus::Working => Ok(()),
    }
}

impl Aggregate for Installation {
    const TYPE: &'static str = "installation";
    type Command = InstallationCommand;
    type Event = InstallationEvent;
    type Error = InstallationError;

    fn decide(&self, command: &InstallationCommand) -> Result<Vec<InstallationEvent>, InstallationError> {
        use InstallationCommand as C;
        use InstallationEvent as E;
        match command {
            C::Create { project_id, integration, revision, group_ref, consumer_ref, connection, objects, at } => {
                if self.exists {
                    return Err(InstallationError::AlreadyExists);
                }
                if !valid_name(group_ref) || !valid_name(consumer_ref) {
                    return Err(InstallationError::InvalidRef);
                }
                check_config(*project_id, integration, *revision, objects)?;
                // A new installation may use a connection awaiting re-auth (only its reads
                // wait); a missing, foreign, revoked or mismatched connection is refused.
                let conn = &connection.state;
                if !conn.exists || conn.project_id != *project_id {
                    return Err(InstallationError::ConnectionNotFound);
                }
                if conn.status == ConnectionStatus::Revoked {
                    return Err(InstallationError::ConnectionRevoked);
                }
                if conn.group_ref != *group_ref || conn.integration_id != integration.id {
                    return Err(InstallationError::ConnectionMismatch);
                }
                Ok(vec![E::Created {
                    project_id: *project_id,
                    integration_id: integration.id,
                    revision: *revision,
                    group_ref: group_ref.clone(),
                    consumer_ref: consumer_ref.clone(),
                    connection_id: connection.id,
                    objects: objects.clone(),
                    at: *at,
                }])
            }
            C::UpdateConfig { integration, revision, objects, at } => {
                self.live()?;
                if integration.id != self.integration_id {
                    return Err(InstallationError::IntegrationNotFound);
                }
                check_config(self.project_id, integration, *revision, objects)?;
                Ok(vec![E::ConfigUpdated { revision: *revision, objects: objects.clone(), at: *at }])
            }
            C::Pause { at } => {
                self.live()?;
                if self.paused {
                    return Err(InstallationError::AlreadyPaused);
                }
                Ok(vec![E::Paused { at: *at }])
            }
            C::Unpause { at } => {
                self.live()?;
                if !self.paused {
                    return Err(InstallationError::NotPaused);
                }
                Ok(vec![E::Unpaused { at: *at }])
            }
            C::Delete { at } => {
                self.live()?;
                Ok(vec![E::Deleted { at: *at }])
            }
            C::RequestOperation { operation_id, op_type, object, trigger, connection, at } => {
                self.live()?;
                if self.paused {
                    return Err(InstallationError::Paused);
                }
                if connection.id != self.connection_id {
                    return Err(InstallationError::ConnectionMismatch);
                }
                check_connection(self.project_id, connection)?;
                if *op_type != OperationType::Proxy {
                    let config =
                        self.objects.get(object).ok_or_else(|| InstallationError::UnknownObject(object.clone()))?;
                    if !config.enabled {
                        return Err(InstallationError::ObjectDisabled(object.clone()));
                    }
                }
                Ok(vec![E::OperationRequested {
                    operation_id: *operation_id,
                    op_type: *op_type,
                    object: object.clone(),
                    trigger: *trigger,
                    at: *at,
                }])
            }
        }
    }

    fn apply(&mut self, event: &InstallationEvent) {
        match event {
            InstallationEvent::Created {
                project_id,
                integration_id,
                revision,
                group_ref,
                consumer_ref,
                connection_id,
                objects,
                ..
            } => {
                *self = Installation {
                    exists: true,
                    deleted: false,
                    paused: false,
                    project_id: *project_id,
                    integration_id: *integration_id,
                    revision: *revision,
                    group_ref: group_ref.clone(),
                    consumer_ref: consumer_ref.clone(),
                    connection_id: *connection_id,
                    objects: objects.clone(),
                    operations_requested: 0,
                }
            }
            InstallationEvent::ConfigUpdated { revision, objects, .. } => {
                self.revision = *revision;
                self.objects = objects.clone();
            }
            InstallationEvent::Paused { .. } => self.paused = true,
            InstallationEvent::Unpaused { .. } => self.paused = false,
            InstallationEvent::Deleted { .. } => self.deleted = true,
            InstallationEvent::OperationRequested { .. } => self.operations_requested += 1,
        }
    }
}
