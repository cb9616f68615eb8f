//! The sync worker, shared by both transports: lease the operation (fencing), run the
//! handler, retry transient failures with backoff and jitter, record the outcome with one
//! command, dead-letter a job that keeps failing, give jobs in hand up when stopping. Its
//! transports: a Kafka consumer group (`amplog_streams::jobs::run_kafka_worker`, through
//! `JobProcessor`) or the in-process dispatch from the log (`InProcessDispatch`, the
//! embedded default's), whose checkpoint moves only after a job's outcome is recorded.

use crate::SyncError;
use amplog_commands::{CommandContext, CommandError, CommandService};
use amplog_domain::operation::{ErrorClass, Operation, OperationError, OperationStatus};
use amplog_domain::{DomainError, InstallationId, LeaseId, OperationId};
use amplog_log::leader::{run_as_leader, Leadership};
use amplog_log::{EventStore, LogCursor, LogReader};
use amplog_streams::jobs::{job_for, Ack, JobMessage, JobProcessor};
use chrono::Utc;
use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// The in-process dispatcher's singleton and checkpoint name.
pub const JOB_DISPATCH: &str = "job_dispatch";

/// Why a handler could not do a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobFailure {
    pub class: ErrorClass,
    pub message: String,
    /// Transient: worth another attempt.
    pub retryable: bool,
}

/// What a handler gets: the job, its tenant, the lease it runs under (to record pages with
/// `CommandService::record_pages`) and the attempt number (1, 2, ...).
pub struct JobContext<'a> {
    pub message: &'a JobMessage,
    pub lease: LeaseId,
    /// How long the lease holds; a long job renews it (`CommandService::renew_lease`).
    pub lease_for: Duration,
    pub attempt: u32,
    pub service: &'a CommandService,
    pub command: &'a CommandContext,
}

/// Does the work of a job (reads from a provider, writes to it, ...). The worker records the
/// outcome; the handler records pages as it goes.
pub trait JobHandler: Send + Sync + 'static {
    fn run(&self, job: JobContext<'_>) -> impl Future<Output = Result<(), JobFailure>> + Send;
}

/// How a worker leases and retries.
#[derive(Clone, Debug)]
pub struct WorkerPolicy {
    /// How long a lease holds the operation; a crashed worker's job is taken over after it.
    /// The holder renews it every third of that while the job runs, whatever the job is
    /// waiting for, so a short lease costs a live worker nothing.
    pub lease_for: Duration,
    /// Attempts before a job that keeps failing is dead-lettered.
    pub max_attempts: u32,
    /// The first retry's delay; doubled each attempt, with jitter, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for WorkerPolicy {
    fn default() -> Self {
        Self {
            lease_for: Duration::from_secs(10),
            max_attempts: 5,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl WorkerPolicy {
    fn delay(&self, attempt: u32, seed: u64) -> Duration {
        backoff(self.backoff, self.max_backoff, attempt, seed)
    }
}

/// The delay before retry `attempt` (1, 2, ...): `first` doubled each attempt, capped at
/// `max`, with jitter in [half, whole] from a cheap hash of `seed` and the attempt, so
/// retries of many jobs spread out. Shared by the worker and the sync handler's retries.
pub fn backoff(first: Duration, max: Duration, attempt: u32, seed: u64) -> Duration {
    let capped = first.saturating_mul(1 << attempt.saturating_sub(1).min(16)).min(max);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (seed, attempt).hash(&mut hasher);
    let fraction = (hasher.finish() % 1000) as f64 / 1000.0;
    capped.mul_f64(0.5 + fraction / 2.0)
}

/// What became of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disposition {
    Succeeded,
    /// Failed permanently; the operation records the class.
    Failed(ErrorClass),
    /// Already finished (a redelivery, or a cancelled operation): nothing was run.
    AlreadyFinished,
    /// Another worker took the operation over (this one's lease had expired).
    Superseded,
    /// The worker is stopping: the job was given up unfinished (its lease released, so
    /// another worker starts it at once) and must not be acknowledged.
    Released,
    /// Kept failing (the operation is recorded failed), or cannot be run at all: goes to the
    /// dead-letter topic (or table) with its error.
    DeadLetter {
        code: String,
        message: String,
    },
}

/// Runs jobs with a handler under a policy; shared by both transports.
pub struct Worker<H> {
    service: CommandService,
    handler: Arc<H>,
    pub policy: WorkerPolicy,
    pub name: String,
    /// Set once by `stop`: jobs in hand are given up (leases released), no new one starts.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Jobs in `process` right now.
    in_hand: tokio::sync::watch::Sender<usize>,
}

/// Counts a job in hand while it lives.
struct InHand<'a>(&'a tokio::sync::watch::Sender<usize>);

impl<'a> InHand<'a> {
    fn new(count: &'a tokio::sync::watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        Self(count)
    }
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl<H: JobHandler> Worker<H> {
    pub fn new(service: CommandService, handler: Arc<H>, name: impl Into<String>) -> Self {
        Self {
            service,
            handler,
            policy: WorkerPolicy::default(),
            name: name.into(),
            stopping: tokio::sync::watch::Sender::new(false),
            in_hand: tokio::sync::watch::Sender::new(0),
        }
    }

    pub fn service(&self) -> &CommandService {
        &self.service
    }

    /// Stops cleanly: every job in hand releases its lease at its next step (a job's work is
    /// cancelled between or inside pages; what was recorded stays, what was delivered but
    /// not recorded is delivered again under the same idempotency identity, as after a
    /// crash) and `process` answers `Released` from now on. `drained` says when it is done.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves once `stop` was called.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.subscribe();
        async move {
            let _ = stopping.wait_for(|s| *s).await;
        }
    }

