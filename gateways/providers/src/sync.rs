//! The sync worker's job handler: runs read and write operations against providers.
//!
//! A read resumes where the operation stands (its last recorded page token) or, for a new
//! operation, from its `since` or the installation object's read-state watermark minus an
//! overlap window. Page by page it reads from the provider, delivers the page to the
//! object's destination (a signed webhook, retried with backoff, every attempt recorded),
//! and records the delivered page with its new cursor in one command: a worker killed at
//! any point resumes from the last recorded page, and a page delivered but not recorded is
//! delivered again under the same `webhook-id`. The next page is fetched while the current
//! one is delivered. Provider failures are classified: a 429
//! parks the read until Retry-After (no attempt is spent), a 401 refreshes the token once,
//! 5xx and timeouts retry with backoff and jitter, a lost cursor restarts from the
//! watermark, anything else fails the operation with its class.

use crate::connector::{Connector, Connectors, ProviderError, ProviderPage, TokenSet, WriteResult};
use crate::tokens::Tokens;
use crate::webhook::{deliver, DeliveryPolicy};
use crate::worker::{backoff, JobContext, JobFailure, JobHandler};
use amplog_commands::destinations::{self, Destination, DEFAULT_DESTINATION};
use amplog_commands::{CommandError, CommandService};
use amplog_domain::installation::Installation;
use amplog_domain::integration::Integration;
use amplog_domain::operation::{Cursor, DeliveryAttempt, ErrorClass, Operation, OperationType, PageRecord};
use amplog_domain::{DomainError, LeaseId, OperationId};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// How reads behave.
#[derive(Clone, Debug)]
pub struct SyncPolicy {
    /// Incremental reads start this long before the watermark (clock skew, late commits at
    /// the provider).
    pub overlap: chrono::TimeDelta,
    /// Retries of one provider call on 5xx / timeouts before the attempt fails.
    pub provider_retries: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// A 429 parks the read for Retry-After, at most this long at a time.
    pub max_park: Duration,
    pub delivery: DeliveryPolicy,
}

impl Default for SyncPolicy {
    fn default() -> Self {
        Self {
            overlap: chrono::TimeDelta::minutes(5),
            provider_retries: 4,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            max_park: Duration::from_secs(120),
            delivery: DeliveryPolicy::default(),
        }
    }
}

/// Reads and writes for sync workers (both transports: Kafka or in-process).
pub struct SyncHandler {
    connectors: Connectors,
    tokens: Tokens,
    http: reqwest::Client,
    pub policy: SyncPolicy,
}

fn failure(class: ErrorClass, message: impl Into<String>, retryable: bool) -> JobFailure {
    JobFailure { class, message: message.into(), retryable }
}

/// A provider's failure as the job's: transient classes are worth another attempt.
fn classified(error: ProviderError) -> JobFailure {
    let retryable = matches!(
        error.class,
        ErrorClass::Provider5xx | ErrorClass::Timeout | ErrorClass::RateLimited | ErrorClass::Internal
    );
    failure(error.class, error.message, retryable)
}

fn internal(error: impl std::fmt::Display) -> JobFailure {
    failure(ErrorClass::Internal, error.to_string(), true)
}

/// A command refused because this worker no longer holds the lease (or the operation was
/// cancelled) stops the job: the worker records nothing more.
fn recorded(result: Result<amplog_commands::CommandOutcome, CommandError>) -> Result<(), JobFailure> {
    match result {
        Ok(_) => Ok(()),
        Err(CommandError::Domain(DomainError::Operation(e))) => {
            Err(failure(ErrorClass::Internal, format!("the operation moved on: {e}"), false))
        }
        Err(e) => Err(internal(e)),
    }
}

/// A record as delivered, with `idempotencyKey`: the same for every delivery of this
/// version of the record (installation, object, id, modification time), whichever page or
/// read carries it, so a receiver dedupes records re-read by an overlap window.
#[derive(serde::Serialize)]
struct DeliveredRecord<'a> {
    #[serde(flatten)]
    record: &'a crate::connector::ProviderRecord,
    #[serde(rename = "idempotencyKey")]
    idempotency_key: String,
}

