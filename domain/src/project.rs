//! Project: the tenant. Owns integrations, connections, installations and API keys.

use crate::aggregate::{Aggregate, DomainEvent};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub enum ProjectCommand {
    Create { name: String, at: DateTime<Utc> },
    Rename { name: String, at: DateTime<Utc> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum ProjectEvent {
    Created { name: String, at: DateTime<Utc> },
    Renamed { name: String, at: DateTime<Utc> },
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
}

impl ProjectError {
    /// The variant's stable code (part of the public `extensions.code`: renaming a variant
    /// must not change it).
    pub fn code(&self) -> &'static str {
        match self {
            ProjectError::AlreadyExists => "already_exists",
            ProjectError::NotFound => "not_found",
            ProjectError::InvalidName => "invalid_name",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Project {
    pub exists: bool,
    pub name: String,
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
        }
    }

    fn apply(&mut self, event: &ProjectEvent) {
        match event {
            ProjectEvent::Created { name, .. } => {
                self.exists = true;
                self.name = name.clone();
            }
            ProjectEvent::Renamed { name, .. } => self.name = name.clone(),
        }
    }
}