    /// Resolves when no job is in hand.
    pub async fn drained(&self) {
        let _ = self.in_hand.subscribe().wait_for(|n| *n == 0).await;
    }

    /// Leases the job's operation, runs it, records its outcome. Infrastructure errors
    /// (database unreachable) come back as `Err`: the caller retries the same job later and
    /// must not acknowledge it.
    pub async fn process(&self, message: &JobMessage) -> Result<Disposition, SyncError> {
        use tracing::Instrument;
        // The job's span continues the trace of the command that dispatched it.
        let span = tracing::info_span!(
            "job",
            operation.id = %message.job.operation_id.0,
            installation.id = %message.job.installation_id.0,
            project.id = %message.project.0,
            op_type = ?message.job.op_type,
            object = %message.job.object,
            worker = %self.name,
            disposition = tracing::field::Empty,
        );
        amplog_log::telemetry::follow(&span, message.traceparent.as_deref());
        let disposition = self.process_in_span(message).instrument(span.clone()).await;
        if let Ok(outcome) = &disposition {
            span.record("disposition", tracing::field::debug(outcome));
            span.in_scope(|| tracing::info!(disposition = ?outcome, "job done"));
        }
        disposition
    }

    async fn process_in_span(&self, message: &JobMessage) -> Result<Disposition, SyncError> {
        let _in_hand = InHand::new(&self.in_hand);
        if *self.stopping.borrow() {
            return Ok(Disposition::Released);
        }
        let command = CommandContext::new(message.project, format!("worker:{}", self.name));
        let id = message.job.operation_id;
        let lease = LeaseId(Uuid::now_v7());
        let lease_for = chrono::TimeDelta::from_std(self.policy.lease_for)
            .map_err(|_| SyncError::Config("lease_for is too long".into()))?;
        loop {
            // Scoped to the envelope's project: another tenant's operation does not exist.
            let operation = self.service.load::<Operation>(&command, id.0).await?;
            let state = &operation.state;
            if !state.exists || state.installation_id != message.job.installation_id {
                return Ok(Disposition::DeadLetter {
                    code: "operation.not_found".into(),
                    message: format!(
                        "no operation {id} of installation {} in this project",
                        message.job.installation_id
                    ),
                });
            }
            if state.status == OperationStatus::Failed && state.retryable {
                // Recorded failed after its attempts, but the dead letter may not have been
                // sent (a crash in between): send it again; dead letters dedupe by id.
                let message: Option<String> = sqlx::query_scalar(
                    "SELECT payload->>'message' FROM events WHERE aggregate_type = 'operation'
                       AND aggregate_id = $1 AND event_type = 'Failed' ORDER BY sequence DESC LIMIT 1",
                )
                .bind(id.to_string())
                .fetch_optional(self.service.pool())
                .await?
                .flatten();
                let class = state.error_class.unwrap_or(ErrorClass::Internal);
                return Ok(Disposition::DeadLetter { code: class_code(class), message: message.unwrap_or_default() });
            }
            if state.status.is_terminal() {
                return Ok(Disposition::AlreadyFinished);
            }
            if !self.is_latest_dispatch(message).await? {
                // An older job of an operation since retried (redelivered because its offset
                // was never committed): the retry's own job runs it.
                return Ok(Disposition::Superseded);
            }
            match self.service.start_operation(&command, id, lease, lease_for).await {
                Ok(_) => {
                    if state.status == OperationStatus::Running {
                        amplog_log::telemetry::metrics().lease_takeover();
                    }
                    break;
                }
                Err(CommandError::Domain(DomainError::Operation(OperationError::LeaseHeld))) => {
                    // A crashed worker's lease: take the operation over when it expires.
                    let until = state.lease.as_ref().map(|l| l.until).unwrap_or_else(Utc::now);
                    let wait = (until - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(50);
                    tracing::info!(operation = %id, wait_ms = wait.as_millis() as u64, "operation leased elsewhere; waiting for the lease to expire");
                    tokio::select! {
                        _ = self.stopped() => return Ok(Disposition::Released),
                        _ = tokio::time::sleep(wait.min(self.policy.lease_for)) => {}
                    }
                }
                Err(CommandError::Conflict { .. }) => {}
                Err(CommandError::Domain(DomainError::Operation(OperationError::AlreadyFinished(_)))) => {
                    return Ok(Disposition::AlreadyFinished)
                }
                Err(error) => return Err(error.into()),
            }
        }
        let seed = id.0.as_u128() as u64;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let context = JobContext {
                message,
                lease,
                lease_for: self.policy.lease_for,
                attempt,
                service: &self.service,
                command: &command,
            };
            let run = tokio::select! {
                biased;
                _ = self.stopped() => None,
                run = self.renewing(&command, id, lease, self.handler.run(context)) => Some(run),
            };
            let Some(run) = run else { return self.release(&command, id, lease).await };
            let failure = match run {
                Ok(()) => {
                    return self
                        .record(self.service.succeed_operation(&command, id, lease).await, Disposition::Succeeded)
                }
                Err(failure) => failure,
            };
            tracing::warn!(operation = %id, attempt, class = ?failure.class, message = %failure.message, "job failed");
            if !failure.retryable {
                let outcome =
                    self.service.fail_operation(&command, id, lease, failure.class, &failure.message, false).await;
                return self.record(outcome, Disposition::Failed(failure.class));
            }
            if attempt >= self.policy.max_attempts {
                let message = format!("{} attempts: {}", attempt, failure.message);
                let outcome = self.service.fail_operation(&command, id, lease, failure.class, &message, true).await;
                return self.record(outcome, Disposition::DeadLetter { code: class_code(failure.class), message });
            }
            tokio::select! {
                _ = self.stopped() => return self.release(&command, id, lease).await,
                _ = tokio::time::sleep(self.policy.delay(attempt, seed)) => {}
            }
        }
    }