fn delivered_record<'a>(job: &JobContext<'_>, record: &'a crate::connector::ProviderRecord) -> DeliveredRecord<'a> {
    use sha2::Digest;
    let mut identity = sha2::Sha256::new();
    identity.update(job.message.job.installation_id.0.as_bytes());
    for part in [job.message.job.object.as_str(), record.id.as_str()] {
        identity.update((part.len() as u64).to_be_bytes());
        identity.update(part.as_bytes());
    }
    identity.update(record.updated.timestamp_micros().to_be_bytes());
    let digest = identity.finalize();
    DeliveredRecord { record, idempotency_key: format!("rec_{}", hex::encode(&digest[..16])) }
}

/// What a read needs, loaded once per attempt.
struct ReadPlan {
    connector: Arc<Connector>,
    destination: Destination,
    group_ref: String,
}

impl SyncHandler {
    pub fn new(service: CommandService, connectors: Connectors) -> SyncHandler {
        // Standard Webhooks: a 3xx is a failed delivery. Followed, a 301/302 turns the POST
        // into a bodyless GET that the target may well answer 200: the egress client follows
        // none, and connects only to addresses the deployment's rule allows.
        let http = connectors.egress().client().build().expect("the HTTP client builds");
        SyncHandler { connectors, tokens: Tokens::new(service), http, policy: SyncPolicy::default() }
    }

    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// Whether a read may deliver to its destination: checked once per attempt, before any
    /// page is read (a write delivers nothing and is not checked).
    fn deliverable(&self, destination: &Destination) -> Result<(), JobFailure> {
        let refused = |why: String| {
            let message = format!("destination `{}` may not be delivered to: {why}", destination.name);
            failure(ErrorClass::DestinationUnavailable, message, false)
        };
        if let Some(why) = &destination.disabled {
            return Err(refused(format!("it is disabled ({why}); create it again to enable it")));
        }
        let url = reqwest::Url::parse(&destination.url).map_err(|e| refused(e.to_string()))?;
        self.connectors.egress().check(&url).map_err(refused)
    }

    async fn plan(&self, job: &JobContext<'_>) -> Result<ReadPlan, JobFailure> {
        let (service, ctx) = (job.service, job.command);
        let installation =
            service.load::<Installation>(ctx, job.message.job.installation_id.0).await.map_err(internal)?.state;
        if !installation.exists || installation.deleted {
            return Err(failure(ErrorClass::BadRequest, "the installation is deleted", false));
        }
        let integration =
            service.load::<Integration>(ctx, installation.integration_id.0).await.map_err(internal)?.state;
        let object = &job.message.job.object;
        let decl = integration.revision(installation.revision).and_then(|r| r.objects.get(object));
        let destination_name = decl.and_then(|d| d.destination.clone()).unwrap_or_else(|| DEFAULT_DESTINATION.into());
        let connector = self.connectors.get(&integration.provider).ok_or_else(|| {
            failure(
                ErrorClass::BadRequest,
                format!("no connector for provider `{}` in the catalog", integration.provider),
                false,
            )
        })?;
        let destination = destinations::get(service.pool(), service.credentials(), ctx.project_id, &destination_name)
            .await
            .map_err(internal)?
            .ok_or_else(|| {
                failure(ErrorClass::BadRequest, format!("the project has no destination `{destination_name}`"), false)
            })?;
        Ok(ReadPlan { connector, destination, group_ref: installation.group_ref })
    }

