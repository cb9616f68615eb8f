//! AdminKey: a deployment operator's key, allowed in every project. Its stream records that
//! it was made, every use (in which project, for what) and its revocation; the key itself is
//! stored as a digest outside the log.

use crate::aggregate::{Aggregate, DomainEvent};
use crate::ids::ProjectId;
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub enum AdminKeyCommand {
    Create { label: Option<String>, at: DateTime<Utc> },
    RecordUse { project_id: ProjectId, what: String, at: DateTime<Utc> },
    Revoke { at: DateTime<Utc> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum AdminKeyEvent {
    Created {
        label: Option<String>,
        at: DateTime<Utc>,
    },
    /// One request made with the key: the project it acted in and the request's kind.
    Used {
        project_id: ProjectId,
        what: String,
        at: DateTime<Utc>,
    },
    Revoked {
        at: DateTime<Utc>,
    },
}

impl DomainEvent for AdminKeyEvent {
    fn event_version(&self) -> &'static str {
        "1.0"
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdminKeyError {
    #[error("the admin key already exists")]
    AlreadyExists,
    #[error("no such admin key")]
    NotFound,
    #[error("the admin key is revoked")]
    Revoked,
    #[error("a label or a use's kind must be 1 to 200 printable characters")]
    InvalidText,
}

impl AdminKeyError {
    /// The variant's stable code (part of the public `extensions.code`).
    pub fn code(&self) -> &'static str {
        match self {
            AdminKeyError::AlreadyExists => "already_exists",
            AdminKeyError::NotFound => "not_found",
            AdminKeyError::Revoked => "revoked",
            AdminKeyError::InvalidText => "invalid_text",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AdminKey {
    pub exists: bool,
    pub revoked: bool,
    pub label: Option<String>,
    pub uses: u64,
}

fn text(value: &str) -> bool {
    !value.trim().is_empty() && value.chars().count() <= 200 && !value.chars().any(char::is_control)
}

impl AdminKey {
    fn live(&self) -> Result<(), AdminKeyError> {
        match (self.exists, self.revoked) {
            (false, _) => Err(AdminKeyError::NotFound),
            (true, true) => Err(AdminKeyError::Revoked),
            (true, false) => Ok(()),
        }
    }
}

impl Aggregate for AdminKey {
    const TYPE: &'static str = "admin_key";
    type Command = AdminKeyCommand;
    type Event = AdminKeyEvent;
    type Error = AdminKeyError;

    fn decide(&self, command: &AdminKeyCommand) -> Result<Vec<AdminKeyEvent>, AdminKeyError> {
        match command {
            AdminKeyCommand::Create { label, at } => {
                if self.exists {
                    return Err(AdminKeyError::AlreadyExists);
                }
                if label.as_deref().is_some_and(|l| !text(l)) {
                    return Err(AdminKeyError::InvalidText);
                }
                Ok(vec![AdminKeyEvent::Created { label: label.clone(), at: *at }])
            }
            AdminKeyCommand::RecordUse { project_id, what, at } => {
                self.live()?;
                if !text(what) {
                    return Err(AdminKeyError::InvalidText);
                }
                Ok(vec![AdminKeyEvent::Used { project_id: *project_id, what: what.clone(), at: *at }])
            }
            AdminKeyCommand::Revoke { at } => {
                self.live()?;
                Ok(vec![AdminKeyEvent::Revoked { at: *at }])
            }
        }
    }

    fn apply(&mut self, event: &AdminKeyEvent) {
        match event {
            AdminKeyEvent::Created { label, .. } => {
                self.exists = true;
                self.label = label.clone();
            }
            AdminKeyEvent::Used { .. } => self.uses += 1,
            AdminKeyEvent::Revoked { .. } => self.revoked = true,
        }
    }
}