    /// Gives a job in hand up: its lease released, so another worker starts it at once.
    async fn release(
        &self,
        command: &CommandContext,
        id: OperationId,
        lease: LeaseId,
    ) -> Result<Disposition, SyncError> {
        tracing::info!(operation = %id, "stopping: the operation's lease is released");
        match self.service.release_lease(command, id, lease).await {
            Ok(_) | Err(CommandError::Domain(DomainError::Operation(_))) => Ok(Disposition::Released),
            Err(error) => Err(error.into()),
        }
    }

    /// Runs `work` while renewing the lease every third of its length, so a holder that is
    /// alive keeps its operation however long one step takes (a parked read, a slow page)
    /// and a dead one loses it within one lease. A renewal is never cancelled halfway: the
    /// renewer stops between renewals, and a lost lease is left to the outcome's fencing.
    async fn renewing<T>(
        &self,
        command: &CommandContext,
        id: OperationId,
        lease: LeaseId,
        work: impl Future<Output = T>,
    ) -> T {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let every = self.policy.lease_for / 3;
        let lease_for = chrono::TimeDelta::from_std(self.policy.lease_for).unwrap_or(chrono::TimeDelta::MAX);
        let renewer = async {
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match self.service.renew_lease(command, id, lease, lease_for).await {
                    Ok(_) => {}
                    Err(CommandError::Domain(DomainError::Operation(_))) => return, // lost or finished
                    Err(error) => tracing::warn!(operation = %id, %error, "renewing the lease failed; retrying"),
                }
            }
        };
        let work = async {
            let out = work.await;
            stop.send(true).ok();
            out
        };
        let (out, ()) = tokio::join!(work, renewer);
        out
    }

