//! The GraphQL output types: read-model documents as builders see them.

use amplog_projections::docs::*;
use async_graphql::{Enum, InputValueError, InputValueResult, Json, Scalar, ScalarType, SimpleObject, Value};
use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

/// A 64-bit signed integer: counts, bytes, durations, log positions and sequences, which
/// can pass GraphQL's 32-bit `Int`. Serialized as a JSON number; accepted as a number or a
/// string of digits. (JavaScript clients read values above 2^53 exactly only as BigInt.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Int64(pub i64);

/// A 64-bit signed integer (counts, bytes, log positions), serialized as a JSON number;
/// GraphQL's `Int` is 32-bit.
#[Scalar(name = "Int64")]
impl ScalarType for Int64 {
    fn parse(value: Value) -> InputValueResult<Self> {
        let parsed = match &value {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse().ok(),
            _ => return Err(InputValueError::expected_type(value)),
        };
        parsed.map(Int64).ok_or_else(|| InputValueError::custom("not a 64-bit integer"))
    }

    fn to_value(&self) -> Value {
        Value::Number(self.0.into())
    }
}

impl From<i64> for Int64 {
    fn from(n: i64) -> Self {
        Int64(n)
    }
}

impl From<u64> for Int64 {
    fn from(n: u64) -> Self {
        Int64(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct ObjectDeclaration {
    pub name: String,
    pub schedule: Option<String>,
    /// `none`, `days` or `full`.
    pub backfill: String,
    pub backfill_days: Option<u32>,
    pub fields: Vec<String>,
}

fn backfill_parts(b: &amplog_domain::integration::Backfill) -> (String, Option<u32>) {
    use amplog_domain::integration::Backfill;
    match b {
        Backfill::None => ("none".into(), None),
        Backfill::Days(d) => ("days".into(), Some(*d)),
        Backfill::Full => ("full".into(), None),
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Integration {
    pub id: Uuid,
    pub name: String,
    pub provider: String,
    pub latest_revision: Option<u32>,
    pub objects: Vec<ObjectDeclaration>,
    pub manifest_digest: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl From<IntegrationDoc> for Integration {
    fn from(d: IntegrationDoc) -> Self {
        Integration {
            id: d.integration_id,
            name: d.name,
            provider: d.provider,
            latest_revision: d.latest_revision,
            objects: d
                .objects
                .into_iter()
                .map(|o| {
                    let (backfill, backfill_days) = backfill_parts(&o.backfill);
                    ObjectDeclaration { name: o.name, schedule: o.schedule, backfill, backfill_days, fields: o.fields }
                })
                .collect(),
            manifest_digest: d.manifest_digest,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Degraded,
    NeedsReauth,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::NeedsReauth => "needs_reauth",
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct InstallationObject {
    pub name: String,
    pub enabled: bool,
    pub schedule: String,
    pub backfill: String,
    pub backfill_days: Option<u32>,
    pub last_successful_read: Option<DateTime<Utc>>,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct LastOperationSummary {
    pub operation_id: Uuid,
    pub op_type: String,
    pub object: String,
    pub status: String,
    pub at: DateTime<Utc>,
}

#[derive(SimpleObject, Clone, Debug)]
#[graphql(complex)]
pub struct Installation {
    pub id: Uuid,
    pub integration_id: Uuid,
    pub revision: u32,
    pub group_ref: String,
    pub consumer_ref: String,
    pub connection_id: Uuid,
    pub connection_status: String,
    /// `healthy`, `degraded` (the last operation failed) or `needs_reauth`.
    pub health: String,
    pub paused: bool,
    pub deleted: bool,
    pub objects: Vec<InstallationObject>,
    pub last_operation: Option<LastOperationSummary>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl From<InstallationDoc> for Installation {
    fn from(d: InstallationDoc) -> Self {
        let objects = d
            .objects
            .iter()
            .map(|(name, o)| {
                let (backfill, backfill_days) = backfill_parts(&o.backfill);
                InstallationObject {
                    name: name.clone(),
                    enabled: o.enabled,
                    schedule: o.schedule.clone(),
                    backfill,
                    backfill_days,
                    last_successful_read: d.last_successful_read.get(name).copied(),
                }
            })
            .collect();
        Installation {
            id: d.installation_id,
            integration_id: d.integration_id,
            revision: d.revision,
            group_ref: d.group_ref,
            consumer_ref: d.consumer_ref,
            connection_id: d.connection_id,
            connection_status: d.connection_status,
            health: d.health,
            paused: d.paused,
            deleted: d.deleted,
            objects,
            last_operation: d.last_operation.map(|l| LastOperationSummary {
                operation_id: l.operation_id,
                op_type: l.op_type,
                object: l.object,
                status: l.status,
                at: l.at,
            }),
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Connection {
    pub id: Uuid,
    pub integration_id: Uuid,
    pub provider: String,
    pub group_ref: String,
    /// `created`, `working`, `bad_credentials` or `revoked`.
    pub status: String,
    /// A keyed fingerprint of the stored credentials (never the credentials).
    pub credential_fingerprint: String,
    pub last_refresh_at: Option<DateTime<Utc>>,
    pub failure_reason: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl From<ConnectionDoc> for Connection {
    fn from(d: ConnectionDoc) -> Self {
        Connection {
            id: d.connection_id,
            integration_id: d.integration_id,
            provider: d.provider,
            group_ref: d.group_ref,
            status: d.status,
            credential_fingerprint: d.credential_fingerprint,
            last_refresh_at: d.last_refresh_at,
            failure_reason: d.failure_reason,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
#[graphql(complex)]
pub struct Operation {
    pub id: Uuid,
    pub installation_id: Uuid,
    /// `read`, `write` or `proxy`.
    pub op_type: String,
    pub object: String,
    pub trigger: String,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// `pending`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    pub attempts: u32,
    pub pages: Int64,
    pub records: Int64,
    pub bytes: Int64,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    pub requested_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<Int64>,
    /// Page deliveries to the destination: every attempt, and the failed ones.
    pub delivery_attempts: Int64,
    pub delivery_failures: Int64,
    /// Failed after all its attempts (a dead letter): `replayDeadLetter` runs it again.
    pub dead_lettered: bool,
    /// A proxy call's status from the provider.
    pub http_status: Option<i32>,
    /// The operation stream's sequence this state reflects.
    pub version: Int64,
}

/// One record's outcome in a write operation.
#[derive(SimpleObject, Clone, Debug, serde::Deserialize)]
pub struct WriteResult {
    /// The record's place in the mutation's list.
    pub index: u32,
    pub ok: bool,
    /// The provider's id of the record written.
    pub id: Option<String>,
    pub error: Option<String>,
}

impl From<OperationDoc> for Operation {
    fn from(d: OperationDoc) -> Self {
        Operation {
            id: d.operation_id,
            installation_id: d.installation_id,
            op_type: d.op_type,
            object: d.object,
            trigger: d.trigger,
            since: d.since,
            until: d.until,
            status: d.status,
            attempts: d.attempts,
            pages: Int64::from(d.pages),
            records: Int64::from(d.records),
            bytes: Int64::from(d.bytes),
            error_class: d.error_class,
            error_message: d.error_message,
            requested_at: d.requested_at,
            started_at: d.started_at,
            finished_at: d.finished_at,
            duration_ms: (d.duration_ms).map(Int64::from),
            delivery_attempts: Int64::from(d.delivery_attempts),
            delivery_failures: Int64::from(d.delivery_failures),
            dead_lettered: d.dead_lettered,
            http_status: d.http_status.map(i32::from),
            version: Int64::from(d.version),
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct ReadState {
    pub object: String,
    pub watermark: Option<DateTime<Utc>>,
    pub page_token: Option<String>,
    /// `backfill` until the first successful read, then `incremental`.
    pub mode: String,
    pub records_read: Int64,
    pub last_success_at: Option<DateTime<Utc>>,
}

impl From<ReadStateDoc> for ReadState {
    fn from(d: ReadStateDoc) -> Self {
        ReadState {
            object: d.object,
            watermark: d.watermark,
            page_token: d.page_token,
            mode: d.mode,
            records_read: Int64::from(d.records_read),
            last_success_at: d.last_success_at,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Count {
    pub key: String,
    pub count: Int64,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct UsageDay {
    pub installation_id: Uuid,
    pub day: NaiveDate,
    pub records_read: Int64,
    pub records_written: Int64,
    pub bytes: Int64,
    pub proxy_calls: Int64,
    /// Request and response bytes of proxy calls.
    pub proxy_bytes: Int64,
    /// Finished operations by `<type>.<status>`.
    pub operations: Vec<Count>,
}

impl From<UsageDoc> for UsageDay {
    fn from(d: UsageDoc) -> Self {
        UsageDay {
            installation_id: d.installation_id,
            day: d.day,
            records_read: Int64::from(d.records_read),
            records_written: Int64::from(d.records_written),
            bytes: Int64::from(d.bytes),
            proxy_calls: Int64::from(d.proxy_calls),
            proxy_bytes: Int64::from(d.proxy_bytes),
            operations: d.operations.into_iter().map(|(key, n)| Count { key, count: Int64::from(n as i64) }).collect(),
        }
    }
}

/// A month of the project's usage: what billing charges for.
#[derive(SimpleObject, Clone, Debug)]
pub struct BillingMonth {
    /// `YYYY-MM`.
    pub month: String,
    pub records_read: Int64,
    pub records_written: Int64,
    pub bytes: Int64,
    pub proxy_calls: Int64,
    /// Request and response bytes of proxy calls.
    pub proxy_bytes: Int64,
    pub operations: Vec<Count>,
    /// Installations with any activity in the month.
    pub active_installations: Int64,
}

impl From<amplog_projections::usage::MonthlyUsage> for BillingMonth {
    fn from(m: amplog_projections::usage::MonthlyUsage) -> Self {
        BillingMonth {
            month: m.month,
            records_read: Int64::from(m.records_read),
            records_written: Int64::from(m.records_written),
            bytes: Int64::from(m.bytes),
            proxy_calls: Int64::from(m.proxy_calls),
            proxy_bytes: Int64::from(m.proxy_bytes),
            operations: m.operations.into_iter().map(|(key, count)| Count { key, count: Int64::from(count) }).collect(),
            active_installations: Int64::from(m.active_installations),
        }
    }
}

/// One event of the log as auditors see it: in GraphQL histories and, one per line, in the
/// NDJSON export (which leaves out `actor`, already in the metadata).
#[derive(SimpleObject, serde::Serialize)]
pub struct AuditEvent {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: Int64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Json<serde_json::Value>,
    pub metadata: Json<serde_json::Value>,
    /// Who sent the command (from the metadata).
    #[serde(skip)]
    pub actor: Option<String>,
    pub position: Int64,
    pub transaction_id: String,
    pub recorded_at: DateTime<Utc>,
    /// The stream's chain hash at this event (hex).
    pub hash: Option<String>,
}

impl From<amplog_log::RecordedEvent> for AuditEvent {
    fn from(e: amplog_log::RecordedEvent) -> Self {
        AuditEvent {
            actor: e.metadata.get("actor").and_then(|a| a.as_str()).map(str::to_string),
            event_id: e.event_id,
            aggregate_type: e.aggregate_type,
            aggregate_id: e.aggregate_id,
            sequence: Int64::from(e.sequence),
            event_type: e.event_type,
            event_version: e.event_version,
            payload: Json(e.payload),
            metadata: Json(e.metadata),
            position: Int64::from(e.position),
            transaction_id: e.transaction_id.to_string(),
            recorded_at: e.recorded_at,
            hash: e.hash.map(hex::encode),
        }
    }
}

/// A project's OAuth client at one provider. The client secret is never readable back: its
/// fingerprint tells two secrets apart.
#[derive(SimpleObject, Clone, Debug)]
pub struct ProviderApp {
    pub id: Uuid,
    pub provider: String,
    pub client_id: String,
    pub secret_fingerprint: String,
    pub scopes: Vec<String>,
    /// Where connect sessions may return the user to.
    pub return_urls: Vec<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl ProviderApp {
    pub fn of(app: amplog_domain::provider_app::ProviderApp) -> Option<ProviderApp> {
        let config = app.config.filter(|_| app.exists)?;
        Some(ProviderApp {
            id: amplog_domain::provider_app::ProviderApp::id_for(app.project_id, &app.provider),
            provider: app.provider,
            client_id: config.client_id,
            secret_fingerprint: config.secret.fingerprint,
            scopes: config.scopes,
            return_urls: config.return_urls,
            created_at: app.created_at,
            updated_at: app.updated_at,
        })
    }
}

/// A connect link just made: send the end user to `url` before `expiresAt`.
#[derive(SimpleObject, Clone, Debug)]
pub struct ConnectSessionCreated {
    pub id: Uuid,
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

/// Where an end user's connect session stands.
#[derive(SimpleObject, Clone, Debug)]
pub struct ConnectSession {
    pub id: Uuid,
    /// `open`, `authorizing`, `connected`, `completed` or `expired`.
    pub status: String,
    pub integration_id: Uuid,
    pub group_ref: String,
    pub consumer_ref: String,
    pub return_url: Option<String>,
    /// The connection it connects or reconnects, once connected.
    pub connection_id: Option<Uuid>,
    pub installation_id: Option<Uuid>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Attempts the provider refused (the user denied, the code did not exchange).
    pub failures: u32,
    pub last_failure: Option<String>,
}

impl ConnectSession {
    pub fn of(id: Uuid, session: &amplog_domain::connect_session::ConnectSession) -> Option<ConnectSession> {
        let request = session.request.clone().filter(|_| session.exists)?;
        Some(ConnectSession {
            id,
            status: crate::connect::status_of(session).into(),
            integration_id: request.integration_id.0,
            group_ref: request.group_ref,
            consumer_ref: request.consumer_ref,
            return_url: request.return_url,
            connection_id: session.connection_id.map(|c| c.0),
            installation_id: session.installation_id.map(|i| i.0),
            expires_at: session.expires_at,
            failures: session.failures,
            last_failure: session.last_failure.clone(),
        })
    }
}
