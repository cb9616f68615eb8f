//! The CloudEvents 1.0 structured-mode JSON envelope every amplog message travels in. The
//! tenant travels in the envelope (`projectid`), never only in `data`: consumers take their
//! project context from here.

use amplog_commands::{CommandError, EventStore, RecordedEvent, StoredEvent};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::BTreeMap;
use uuid::Uuid;

/// The content type of a structured-mode CloudEvent, sent as the `content-type` header.
pub const CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";

/// A CloudEvent as amplog publishes it. Extension attributes: `projectid`, `sequence`,
/// `position`, `hash` and `actor` (event topics); `projectid` and `attempt` (jobs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CloudEvent {
    /// Always "1.0".
    pub specversion: String,
    /// Unique per event: the log's event id (consumers dedupe by it).
    pub id: String,
    /// `/amplog/projects/{project}` (or `/amplog` for events outside a project).
    pub source: String,
    /// `amplog.{aggregate}.{Event}.v{version}`, e.g. `amplog.installation.Created.v1.0`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The aggregate id (the Kafka key).
    pub subject: String,
    /// When the event was recorded.
    pub time: DateTime<Utc>,
    pub datacontenttype: String,
    /// The event's payload, upcast to the version named in `type`.
    pub data: Value,
    /// The project the event belongs to: the only tenant a consumer may trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projectid: Option<Uuid>,
    /// The event's sequence in its aggregate's stream (1, 2, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<i64>,
    /// The event's position in the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<i64>,
    /// The hex SHA-256 of the stream's hash chain at this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Who sent the command that recorded the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Any other extension attribute (dead letters carry `errorcode`).
    #[serde(flatten, default)]
    pub extensions: BTreeMap<String, Value>,
}

impl CloudEvent {
    /// The envelope of one logged event, its payload upcast to the current version.
    pub fn from_recorded(event: &RecordedEvent, store: &EventStore) -> Self {
        Self::from_event(event.clone(), store)
    }

    /// `from_recorded`, consuming the event (no copy of its payload).
    pub fn from_event(event: RecordedEvent, store: &EventStore) -> Self {
        let (version, data) =
            store.upcast(&event.aggregate_type, &event.event_type, &event.event_version, event.payload);
        Self {
            specversion: "1.0".into(),
            id: event.event_id.to_string(),
            source: source(event.project_id),
            event_type: event_type(&event.aggregate_type, &event.event_type, &version),
            subject: event.aggregate_id,
            time: event.recorded_at,
            datacontenttype: "application/json".into(),
            data,
            projectid: event.project_id,
            sequence: Some(event.sequence),
            position: Some(event.position),
            hash: event.hash.as_deref().map(hex::encode),
            actor: actor(event.metadata),
            extensions: BTreeMap::new(),
        }
    }

    /// The serialised envelope of one stored event: the same JSON as
    /// `from_event(event.parse()?, store).to_bytes()`. When no upcaster changes the event,
    /// its stored payload text goes into `data` as it is (checked to be JSON, not parsed
    /// into values and serialised again): the relay's hot path.
    pub fn encode_stored(event: &StoredEvent, store: &EventStore) -> Result<Vec<u8>, CommandError> {
        if store.upcasts(&event.aggregate_type, &event.event_type, &event.event_version) {
            return Ok(Self::from_event(event.clone().parse()?, store).to_bytes());
        }
        let corrupt = |what: &str, e| CommandError::corrupt(format!("event {what}"), e);
        let data: &RawValue = serde_json::from_str(&event.payload).map_err(|e| corrupt("payload", e))?;
        let metadata: Value = serde_json::from_str(&event.metadata).map_err(|e| corrupt("metadata", e))?;
        let envelope = StoredEnvelope {
            specversion: "1.0",
            id: event.event_id,
            source: source(event.project_id),
            event_type: event_type(&event.aggregate_type, &event.event_type, &event.event_version),
            subject: &event.aggregate_id,
            time: &event.recorded_at,
            datacontenttype: "application/json",
            data,
            projectid: event.project_id,
            sequence: event.sequence,
            position: event.position,
            hash: event.hash.as_deref().map(hex::encode),
            actor: actor(metadata),
        };
        Ok(serde_json::to_vec(&envelope).expect("an envelope always serialises"))
    }

    /// Parses a message value, refusing anything that is not a CloudEvents 1.0 envelope.
    pub fn parse(bytes: &[u8]) -> Result<Self, crate::StreamsError> {
        let event: Self = serde_json::from_slice(bytes).map_err(|e| crate::StreamsError::Envelope(e.to_string()))?;
        if event.specversion != "1.0" {
            return Err(crate::StreamsError::Envelope(format!("specversion {}", event.specversion)));
        }
        Ok(event)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serialises")
    }
}

/// `CloudEvent`'s serialised shape (same members, same order), borrowing from a stored
/// event.
#[derive(Serialize)]
struct StoredEnvelope<'a> {
    specversion: &'static str,
    id: Uuid,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    subject: &'a str,
    time: &'a DateTime<Utc>,
    datacontenttype: &'static str,
    data: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    projectid: Option<Uuid>,
    sequence: i64,
    position: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    actor: Option<String>,
}

/// The one metadata member an envelope carries.
fn actor(metadata: Value) -> Option<String> {
    match metadata {
        Value::Object(mut map) => match map.remove("actor") {
            Some(Value::String(actor)) => Some(actor),
            _ => None,
        },
        _ => None,
    }
}

pub fn source(project: Option<Uuid>) -> String {
    match project {
        Some(project) => format!("/amplog/projects/{project}"),
        None => "/amplog".into(),
    }
}

/// `amplog.{aggregate}.{Event}.v{version}`.
pub fn event_type(aggregate_type: &str, event_type: &str, version: &str) -> String {
    format!("amplog.{aggregate_type}.{event_type}.v{version}")
}
