//! Organization: above projects (Org → Projects → …). Its stream records its name and the
//! projects made in it.

use crate::aggregate::{Aggregate, DomainEvent};
use crate::ids::ProjectId;
use crate::project::valid_name;
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub enum OrganizationCommand {
    Create { name: String, at: DateTime<Utc> },
    AddProject { project_id: ProjectId, at: DateTime<Utc> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum OrganizationEvent {
    Created { name: String, at: DateTime<Utc> },
    ProjectAdded { project_id: ProjectId, at: DateTime<Utc> },
}

impl DomainEvent for OrganizationEvent {
    fn event_version(&self) -> &'static str {
        "1.0"
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrganizationError {
    #[error("the organization already exists")]
    AlreadyExists,
    #[error("no such organization")]
    NotFound,
    #[error("an organization name must be 1 to 100 printable characters")]
    InvalidName,
    #[error("the project is already in the organization")]
    AlreadyAdded,
}

impl OrganizationError {
    /// The variant's stable code (part of the public `extensions.code`).
    pub fn code(&self) -> &'static str {
        match self {
            OrganizationError::AlreadyExists => "already_exists",
            OrganizationError::NotFound => "not_found",
            OrganizationError::InvalidName => "invalid_name",
            OrganizationError::AlreadyAdded => "already_added",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Organization {
    pub exists: bool,
    pub name: String,
    pub projects: BTreeSet<ProjectId>,
}

impl Aggregate for Organization {
    const TYPE: &'static str = "organization";
    type Command = OrganizationCommand;
    type Event = OrganizationEvent;
    type Error = OrganizationError;

    fn decide(&self, command: &OrganizationCommand) -> Result<Vec<OrganizationEvent>, OrganizationError> {
        match command {
            OrganizationCommand::Create { name, at } => {
                if self.exists {
                    return Err(OrganizationError::AlreadyExists);
                }
                if !valid_name(name) {
                    return Err(OrganizationError::InvalidName);
                }
                Ok(vec![OrganizationEvent::Created { name: name.clone(), at: *at }])
            }
            OrganizationCommand::AddProject { project_id, at } => {
                if !self.exists {
                    return Err(OrganizationError::NotFound);
                }
                if self.projects.contains(project_id) {
                    return Err(OrganizationError::AlreadyAdded);
                }
                Ok(vec![OrganizationEvent::ProjectAdded { project_id: *project_id, at: *at }])
            }
        }
    }

    fn apply(&mut self, event: &OrganizationEvent) {
        match event {
            OrganizationEvent::Created { name, .. } => {
                self.exists = true;
                self.name = name.clone();
            }
            OrganizationEvent::ProjectAdded { project_id, .. } => {
                self.projects.insert(*project_id);
            }
        }
    }
}