    /// One provider call (`call` gets the connection's token set), through the policy every
    /// call shares: a 429 parks until Retry-After (the worker renews the lease), a refused token is
    /// refreshed once, 5xx and timeouts retry with backoff and jitter; anything else is the
    /// job's failure, classified.
    async fn call_provider<T, F, Fut>(
        &self,
        job: &JobContext<'_>,
        connector: &Connector,
        call: F,
    ) -> Result<T, JobFailure>
    where
        F: Fn(Arc<TokenSet>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let connection = job.message.job.connection_id;
        let seed = job.message.job.operation_id.0.as_u128() as u64;
        let mut rejected: Option<String> = None;
        let mut tries = 0;
        loop {
            let tokens = self
                .tokens
                .access_token(job.command, connection, connector, rejected.as_deref())
                .await
                .map_err(classified)?;
            let access_token = tokens.access_token.clone();
            let error = match call(tokens).await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            match error.class {
                ErrorClass::RateLimited => {
                    let wait = error.retry_after.unwrap_or(Duration::from_secs(1)).min(self.policy.max_park);
                    tracing::debug!(wait_ms = wait.as_millis() as u64, "rate limited: parked until Retry-After");
                    tokio::time::sleep(wait).await;
                }
                ErrorClass::AuthInvalidated if rejected.as_deref() != Some(access_token.as_str()) => {
                    // Expired or revoked access token: refresh once, then try again.
                    tracing::debug!("access token refused: refreshing");
                    rejected = Some(access_token);
                }
                ErrorClass::Provider5xx | ErrorClass::Timeout if tries < self.policy.provider_retries => {
                    tries += 1;
                    tokio::time::sleep(backoff(self.policy.backoff, self.policy.max_backoff, tries, seed)).await;
                }
                _ => return Err(classified(error)),
            }
        }
    }

    /// One provider page.
    async fn fetch(
        &self,
        job: &JobContext<'_>,
        connector: &Connector,
        since: Option<DateTime<Utc>>,
        page_token: Option<&str>,
    ) -> Result<ProviderPage, JobFailure> {
        use tracing::Instrument;
        let object = &job.message.job.object;
        let span = tracing::info_span!(
            "provider.page",
            provider = %connector.name,
            object = %object,
            records = tracing::field::Empty,
            more = tracing::field::Empty,
        );
        let page = self
            .call_provider(job, connector, |tokens| async move {
                connector.read_page(&tokens, object, since, page_token).await
            })
            .instrument(span.clone())
            .await;
        if let Ok(page) = &page {
            span.record("records", page.records.len());
            span.record("more", page.next.is_some());
        }
        page
    }

    async fn read(&self, job: JobContext<'_>) -> Result<(), JobFailure> {
        let (service, ctx, lease) = (job.service, job.command, job.lease);
        let operation_id = job.message.job.operation_id;
        let plan = self.plan(&job).await?;
        self.deliverable(&plan.destination)?;
        let mut prefetched = None;
        let operation = service.load::<Operation>(ctx, operation_id.0).await.map_err(internal)?.state;
        let mut pages = operation.pages;
        let mut watermark = operation.cursor.watermark;
        let mut page_token = operation.cursor.page_token.clone();
        let state_watermark = match job.message.job.since {
            Some(_) => None,
            None => self.read_state_watermark(&job).await?,
        };
        let since = job.message.job.since.or(state_watermark.map(|w| w - self.policy.overlap));
        // A resumed read goes on from its page token (or its watermark, if the provider lost
        // the token); a fresh one starts from `since`, and its watermark never goes back.
        let mut start = if pages > 0 { watermark.map(|w| w - self.policy.overlap).or(since) } else { since };
        if pages == 0 {
            watermark = state_watermark.or(since);
        } else if page_token.is_none() {
            // The last page is recorded (a worker died before recording the success).
            return Ok(());
        }
        loop {
            let fetched = match prefetched.take() {
                Some(fetched) => fetched,
                None => self.fetch(&job, &plan.connector, start, page_token.as_deref()).await,
            };
            let page = match fetched {
                Ok(page) => page,
                Err(error) if error.class == ErrorClass::CursorGone && page_token.is_some() => {
                    tracing::warn!(operation = %operation_id, "the provider lost the cursor: restarting from the watermark");
                    page_token = None;
                    start = watermark.map(|w| w - self.policy.overlap).or(start);
                    continue;
                }
                Err(error) => return Err(error),
            };
            if page.records.is_empty() && page.next.is_none() {
                if pages == 0 && watermark.is_some() && watermark != state_watermark {
                    // Nothing changed since `since`: that is where the next read starts, so
                    // record it (a page of no records, nothing to deliver).
                    let cursor = Cursor { watermark, page_token: None };
                    recorded(service.record_page(ctx, operation_id, lease, 0, 0, &cursor).await)?;
                }
                return Ok(());
            }
            if let Some(max) = page.records.iter().map(|r| r.updated).max() {
                watermark = Some(watermark.map_or(max, |w| w.max(max)));
            }
            pages += 1;
            // Records no newer than the read state's watermark were delivered by an earlier
            // read (the overlap window re-reads them for late writes): not counted again.
            let reread = page.records.iter().filter(|r| state_watermark.is_some_and(|w| r.updated <= w)).count();
            let record = PageRecord {
                records: page.records.len() as u64,
                bytes: page.bytes,
                cursor: Cursor { watermark, page_token: page.next.clone() },
                reread: reread as u64,
            };
            let Some(next) = page.next.clone() else {
                self.deliver_page(&job, &plan, operation_id, lease, pages, &page, record).await?;
                return Ok(());
            };
            // The next page is fetched while this one is delivered; it is used only after
            // this one is recorded, so a worker that dies still resumes from here.
            let (delivered, next_page) = tokio::join!(
                self.deliver_page(&job, &plan, operation_id, lease, pages, &page, record),
                self.fetch(&job, &plan.connector, start, Some(&next)),
            );
            delivered?;
            page_token = Some(next);
            prefetched = Some(next_page);
        }
    }