    /// Whether the job is its operation's latest dispatch (its `Requested` event, or the
    /// last `Retried` or `DeadLetterReplayed`).
    async fn is_latest_dispatch(&self, message: &JobMessage) -> Result<bool, SyncError> {
        let latest: Option<Uuid> = sqlx::query_scalar(
            "SELECT event_id FROM events WHERE aggregate_type = 'operation' AND aggregate_id = $1
               AND event_type IN ('Requested', 'Retried', 'DeadLetterReplayed') ORDER BY sequence DESC LIMIT 1",
        )
        .bind(message.job.operation_id.to_string())
        .fetch_optional(self.service.pool())
        .await?;
        Ok(latest.is_none_or(|id| id == message.event_id))
    }

    /// The outcome command's result: a lease lost meanwhile means another worker owns the
    /// operation now.
    fn record(
        &self,
        outcome: Result<amplog_commands::CommandOutcome, CommandError>,
        disposition: Disposition,
    ) -> Result<Disposition, SyncError> {
        match outcome {
            Ok(_) => Ok(disposition),
            Err(CommandError::Domain(DomainError::Operation(
                OperationError::StaleLease | OperationError::AlreadyFinished(_) | OperationError::NotRunning,
            ))) => Ok(Disposition::Superseded),
            Err(error) => Err(error.into()),
        }
    }
}

impl<H: JobHandler> JobProcessor for Worker<H> {
    type Error = SyncError;

    fn name(&self) -> &str {
        &self.name
    }

    async fn run_job(&self, job: &JobMessage) -> Result<Ack, SyncError> {
        let disposition = self.process(job).await?;
        Ok(match disposition {
            Disposition::DeadLetter { code, message } => Ack::DeadLetter { code, message },
            Disposition::Released => Ack::Leave,
            _ => Ack::Done,
        })
    }

    fn stop(&self) {
        Worker::stop(self);
    }

    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        Worker::stopped(self)
    }
}

/// The error class as its code (`provider5xx`, `rate_limited`, ...).
fn class_code(class: ErrorClass) -> String {
    serde_json::to_value(class).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| "internal".into())
}

/// Job dispatch without Kafka: reads the log from its checkpoint as the `job_dispatch`
/// leader and runs its jobs, each installation's in order, up to `lanes` installations at
/// once: one slow installation (a held lease, a parked delivery) never delays another's.
/// The checkpoint moves to just before the oldest job not yet recorded, so a new leader
/// redoes only unfinished work (a finished operation's job does nothing). At most
/// `max_in_flight` jobs are read ahead. Jobs that must be dead-lettered go to the
/// `dead_letters` table.
pub struct InProcessDispatch<H> {
    worker: Arc<Worker<H>>,
    store: EventStore,
    holder: String,
    pub lanes: usize,
    pub batch_size: i64,
    pub max_in_flight: usize,
}

/// A job read from the log, at its event's cursor.
struct Queued {
    job: JobMessage,
    at: LogCursor,
}

impl<H: JobHandler> InProcessDispatch<H> {
    pub fn new(worker: Arc<Worker<H>>, store: EventStore, holder: impl Into<String>) -> Self {
        Self { worker, store, holder: holder.into(), lanes: 4, batch_size: 500, max_in_flight: 2_000 }
    }

    /// Runs until `stop` resolves, leading whenever it can; after a failure it resumes
    /// from its checkpoint (jobs already recorded are not run again). On `stop` the worker
    /// stops and the jobs in hand release their leases before this returns; the checkpoint
    /// stays before them, so the next leader runs them at once.
    pub async fn run(&self, stop: impl Future<Output = ()>) -> Result<(), SyncError> {
        let pool = self.worker.service.pool();
        let pause = |_: &SyncError| Duration::from_secs(1);
        // The dispatch keeps running (its tasks releasing) until the worker is drained.
        let stop = async {
            stop.await;
            self.worker.stop();
            self.worker.drained().await;
        };
        run_as_leader(pool, JOB_DISPATCH, &self.holder, stop, pause, |l| self.dispatch_while_leading(l)).await;
        Ok(())
    }

