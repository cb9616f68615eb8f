//! Operation: one read, write or proxy job of an installation.
//! `pending → running → succeeded | failed | cancelled`; a failed operation can be retried
//! (back to pending), and one that failed after all its attempts (a dead letter) replayed. A
//! proxy call is recorded once it is over, as one event (`Proxied`), and never runs again. A running operation is held by a lease: only its holder may
//! record pages or finish it, and an expired lease may be taken over (fencing).

use crate::aggregate::{Aggregate, DomainEvent};
use crate::ids::{ConnectionId, InstallationId, LeaseId, ProjectId};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationType {
    Read,
    Write,
    Proxy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Scheduled,
    Triggered,
    Backfill,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationStatus {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl OperationStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// Why an operation failed; decides the retry policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    RateLimited,
    AuthInvalidated,
    Provider5xx,
    CursorGone,
    BadRequest,
    Timeout,
    /// The destination (webhook endpoint) kept refusing a page.
    DestinationUnavailable,
    Internal,
}

/// Where a read resumes: a watermark (last modified time seen) and a provider page token.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Cursor {
    pub watermark: Option<DateTime<Utc>>,
    pub page_token: Option<String>,
}

/// One attempt to deliver a page to a destination (a webhook endpoint), as recorded in the
/// operation's stream: every attempt, failed or not, is an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeliveryAttempt {
    /// The Standard Webhooks `webhook-id`: the same for every attempt of one page.
    pub webhook_id: String,
    /// The destination's name.
    pub destination: String,
    /// The page's number in the operation (1, 2, ...).
    pub page: u64,
    /// 1, 2, ... for this page.
    pub attempt: u32,
    /// The endpoint's HTTP status, if it answered.
    pub status: Option<u16>,
    /// Why the attempt failed (`None` when delivered).
    pub error: Option<String>,
    pub delivered: bool,
}

/// One page of a read or write, as a worker reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PageRecord {
    pub records: u64,
    pub bytes: u64,
    pub cursor: Cursor,
    /// Of `records`, those read again: modified no later than the read state's watermark
    /// (an incremental read re-reads an overlap window for late writes). Usage counts
    /// `records - reread`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reread: u64,
}

/// One call through the proxy, as recorded: never bodies, headers, tokens or the query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProxyCall {
    pub method: String,
    /// The provider path called (below the connector's base URL), without the query.
    pub path: String,
    /// The provider's HTTP status; none when it never answered.
    pub status: Option<u16>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub duration_ms: u64,
    /// Set when the call failed: the provider's error status or no answer.
    pub error_class: Option<ErrorClass>,
    /// The provider refused the token: it was refreshed and the call sent again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refreshed: bool,
    /// The caller went away before the response's end.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub aborted: bool,
}

