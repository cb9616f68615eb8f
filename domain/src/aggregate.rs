//! The two traits every aggregate and event implements.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::fmt::Debug;

/// An event as stored: its type name, its schema version and its payload.
#[derive(Clone, Debug, PartialEq)]
pub struct EventParts {
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
}

/// A domain event. Serialised adjacently tagged (`{"type": .., "data": ..}`); the log stores
/// the tag in `event_type` and the content in `payload`.
pub trait DomainEvent: Serialize + DeserializeOwned + Clone + Debug + PartialEq + Send + Sync {
    /// The schema version of this event type as written today ("1.0", "2.0", ...).
    fn event_version(&self) -> &'static str;

    /// Splits the event into what the log stores.
    fn to_parts(&self) -> EventParts {
        let value = serde_json::to_value(self).expect("domain events always serialise");
        let Value::Object(mut map) = value else { unreachable!("adjacently tagged enums serialise to objects") };
        let Some(Value::String(event_type)) = map.remove("type") else {
            unreachable!("adjacently tagged enums carry a string tag")
        };
        EventParts {
            event_type,
            event_version: self.event_version().to_string(),
            payload: map.remove("data").unwrap_or(Value::Null),
        }
    }

    /// Rebuilds an event from its (already upcast) stored parts.
    fn from_parts(event_type: &str, payload: Value) -> Result<Self, serde_json::Error> {
        let mut map = serde_json::Map::with_capacity(2);
        map.insert("type".into(), Value::String(event_type.to_string()));
        map.insert("data".into(), payload);
        serde_json::from_value(Value::Object(map))
    }
}

/// A pure, synchronous aggregate: `decide` turns a command into events or a typed error,
/// `apply` folds one event into the state. Neither does IO.
pub trait Aggregate: Default + Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Stored in `events.aggregate_type`.
    const TYPE: &'static str;
    /// Bumped whenever the serialised state changes shape, so old snapshots are ignored.
    const SNAPSHOT_VERSION: i32 = 1;
    type Command: Debug + Serialize + Send + Sync;
    type Event: DomainEvent;
    type Error: std::error::Error + Into<crate::DomainError> + Clone + PartialEq + Send + Sync + 'static;

    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
    fn apply(&mut self, event: &Self::Event);

    /// Folds a sequence of events from the default state.
    fn replay<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Self
    where
        Self::Event: 'a,
    {
        let mut state = Self::default();
        for event in events {
            state.apply(event);
        }
        state
    }
}