    async fn read_state_watermark(&self, job: &JobContext<'_>) -> Result<Option<DateTime<Utc>>, JobFailure> {
        let (project, pool) = (job.command.project_id.0, job.service.pool());
        let job = &job.message.job;
        amplog_projections::queries::read_watermark(pool, project, job.installation_id.0, &job.object)
            .await
            .map_err(internal)
    }

    /// Delivers page `page` until the destination takes it, recording every attempt; the
    /// successful one is recorded with the page and its cursor.
    #[allow(clippy::too_many_arguments)]
    async fn deliver_page(
        &self,
        job: &JobContext<'_>,
        plan: &ReadPlan,
        operation_id: OperationId,
        lease: LeaseId,
        page: u64,
        read: &ProviderPage,
        record: PageRecord,
    ) -> Result<(), JobFailure> {
        let webhook_id = format!("msg_{}_{page}", operation_id.0.simple());
        let body = serde_json::to_vec(&json!({
            "type": "read.page",
            "installationId": job.message.job.installation_id,
            "groupRef": plan.group_ref,
            "object": job.message.job.object,
            "operationId": operation_id,
            "page": page,
            "records": read.records.iter().map(|r| delivered_record(job, r)).collect::<Vec<_>>(),
        }))
        .map_err(internal)?;
        let policy = &self.policy.delivery;
        let seed = operation_id.0.as_u128() as u64 ^ page;
        // A destination that is down is not a failed read: after `max_attempts` quick tries
        // the read parks, retrying with a backoff that grows to `max_outage_backoff`, its
        // cursor kept and every attempt recorded, until the receiver answers (or the
        // operation is cancelled: the next record then fails).
        for attempt in 1u32.. {
            use tracing::Instrument;
            let span = tracing::info_span!(
                "webhook.deliver",
                destination = %plan.destination.name,
                page,
                attempt,
                status = tracing::field::Empty,
            );
            let outcome = deliver(&self.http, &plan.destination.url, &plan.destination.secret.0, &webhook_id, &body)
                .instrument(span.clone())
                .await;
            if let Some(status) = outcome.status {
                span.record("status", status);
            }
            amplog_log::telemetry::metrics().webhook_attempt(
                amplog_log::telemetry::WebhookKind::Records,
                &format!("{}/{}", job.command.project_id.0, plan.destination.name),
                outcome.delivered(),
            );
            let delivery = DeliveryAttempt {
                webhook_id: webhook_id.clone(),
                destination: plan.destination.name.clone(),
                page,
                attempt,
                status: outcome.status,
                error: outcome.error.clone(),
                delivered: outcome.delivered(),
            };
            if outcome.delivered() {
                return recorded(
                    job.service.record_delivered_page(job.command, operation_id, lease, &delivery, &record).await,
                );
            }
            recorded(job.service.record_delivery_failure(job.command, operation_id, lease, &delivery).await)?;
            if outcome.status == Some(410) {
                // Gone: the receiver says the endpoint will not come back; retrying is noise,
                // and so are other reads' deliveries: the destination is disabled.
                let reason = format!("answered 410 Gone to page {page} of operation {operation_id}");
                job.service
                    .disable_destination(job.command, &plan.destination.name, &reason)
                    .await
                    .map_err(internal)?;
                return Err(failure(
                    ErrorClass::DestinationUnavailable,
                    format!("destination `{}` answered 410 Gone for page {page}", plan.destination.name),
                    false,
                ));
            }
            let cap = if attempt < policy.max_attempts { policy.max_backoff } else { policy.max_outage_backoff };
            let wait = backoff(policy.backoff, cap, attempt, seed);
            if attempt >= policy.max_attempts {
                tracing::warn!(
                    operation = %operation_id, page, attempt, wait_s = wait.as_secs(),
                    destination = %plan.destination.name, "destination unavailable: the read is parked"
                );
            }
            tokio::time::sleep(wait).await;
        }
        unreachable!("the delivery loop returns")
    }

