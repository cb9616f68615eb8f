//! Change: one change to a record that a provider pushed (a webhook), attributed to the
//! connection of the account it happened in. Its stream id comes from the connection and
//! the provider's event id, so a change the provider sends twice is recorded once. Only
//! ids and the kind of change: the record itself stays at the provider.

use crate::aggregate::{Aggregate, DomainEvent};
use crate::ids::{ConnectionId, ProjectId};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
}

/// What a provider said changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ChangeFacts {
    pub project_id: ProjectId,
    pub connection_id: ConnectionId,
    /// The object (`contacts`), as the catalog names it.
    pub object: String,
    pub record_id: String,
    pub kind: ChangeKind,
    /// The properties that changed, when the provider names them (never their values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<String>,
    /// The provider's id of the change event.
    pub provider_event_id: String,
    /// When it happened at the provider.
    pub occurred_at: DateTime<Utc>,
}

/// The longest id or name a change records.
pub const CHANGE_TEXT_MAX: usize = 256;
/// The most property names one change records.
pub const CHANGE_PROPERTIES_MAX: usize = 64;

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub enum ChangeCommand {
    Receive { facts: ChangeFacts, at: DateTime<Utc> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum ChangeEvent {
    Received {
        #[serde(flatten)]
        facts: ChangeFacts,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for ChangeEvent {
    fn event_version(&self) -> &'static str {
        "1.0"
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("the change is already recorded")]
    AlreadyRecorded,
    #[error("a change names an object, a record and an event id of 1 to 256 characters, and at most 64 properties")]
    Invalid,
}

impl ChangeError {
    pub fn code(&self) -> &'static str {
        match self {
            ChangeError::AlreadyRecorded => "already_recorded",
            ChangeError::Invalid => "invalid",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Change {
    pub exists: bool,
    pub project_id: ProjectId,
}

fn text(value: &str) -> bool {
    !value.is_empty() && value.len() <= CHANGE_TEXT_MAX && !value.chars().any(char::is_control)
}

impl Aggregate for Change {
    const TYPE: &'static str = "change";
    type Command = ChangeCommand;
    type Event = ChangeEvent;
    type Error = ChangeError;

    fn decide(&self, command: &ChangeCommand) -> Result<Vec<ChangeEvent>, ChangeError> {
        let ChangeCommand::Receive { facts, at } = command;
        if self.exists {
            return Err(ChangeError::AlreadyRecorded);
        }
        let names_ok = facts.properties.len() <= CHANGE_PROPERTIES_MAX && facts.properties.iter().all(|p| text(p));
        if ![&facts.object, &facts.record_id, &facts.provider_event_id].into_iter().all(|t| text(t)) || !names_ok {
            return Err(ChangeError::Invalid);
        }
        Ok(vec![ChangeEvent::Received { facts: facts.clone(), at: *at }])
    }

    fn apply(&mut self, event: &ChangeEvent) {
        let ChangeEvent::Received { facts, .. } = event;
        self.exists = true;
        self.project_id = facts.project_id;
    }
}
