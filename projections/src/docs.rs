//! The documents the read-model tables store, one struct per table. Every field comes
//! from events (never from the projector's clock), so a rebuild writes the same bytes.

use amplog_domain::installation::ObjectConfig;
use amplog_domain::integration::ObjectDecl;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LastOperation {
    pub operation_id: Uuid,
    pub op_type: String,
    pub object: String,
    pub status: String,
    pub at: DateTime<Utc>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IntegrationDoc {
    pub integration_id: Uuid,
    pub project_id: Uuid,
    pub name: String,
    pub provider: String,
    /// The newest deployed revision and its objects; `None` before the first deploy.
    pub latest_revision: Option<u32>,
    pub objects: Vec<ObjectDecl>,
    pub manifest_digest: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InstallationDoc {
    pub installation_id: Uuid,
    pub project_id: Uuid,
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
    pub objects: BTreeMap<String, ObjectConfig>,
    pub last_operation: Option<LastOperation>,
    pub last_successful_read: BTreeMap<String, DateTime<Utc>>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl InstallationDoc {
    pub fn refresh_health(&mut self) {
        self.health = if matches!(self.connection_status.as_str(), "bad_credentials" | "revoked") {
            "needs_reauth"
        } else if self.last_operation.as_ref().is_some_and(|op| op.status == "failed") {
            "degraded"
        } else {
            "healthy"
        }
        .to_string();
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectionDoc {
    pub connection_id: Uuid,
    pub project_id: Uuid,
    pub integration_id: Uuid,
    pub provider: String,
    pub group_ref: String,
    pub status: String,
    pub credential_fingerprint: String,
    pub last_refresh_at: Option<DateTime<Utc>>,
    pub failure_reason: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OperationDoc {
    pub operation_id: Uuid,
    pub project_id: Uuid,
    pub installation_id: Uuid,
    pub op_type: String,
    pub object: String,
    pub trigger: String,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub status: String,
    pub attempts: u32,
    pub pages: u64,
    pub records: u64,
    pub bytes: u64,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    pub requested_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    /// Deliveries of pages to the destination: every attempt, and the failed ones.
    #[serde(default)]
    pub delivery_attempts: u64,
    #[serde(default)]
    pub delivery_failures: u64,
    /// Failed after all its attempts (a dead letter), until retried or replayed.
    #[serde(default)]
    pub dead_lettered: bool,
    /// A proxy call's HTTP status from the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// The operation stream's sequence this document reflects (subscriptions compare it).
    pub version: i64,
}

/// Where a sync worker resumes one object of one installation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadStateDoc {
    pub installation_id: Uuid,
    pub object: String,
    pub watermark: Option<DateTime<Utc>>,
    pub page_token: Option<String>,
    /// `backfill` until the first successful read, then `incremental`.
    pub mode: String,
    pub records_read: u64,
    pub last_success_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageDoc {
    pub project_id: Uuid,
    pub installation_id: Uuid,
    pub day: NaiveDate,
    pub records_read: u64,
    pub records_written: u64,
    pub bytes: u64,
    pub proxy_calls: u64,
    /// Request and response bytes of proxy calls.
    #[serde(default)]
    pub proxy_bytes: u64,
    /// Finished operations by `"<type>.<status>"`.
    pub operations: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamDoc {
    pub installation_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: Uuid,
}