/// The longest method and path a proxy call records.
pub const PROXY_METHOD_MAX: usize = 16;
pub const PROXY_PATH_MAX: usize = 2048;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub enum OperationCommand {
    Request {
        project_id: ProjectId,
        installation_id: InstallationId,
        connection_id: ConnectionId,
        op_type: OperationType,
        object: String,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        trigger: Trigger,
        at: DateTime<Utc>,
    },
    Start {
        lease_id: LeaseId,
        lease_until: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    RecordPage {
        lease_id: LeaseId,
        records: u64,
        bytes: u64,
        cursor: Cursor,
        at: DateTime<Utc>,
    },
    /// Pages a worker buffered and flushes at once: one `PageRecorded` event each.
    RecordPages {
        lease_id: LeaseId,
        pages: Vec<PageRecord>,
        at: DateTime<Utc>,
    },
    /// The holder extends its lease (a long read), so no other worker takes it over.
    RenewLease {
        lease_id: LeaseId,
        lease_until: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    /// The holder gives the operation up unfinished (its worker is stopping cleanly): another
    /// worker may start it at once instead of waiting for the lease to end.
    ReleaseLease {
        lease_id: LeaseId,
        at: DateTime<Utc>,
    },
    /// A delivery attempt that failed (the page is not recorded yet).
    RecordDeliveryFailure {
        lease_id: LeaseId,
        delivery: DeliveryAttempt,
        at: DateTime<Utc>,
    },
    /// A page delivered: its last (successful) delivery attempt and the page with its new
    /// cursor, in one append, so a worker that dies before it resumes from the page before.
    RecordDeliveredPage {
        lease_id: LeaseId,
        delivery: DeliveryAttempt,
        page: PageRecord,
        at: DateTime<Utc>,
    },
    Succeed {
        lease_id: LeaseId,
        at: DateTime<Utc>,
    },
    Fail {
        lease_id: LeaseId,
        error_class: ErrorClass,
        message: String,
        retryable: bool,
        at: DateTime<Utc>,
    },
    /// An operator retries a failed operation (not a proxy call).
    Retry {
        at: DateTime<Utc>,
    },
    /// An operator replays a dead letter: an operation that failed after all its attempts.
    ReplayDeadLetter {
        at: DateTime<Utc>,
    },
    /// Records a finished proxy call as a new operation.
    RecordProxyCall {
        project_id: ProjectId,
        installation_id: InstallationId,
        connection_id: ConnectionId,
        call: ProxyCall,
        at: DateTime<Utc>,
    },
    Cancel {
        reason: String,
        at: DateTime<Utc>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum OperationEvent {
    Requested {
        project_id: ProjectId,
        installation_id: InstallationId,
        connection_id: ConnectionId,
        op_type: OperationType,
        object: String,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        trigger: Trigger,
        at: DateTime<Utc>,
    },
    Started {
        attempt: u32,
        lease_id: LeaseId,
        lease_until: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    /// Version 2.0: `records` (was `count`), `bytes` (new) and a structured `cursor` (was a
    /// bare page token). See `upcast::page_recorded_v1_to_v2`.
    PageRecorded {
        lease_id: LeaseId,
        records: u64,
        bytes: u64,
        cursor: Cursor,
        at: DateTime<Utc>,
        /// Of `records`, those read again (see `PageRecord::reread`); absent when none.
        #[serde(default, skip_serializing_if = "is_zero")]
        reread: u64,
    },
    DeliveryAttempted {
        lease_id: LeaseId,
        delivery: DeliveryAttempt,
        at: DateTime<Utc>,
    },
    LeaseRenewed {
        lease_id: LeaseId,
        lease_until: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    /// The holder gave the operation up unfinished; it stays running, held by nobody, and
    /// the next `Started` continues from its cursor.
    LeaseReleased {
        lease_id: LeaseId,
        at: DateTime<Utc>,
    },
    Succeeded {
        records: u64,
        pages: u64,
        at: DateTime<Utc>,
    },
    Failed {
        error_class: ErrorClass,
        message: String,
        retryable: bool,
        at: DateTime<Utc>,
    },
    Retried {
        at: DateTime<Utc>,
    },
    /// A dead letter replayed: dispatched again like a retry, resuming from its cursor.
    DeadLetterReplayed {
        at: DateTime<Utc>,
    },
    /// A proxy call, recorded once it was over (`at`: when it ended); the stream's only event.
    Proxied {
        project_id: ProjectId,
        installation_id: InstallationId,
        connection_id: ConnectionId,
        call: ProxyCall,
        at: DateTime<Utc>,
    },
    Cancelled {
        reason: String,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for OperationEvent {
    fn event_version(&self) -> &'static str {
        match self {
            OperationEvent::PageRecorded { .. } => "2.0",
            _ => "1.0",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OperationError {
    #[error("the operation already exists")]
    AlreadyExists,
    #[error("no such operation")]
    NotFound,
    #[error("the operation is already running under a live lease")]
    LeaseHeld,
    #[error("the operation is not running")]
    NotRunning,
    #[error("the lease is not the operation's current lease")]
    StaleLease,
    #[error("the operation already finished as {0:?}")]
    AlreadyFinished(OperationStatus),
    #[error("the operation has not failed")]
    NotFailed,
    #[error("a proxy call is not retried: send it again")]
    NotRetryable,
    #[error("the operation is not a dead letter (it did not fail after all its attempts)")]
    NotDeadLettered,
    #[error("a proxy call records a method of 1 to 16 characters and a path of 1 to 2,048 bytes")]
    InvalidProxyCall,
    #[error("`since` must be before `until`")]
    InvalidWindow,
    #[error("an operation needs an object (or a path, for proxy)")]
    MissingObject,
    #[error("a lease must end after it starts")]
    InvalidLease,
    #[error("a batch of pages must not be empty")]
    NoPages,
    #[error("a delivery attempt must name page {expected}, the operation's next page")]
    WrongPage { expected: u64 },
    #[error("a recorded page's delivery must be a successful one, and a failure a failed one")]
    DeliveryMismatch,
}

impl OperationError {
    /// The variant's stable code (part of the public `extensions.code`: renaming a variant
    /// must not change it).
    pub fn code(&self) -> &'static str {
        match self {
            OperationError::AlreadyExists => "already_exists",
            OperationError::NotFound => "not_found",
            OperationError::LeaseHeld => "lease_held",
            OperationError::NotRunning => "not_running",
            OperationError::StaleLease => "stale_lease",
            OperationError::AlreadyFinished(_) => "already_finished",
            OperationError::NotFailed => "not_failed",
            OperationError::NotRetryable => "not_retryable",
            OperationError::NotDeadLettered => "not_dead_lettered",
            OperationError::InvalidProxyCall => "invalid_proxy_call",
            OperationError::InvalidWindow => "invalid_window",
            OperationError::MissingObject => "missing_object",
            OperationError::InvalidLease => "invalid_lease",
            OperationError::NoPages => "no_pages",
            OperationError::WrongPage { .. } => "wrong_page",
            OperationError::DeliveryMismatch => "delivery_mismatch",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Lease {
    pub id: LeaseId,
    pub until: DateTime<Utc>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Operation {
    pub exists: bool,
    pub project_id: ProjectId,
    pub installation_id: InstallationId,
    pub op_type: Option<OperationType>,
    pub object: String,
    pub status: OperationStatus,
    pub attempts: u32,
    pub lease: Option<Lease>,
    pub pages: u64,
    pub records: u64,
    pub bytes: u64,
    pub cursor: Cursor,
    pub error_class: Option<ErrorClass>,
    pub retryable: bool,
    pub requested_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Operation {
    fn exists(&self) -> Result<(), OperationError> {
        if self.exists {
            Ok(())
        } else {
            Err(OperationError::NotFound)
        }
    }

    /// The operation must be running under exactly this lease.
    fn holder(&self, lease_id: LeaseId) -> Result<(), OperationError> {
        self.exists()?;
        match self.status {
            OperationStatus::Running => {}
            s if s.is_terminal() => return Err(OperationError::AlreadyFinished(s)),
            _ => return Err(OperationError::NotRunning),
        }
        match &self.lease {
            Some(lease) if lease.id == lease_id => Ok(()),
            _ => Err(OperationError::StaleLease),
        }
    }
}

impl Operation {
    /// A delivery attempt must be for the next page, and say whether it delivered as the
    /// command does.
    fn next_page(&self, delivery: &DeliveryAttempt, delivered: bool) -> Result<(), OperationError> {
        if delivery.page != self.pages + 1 {
            return Err(OperationError::WrongPage { expected: self.pages + 1 });
        }
        if delivery.delivered != delivered || delivered != delivery.error.is_none() {
            return Err(OperationError::DeliveryMismatch);
        }
        Ok(())
    }
}

impl Aggregate for Operation {
    const TYPE: &'static str = "operation";
    type Command = OperationCommand;
    type Event = OperationEvent;
    type Error = OperationError;

    fn decide(&self, command: &OperationCommand) -> Result<Vec<OperationEvent>, OperationError> {
        use OperationCommand as C;
        use OperationEvent as E;
        match command {
            C::Request { project_id, installation_id, connection_id, op_type, object, since, until, trigger, at } => {
                if self.exists {
                    return Err(OperationError::AlreadyExists);
                }
                if object.trim().is_empty() {
                    return Err(OperationError::MissingObject);
                }
                if let (Some(since), Some(until)) = (since, until) {
                    if since >= until {
                        return Err(OperationError::InvalidWindow);
                    }
                }
                Ok(vec![E::Requested {
                    project_id: *project_id,
                    installation_id: *installation_id,
                    connection_id: *connection_id,
                    op_type: *op_type,
                    object: object.clone(),
                    since: *since,
                    until: *until,
                    trigger: *trigger,
                    at: *at,
                }])
            }
            C::Start { lease_id, lease_until, at } => {
                self.exists()?;
                match self.status {
                    OperationStatus::Pending => {}
                    OperationStatus::Running => {
                        // A crashed worker's lease may be taken over once it has expired.
                        if self.lease.as_ref().is_some_and(|l| l.until > *at) {
                            return Err(OperationError::LeaseHeld);
                        }
                    }
                    s => return Err(OperationError::AlreadyFinished(s)),
                }
                if lease_until <= at {
                    return Err(OperationError::InvalidLease);
                }
                Ok(vec![E::Started {
                    attempt: self.attempts + 1,
                    lease_id: *lease_id,
                    lease_until: *lease_until,
                    at: *at,
                }])
            }
            C::RecordPage { lease_id, records, bytes, cursor, at } => {
                self.holder(*lease_id)?;
                Ok(vec![E::PageRecorded {
                    lease_id: *lease_id,
                    records: *records,
                    bytes: *bytes,
                    cursor: cursor.clone(),
                    at: *at,
                    reread: 0,
                }])
            }
            C::RecordPages { lease_id, pages, at } => {
                self.holder(*lease_id)?;
                if pages.is_empty() {
                    return Err(OperationError::NoPages);
                }
                Ok(pages
                    .iter()
                    .map(|p| E::PageRecorded {
                        lease_id: *lease_id,
                        records: p.records,
                        bytes: p.bytes,
                        cursor: p.cursor.clone(),
                        at: *at,
                        reread: p.reread.min(p.records),
                    })
                    .collect())
            }
            C::RenewLease { lease_id, lease_until, at } => {
                self.holder(*lease_id)?;
                if lease_until <= at {
                    return Err(OperationError::InvalidLease);
                }
                Ok(vec![E::LeaseRenewed { lease_id: *lease_id, lease_until: *lease_until, at: *at }])
            }
            C::ReleaseLease { lease_id, at } => {
                self.holder(*lease_id)?;
                Ok(vec![E::LeaseReleased { lease_id: *lease_id, at: *at }])
            }
            C::RecordDeliveryFailure { lease_id, delivery, at } => {
                self.holder(*lease_id)?;
                self.next_page(delivery, false)?;
                Ok(vec![E::DeliveryAttempted { lease_id: *lease_id, delivery: delivery.clone(), at: *at }])
            }
            C::RecordDeliveredPage { lease_id, delivery, page, at } => {
                self.holder(*lease_id)?;
                self.next_page(delivery, true)?;
                Ok(vec![
                    E::DeliveryAttempted { lease_id: *lease_id, delivery: delivery.clone(), at: *at },
                    E::PageRecorded {
                        lease_id: *lease_id,
                        records: page.records,
                        bytes: page.bytes,
                        cursor: page.cursor.clone(),
                        at: *at,
                        reread: page.reread.min(page.records),
                    },
                ])
            }
            C::Succeed { lease_id, at } => {
                self.holder(*lease_id)?;
                Ok(vec![E::Succeeded { records: self.records, pages: self.pages, at: *at }])
            }
            C::Fail { lease_id, error_class, message, retryable, at } => {
                self.holder(*lease_id)?;
                Ok(vec![E::Failed {
                    error_class: *error_class,
                    message: message.clone(),
                    retryable: *retryable,
                    at: *at,
                }])
            }
            C::Retry { at } => {
                self.exists()?;
                match self.status {
                    OperationStatus::Failed if self.op_type == Some(OperationType::Proxy) => {
                        Err(OperationError::NotRetryable)
                    }
                    OperationStatus::Failed => Ok(vec![E::Retried { at: *at }]),
                    _ => Err(OperationError::NotFailed),
                }
            }
            C::ReplayDeadLetter { at } => {
                self.exists()?;
                match self.status {
                    OperationStatus::Failed if self.retryable => Ok(vec![E::DeadLetterReplayed { at: *at }]),
                    OperationStatus::Failed => Err(OperationError::NotDeadLettered),
                    _ => Err(OperationError::NotFailed),
                }
            }
            C::RecordProxyCall { project_id, installation_id, connection_id, call, at } => {
                if self.exists {
                    return Err(OperationError::AlreadyExists);
                }
                let method_ok = (1..=PROXY_METHOD_MAX).contains(&call.method.len());
                if !method_ok || call.path.is_empty() || call.path.len() > PROXY_PATH_MAX {
                    return Err(OperationError::InvalidProxyCall);
                }
                Ok(vec![E::Proxied {
                    project_id: *project_id,
                    installation_id: *installation_id,
                    connection_id: *connection_id,
                    call: call.clone(),
                    at: *at,
                }])
            }
            C::Cancel { reason, at } => {
                self.exists()?;
                if self.status.is_terminal() {
                    return Err(OperationError::AlreadyFinished(self.status));
                }
                Ok(vec![E::Cancelled { reason: reason.clone(), at: *at }])
            }
        }
    }

    fn apply(&mut self, event: &OperationEvent) {
        use OperationEvent as E;
        match event {
            E::Requested { project_id, installation_id, op_type, object, at, .. } => {
                *self = Operation {
                    exists: true,
                    project_id: *project_id,
                    installation_id: *installation_id,
                    op_type: Some(*op_type),
                    object: object.clone(),
                    requested_at: Some(*at),
                    ..Operation::default()
                }
            }
            E::Started { attempt, lease_id, lease_until, at } => {
                self.status = OperationStatus::Running;
                self.attempts = *attempt;
                self.lease = Some(Lease { id: *lease_id, until: *lease_until });
                self.started_at.get_or_insert(*at);
            }
            E::PageRecorded { records, bytes, cursor, .. } => {
                self.pages += 1;
                self.records += records;
                self.bytes += bytes;
                self.cursor = cursor.clone();
            }
            E::DeliveryAttempted { .. } => {}
            E::LeaseRenewed { lease_id, lease_until, .. } => {
                self.lease = Some(Lease { id: *lease_id, until: *lease_until });
            }
            E::LeaseReleased { .. } => self.lease = None,
            E::Succeeded { at, .. } => {
                self.status = OperationStatus::Succeeded;
                self.lease = None;
                self.finished_at = Some(*at);
            }
            E::Failed { error_class, retryable, at, .. } => {
                self.status = OperationStatus::Failed;
                self.lease = None;
                self.error_class = Some(*error_class);
                self.retryable = *retryable;
                self.finished_at = Some(*at);
            }
            E::Retried { .. } | E::DeadLetterReplayed { .. } => {
                self.status = OperationStatus::Pending;
                self.finished_at = None;
            }
            E::Proxied { project_id, installation_id, call, at, .. } => {
                let took = chrono::TimeDelta::milliseconds(call.duration_ms.min(86_400_000) as i64);
                let started = at.checked_sub_signed(took).unwrap_or(*at);
                *self = Operation {
                    exists: true,
                    project_id: *project_id,
                    installation_id: *installation_id,
                    op_type: Some(OperationType::Proxy),
                    object: format!("{} {}", call.method, call.path),
                    status: match call.error_class {
                        None => OperationStatus::Succeeded,
                        Some(_) => OperationStatus::Failed,
                    },
                    attempts: 1,
                    bytes: call.request_bytes + call.response_bytes,
                    error_class: call.error_class,
                    requested_at: Some(started),
                    started_at: Some(started),
                    finished_at: Some(*at),
                    ..Operation::default()
                }
            }
            E::Cancelled { at, .. } => {
                self.status = OperationStatus::Cancelled;
                self.lease = None;
                self.finished_at = Some(*at);
            }
        }
    }
}
