//! Lifecycle notifications, derived from the log: which events make which topics
//! (`amplog_domain::notification::TOPICS`), and each notification's body, in the Standard
//! Webhooks shape `{type, timestamp, data}` (a JSON Schema per topic under
//! `streams/schemas/`). The webhook notifier and the relay (`amplog.notifications.v1`) both
//! derive them here, so both say the same; on Kafka each is a CloudEvent keyed by
//! installation (or connection, or project).

use crate::StreamsError;
use amplog_domain::connect_session::{ConnectSession, ConnectSessionEvent};
use amplog_domain::connection::{Connection, ConnectionEvent};
use amplog_domain::installation::{Installation, InstallationEvent};
use amplog_domain::operation::{Operation, OperationEvent, OperationType, Trigger};
use amplog_domain::project::{Project, ProjectEvent};
use amplog_log::{EventStore, RecordedEvent};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// A notification's body.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct Notification {
    /// The topic.
    #[serde(rename = "type")]
    pub topic: String,
    /// When the event it comes from was recorded.
    pub timestamp: DateTime<Utc>,
    pub data: NotificationData,
}

#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum NotificationData {
    Installation(InstallationNotice),
    Connection(ConnectionNotice),
    Operation(OperationNotice),
    Destination(DestinationNotice),
    ConnectSession(ConnectSessionNotice),
}

/// `installation.*`: the installation, and on `created` what it is.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct InstallationNotice {
    pub installation_id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub integration_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_ref: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer_ref: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<Uuid>,
    /// On `created` and `updated`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
}

/// `connection.*`.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct ConnectionNotice {
    pub connection_id: Uuid,
    /// On `created`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub integration_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_ref: Option<String>,
    /// On `needs_reauth`: what the provider said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `read.*`, `write.*`, `operation.dead_lettered`.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct OperationNotice {
    pub operation_id: Uuid,
    pub installation_id: Uuid,
    /// `read` or `write`.
    pub op_type: String,
    pub object: String,
    /// `scheduled`, `triggered` or `backfill`.
    pub trigger: String,
    /// On success: what it moved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages: Option<u64>,
    /// On failure: the error class (`provider5xx`, `auth_invalidated`, ...) and message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `destination.disabled`.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct DestinationNotice {
    pub destination: String,
    pub reason: String,
}

/// `connect_session.completed`.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct ConnectSessionNotice {
    pub session_id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub installation_id: Option<Uuid>,
}

/// A notification with where it comes from and what orders it.
#[derive(Clone, Debug, PartialEq)]
pub struct Derived {
    pub project_id: Uuid,
    pub event_id: Uuid,
    /// The installation (or, for a connection, the connection; for a destination, the
    /// project): the Kafka key, and what orders notifications about one thing.
    pub key: Uuid,
    pub installation_id: Option<Uuid>,
    pub notification: Notification,
}

impl Derived {
    /// Its id, stable across restarts and rebuilds: from the event and the topic (a
    /// subscription's deliveries qualify it with the subscription).
    pub fn id(&self) -> Uuid {
        let mut name = self.event_id.as_bytes().to_vec();
        name.extend_from_slice(self.notification.topic.as_bytes());
        Uuid::new_v5(&Uuid::NAMESPACE_OID, &name)
    }
}

impl Derived {
    /// Its CloudEvent on `amplog.notifications.v1`: the same body as the webhook's, `id`
    /// stable (`Derived::id`), `subject` the key, `eventid` the event it comes from.
    pub fn to_cloud_event(&self) -> crate::envelope::CloudEvent {
        let mut extensions = std::collections::BTreeMap::new();
        extensions.insert("eventid".to_string(), Value::String(self.event_id.to_string()));
        crate::envelope::CloudEvent {
            specversion: "1.0".into(),
            id: self.id().to_string(),
            source: format!("/amplog/projects/{}", self.project_id),
            event_type: format!("amplog.notification.{}.v1", self.notification.topic),
            subject: self.key.to_string(),
            time: self.notification.timestamp,
            datacontenttype: "application/json".into(),
            data: serde_json::to_value(&self.notification).expect("notifications serialise"),
            projectid: Some(self.project_id),
            sequence: None,
            position: None,
            hash: None,
            actor: None,
            traceparent: None,
            extensions,
        }
    }
}

fn name_of<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// Whether an event can make a notification, by its kind alone (no decoding).
pub fn notifies<J>(event: &RecordedEvent<J>) -> bool {
    matches!(
        (event.aggregate_type.as_str(), event.event_type.as_str()),
        ("installation", "Created" | "ConfigUpdated" | "Paused" | "Unpaused" | "Deleted")
            | ("connection", "Created" | "RefreshFailed" | "Reconnected" | "Revoked")
            | ("operation", "Succeeded" | "Failed")
            | ("project", "DestinationDisabled")
            | ("connect_session", "Completed")
    )
}