    /// A write: the records the mutation stored are written to the provider; each record's
    /// result is kept beside them, the counts go to the log.
    async fn write(&self, job: JobContext<'_>) -> Result<(), JobFailure> {
        let (service, ctx) = (job.service, job.command);
        let operation_id = job.message.job.operation_id;
        let operation = service.load::<Operation>(ctx, operation_id.0).await.map_err(internal)?.state;
        if operation.pages > 0 {
            // Written and recorded by an earlier attempt.
            return Ok(());
        }
        type Batch = (sqlx::types::Json<Vec<Value>>, Option<sqlx::types::Json<Vec<WriteResult>>>);
        let row: Option<Batch> =
            sqlx::query_as("SELECT records, results FROM write_batches WHERE operation_id = $1 AND project_id = $2")
                .bind(operation_id.0)
                .bind(ctx.project_id.0)
                .fetch_optional(service.pool())
                .await
                .map_err(internal)?;
        let Some((records, stored)) = row else {
            return Err(failure(ErrorClass::BadRequest, "the write operation has no records", false));
        };
        if let Some(results) = stored {
            // Written by an attempt that died before recording: record, do not write again.
            return self.record_write(&job, &records.0, &results.0).await;
        }
        let plan = self.plan(&job).await?;
        let (connector, object) = (&plan.connector, &job.message.job.object);
        let results = self
            .call_provider(&job, connector, |tokens| {
                let records = &records.0;
                async move { connector.write(&tokens, object, records).await }
            })
            .await?;
        sqlx::query("UPDATE write_batches SET results = $2 WHERE operation_id = $1")
            .bind(operation_id.0)
            .bind(sqlx::types::Json(&results))
            .execute(service.pool())
            .await
            .map_err(internal)?;
        self.record_write(&job, &records.0, &results).await
    }

    /// Records a write's counts (the per-record results are in `write_batches`).
    async fn record_write(
        &self,
        job: &JobContext<'_>,
        records: &[Value],
        results: &[WriteResult],
    ) -> Result<(), JobFailure> {
        let written = results.iter().filter(|r| r.ok).count() as u64;
        let bytes = serde_json::to_vec(records).map(|b| b.len() as u64).unwrap_or_default();
        let operation_id = job.message.job.operation_id;
        recorded(
            job.service.record_page(job.command, operation_id, job.lease, written, bytes, &Cursor::default()).await,
        )?;
        let failed = results.len() as u64 - written;
        if failed > 0 && written == 0 {
            return Err(failure(ErrorClass::BadRequest, format!("all {failed} records were refused"), false));
        }
        Ok(())
    }
}

impl JobHandler for SyncHandler {
    async fn run(&self, job: JobContext<'_>) -> Result<(), JobFailure> {
        match job.message.job.op_type {
            OperationType::Read => self.read(job).await,
            OperationType::Write => self.write(job).await,
            OperationType::Proxy => {
                Err(failure(ErrorClass::BadRequest, "proxy operations are not run by sync workers", false))
            }
        }
    }
}