    async fn dispatch_while_leading(&self, mut leadership: Leadership) -> Result<(), SyncError> {
        use std::collections::{HashMap, VecDeque};
        let pool = self.worker.service.pool().clone();
        let start = LogReader::checkpoint(&mut *pool.acquire().await?, JOB_DISPATCH).await?;
        let mut subscription = LogReader::new(pool.clone()).subscribe(start).await?;
        subscription.batch_size = self.batch_size;
        let (mut read_to, mut saved) = (start, start);
        // Jobs waiting per installation, installations ready to run (in arrival order),
        // unfinished jobs by cursor (with the cursor before each; a job that failed to be
        // recorded stays unfinished), running tasks.
        let mut waiting: HashMap<InstallationId, VecDeque<Queued>> = HashMap::new();
        let mut ready: VecDeque<InstallationId> = VecDeque::new();
        let mut running: std::collections::HashSet<InstallationId> = Default::default();
        let mut unfinished: BTreeMap<LogCursor, LogCursor> = BTreeMap::new();
        // A task's result: whether its job is finished (recorded, or dead-lettered).
        let mut tasks: tokio::task::JoinSet<(InstallationId, LogCursor, Result<bool, SyncError>)> = Default::default();
        let mut failed: Option<SyncError> = None;
        loop {
            while failed.is_none() && tasks.len() < self.lanes.max(1) {
                let Some(installation) = ready.pop_front() else { break };
                let Some(queued) = waiting.get_mut(&installation).and_then(VecDeque::pop_front) else { continue };
                running.insert(installation);
                let (worker, pool) = (self.worker.clone(), pool.clone());
                tasks.spawn(async move {
                    let result = async {
                        match worker.process(&queued.job).await? {
                            Disposition::DeadLetter { code, message } => {
                                record_dead_letter(&pool, &worker.name, &queued.job, &code, &message).await?;
                            }
                            Disposition::Released => return Ok(false),
                            _ => {}
                        }
                        Ok(true)
                    }
                    .await;
                    (installation, queued.at, result)
                });
            }
            if let Some(error) = failed.take_if(|_| tasks.is_empty()) {
                return Err(error);
            }
            let read_more = failed.is_none() && unfinished.len() < self.max_in_flight;
            tokio::select! {
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    let (installation, at, result) = done.map_err(|e| SyncError::JobTask(e.to_string()))?;
                    running.remove(&installation);
                    if let Ok(true) = result {
                        unfinished.remove(&at);
                    }
                    match result {
                        // Not recorded (the database went away): the checkpoint stays before
                        // it, and the next leadership runs it again.
                        Err(error) => failed = Some(error),
                        // Released by a stopping worker: the next leader runs it.
                        Ok(false) => {}
                        Ok(true) if waiting.get(&installation).is_some_and(|q| !q.is_empty()) => ready.push_back(installation),
                        Ok(true) => {
                            waiting.remove(&installation);
                        }
                    }
                }
                batch = subscription.next_batch_within(Duration::from_secs(2)), if read_more => {
                    let batch = batch?;
                    leadership.alive().await?;
                    if !batch.is_empty() {
                        let mut conn = pool.acquire().await?;
                        for event in &batch {
                            let before = read_to;
                            read_to = event.cursor();
                            let Some(job) = job_for(&mut conn, &self.store, event).await? else { continue };
                            let installation = job.job.installation_id;
                            unfinished.insert(read_to, before);
                            let queue = waiting.entry(installation).or_default();
                            if queue.is_empty() && !running.contains(&installation) {
                                ready.push_back(installation);
                            }
                            queue.push_back(Queued { job, at: read_to });
                        }
                    }
                }
                else => {
                    // Nothing to read (at the in-flight bound) and nothing running: cannot happen
                    // with jobs unfinished, as each is queued or running; wait a little.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            // Everything before the oldest unfinished job is done.
            let safe = unfinished.values().next().copied().unwrap_or(read_to);
            if safe > saved {
                let mut tx = amplog_log::tx::begin(&pool).await?;
                if !leadership.fence(&mut tx).await? {
                    return Err(SyncError::Fenced(JOB_DISPATCH.into()));
                }
                LogReader::save_checkpoint(&mut tx, JOB_DISPATCH, safe).await?;
                tx.commit().await?;
                saved = safe;
            }
        }
    }
}

/// Records a dead letter (a job redone after a crash records it again: the event id dedupes).
async fn record_dead_letter(
    pool: &sqlx::PgPool,
    worker: &str,
    job: &JobMessage,
    code: &str,
    message: &str,
) -> Result<(), SyncError> {
    sqlx::query(
        "INSERT INTO dead_letters (event_id, project_id, operation_id, installation_id, error_code,
                                   error_message, worker, envelope)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(job.event_id)
    .bind(job.project.0)
    .bind(job.job.operation_id.0)
    .bind(job.job.installation_id.0)
    .bind(code)
    .bind(message)
    .bind(worker)
    .bind(sqlx::types::Json(job.to_cloud_event()))
    .execute(pool)
    .await?;
    Ok(())
}