/// The notifications an event makes (none for most), reading the operation's request when
/// an operation finished.
pub async fn derive(
    conn: &mut PgConnection,
    store: &EventStore,
    event: &RecordedEvent,
) -> Result<Vec<Derived>, StreamsError> {
    let Some(project_id) = event.project_id.filter(|_| notifies(event)) else { return Ok(vec![]) };
    let id: Uuid = event.aggregate_id.parse().unwrap_or_default();
    let (t, v, payload) = (event.event_type.as_str(), event.event_version.as_str(), event.payload.clone());
    let made = |topic: &str, key: Uuid, installation_id: Option<Uuid>, data: NotificationData| Derived {
        project_id,
        event_id: event.event_id,
        key,
        installation_id,
        notification: Notification { topic: topic.into(), timestamp: event.recorded_at, data },
    };
    let out = match event.aggregate_type.as_str() {
        "installation" => {
            let notice = |revision| InstallationNotice {
                installation_id: id,
                integration_id: None,
                group_ref: None,
                consumer_ref: None,
                connection_id: None,
                revision,
            };
            let (topic, notice) = match store.decode::<Installation>(t, v, payload)? {
                InstallationEvent::Created {
                    integration_id, revision, group_ref, consumer_ref, connection_id, ..
                } => (
                    "installation.created",
                    InstallationNotice {
                        integration_id: Some(integration_id.0),
                        group_ref: Some(group_ref),
                        consumer_ref: Some(consumer_ref),
                        connection_id: Some(connection_id.0),
                        ..notice(Some(revision))
                    },
                ),
                InstallationEvent::ConfigUpdated { revision, .. } => ("installation.updated", notice(Some(revision))),
                InstallationEvent::Paused { .. } => ("installation.paused", notice(None)),
                InstallationEvent::Unpaused { .. } => ("installation.unpaused", notice(None)),
                InstallationEvent::Deleted { .. } => ("installation.deleted", notice(None)),
                InstallationEvent::OperationRequested { .. } => return Ok(vec![]),
            };
            vec![made(topic, id, Some(id), NotificationData::Installation(notice))]
        }
        "connection" => {
            let notice = ConnectionNotice {
                connection_id: id,
                integration_id: None,
                provider: None,
                group_ref: None,
                reason: None,
            };
            let (topic, notice) = match store.decode::<Connection>(t, v, payload)? {
                ConnectionEvent::Created { integration_id, provider, group_ref, .. } => (
                    "connection.created",
                    ConnectionNotice {
                        integration_id: Some(integration_id.0),
                        provider: Some(provider),
                        group_ref: Some(group_ref),
                        ..notice
                    },
                ),
                ConnectionEvent::RefreshFailed { reason, .. } => {
                    ("connection.needs_reauth", ConnectionNotice { reason: Some(reason), ..notice })
                }
                ConnectionEvent::Reconnected { .. } => ("connection.reconnected", notice),
                ConnectionEvent::Revoked { .. } => ("connection.revoked", notice),
                ConnectionEvent::TokenRefreshed { .. } => return Ok(vec![]),
            };
            vec![made(topic, id, None, NotificationData::Connection(notice))]
        }
        "operation" => {
            let finished = store.decode::<Operation>(t, v, payload)?;
            let OperationEvent::Requested { installation_id, op_type, object, trigger, .. } =
                crate::jobs::first_event(conn, store, &event.aggregate_id).await?
            else {
                return Ok(vec![]);
            };
            let kind = match op_type {
                OperationType::Read => "read",
                OperationType::Write => "write",
                OperationType::Proxy => return Ok(vec![]),
            };
            let notice = OperationNotice {
                operation_id: id,
                installation_id: installation_id.0,
                op_type: kind.into(),
                object,
                trigger: name_of(&trigger),
                records: None,
                pages: None,
                error_class: None,
                message: None,
            };
            let inst = installation_id.0;
            let op = |topic: &str, notice: &OperationNotice| {
                made(topic, inst, Some(inst), NotificationData::Operation(notice.clone()))
            };
            match finished {
                OperationEvent::Succeeded { records, pages, .. } => {
                    let notice = OperationNotice { records: Some(records), pages: Some(pages), ..notice };
                    let mut out = vec![op(&format!("{kind}.succeeded"), &notice)];
                    if kind == "read" && trigger == Trigger::Backfill {
                        out.push(op("read.backfill_done", &notice));
                    }
                    out
                }
                OperationEvent::Failed { error_class, message, retryable, .. } => {
                    let notice =
                        OperationNotice { error_class: Some(name_of(&error_class)), message: Some(message), ..notice };
                    let mut out = vec![op(&format!("{kind}.failed"), &notice)];
                    if retryable {
                        out.push(op("operation.dead_lettered", &notice));
                    }
                    out
                }
                _ => vec![],
            }
        }
        "project" => match store.decode::<Project>(t, v, payload)? {
            ProjectEvent::DestinationDisabled { name, reason, .. } => {
                let notice = DestinationNotice { destination: name, reason };
                vec![made("destination.disabled", project_id, None, NotificationData::Destination(notice))]
            }
            _ => vec![],
        },
        "connect_session" => match store.decode::<ConnectSession>(t, v, payload)? {
            ConnectSessionEvent::Completed { installation_id, .. } => {
                let installation = installation_id.map(|i| i.0);
                let notice = ConnectSessionNotice { session_id: id, installation_id: installation };
                let key = installation.unwrap_or(id);
                vec![made("connect_session.completed", key, installation, NotificationData::ConnectSession(notice))]
            }
            _ => vec![],
        },
        _ => vec![],
    };
    Ok(out)
}
