//! Sync jobs. An operation that is requested (or retried) is a job, keyed by installation.
//! The job's transport is either Kafka (the relay publishes it to the jobs topic; workers
//! form a consumer group and commit an offset only after the job's outcome is recorded) or
//! in-process (a dispatcher reads the log and runs the job; its checkpoint moves only after
//! the outcome is recorded). Both share `JobMessage`, `Worker::process` and its policy:
//! lease the operation (fencing), run the handler, retry transient failures with backoff
//! and jitter, record the outcome with one command, dead-letter a job that keeps failing.

use crate::envelope::{source, CloudEvent};
use crate::{KafkaConfig, StreamsError};
use amplog_commands::leader::{run_as_leader, Leadership};
use amplog_commands::{CommandContext, CommandError, CommandService, EventStore, LogCursor, LogReader, RecordedEvent};
use amplog_domain::operation::{
    ErrorClass, Operation, OperationError, OperationEvent, OperationStatus, OperationType, Trigger,
};
use amplog_domain::{ConnectionId, DomainError, InstallationId, LeaseId, OperationId, ProjectId};
use chrono::{DateTime, Utc};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// The in-process dispatcher's singleton and checkpoint name.
pub const JOB_DISPATCH: &str = "job_dispatch";

/// What a worker needs to run an operation (the `data` of a job envelope). The project is
/// not here: it travels in the envelope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Job {
    pub operation_id: OperationId,
    pub installation_id: InstallationId,
    pub connection_id: ConnectionId,
    pub op_type: OperationType,
    pub object: String,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub trigger: Trigger,
}

/// A job with its tenant and identity: the log event that dispatched it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobMessage {
    pub project: ProjectId,
    pub job: Job,
    /// The `Requested` or `Retried` event's id: the CloudEvents id, for deduplication.
    pub event_id: Uuid,
    pub time: DateTime<Utc>,
}

impl JobMessage {
    pub fn to_cloud_event(&self) -> CloudEvent {
        let op = serde_json::to_value(self.job.op_type).expect("serialises");
        CloudEvent {
            specversion: "1.0".into(),
            id: self.event_id.to_string(),
            source: source(Some(self.project.0)),
            event_type: format!("amplog.job.{}.v1", op.as_str().unwrap_or("job")),
            subject: self.job.operation_id.to_string(),
            time: self.time,
            datacontenttype: "application/json".into(),
            data: serde_json::to_value(&self.job).expect("jobs serialise"),
            projectid: Some(self.project.0),
            sequence: None,
            position: None,
            hash: None,
            actor: None,
            extensions: BTreeMap::new(),
        }
    }

    /// Reads a job from its envelope. The tenant comes from the envelope's `projectid`,
    /// whatever `data` says.
    pub fn from_cloud_event(event: &CloudEvent) -> Result<Self, StreamsError> {
        let project = event.projectid.ok_or_else(|| StreamsError::Envelope("a job without projectid".into()))?;
        let job: Job =
            serde_json::from_value(event.data.clone()).map_err(|e| StreamsError::Envelope(format!("job data: {e}")))?;
        let event_id = event.id.parse().map_err(|e| StreamsError::Envelope(format!("job id: {e}")))?;
        Ok(Self { project: ProjectId(project), job, event_id, time: event.time })
    }

    /// The Kafka key: the installation, so one installation's jobs stay in order.
    pub fn key(&self) -> String {
        self.job.installation_id.to_string()
    }
}

/// Whether a logged event dispatches a job.
pub fn dispatches<J>(event: &RecordedEvent<J>) -> bool {
    event.aggregate_type == "operation" && matches!(event.event_type.as_str(), "Requested" | "Retried")
}

/// The job a logged event dispatches, if any. A retry re-dispatches the operation as its
/// `Requested` event described it.
pub async fn job_for(
    conn: &mut PgConnection,
    store: &EventStore,
    event: &RecordedEvent,
) -> Result<Option<JobMessage>, StreamsError> {
    if !dispatches(event) {
        return Ok(None);
    }
    let Some(project) = event.project_id else { return Ok(None) };
    let (version, payload) = if event.event_type == "Requested" {
        (event.event_version.clone(), event.payload.clone())
    } else {
        let row: (String, sqlx::types::Json<Value>) = sqlx::query_as(
            "SELECT event_version, payload FROM events
             WHERE aggregate_type = 'operation' AND aggregate_id = $1 AND sequence = 1",
        )
        .bind(&event.aggregate_id)
        .fetch_one(&mut *conn)
        .await?;
        (row.0, row.1 .0)
    };
    let OperationEvent::Requested { installation_id, connection_id, op_type, object, since, until, trigger, .. } =
        store.decode::<Operation>("Requested", &version, payload)?
    else {
        return Ok(None);
    };
    let operation_id = OperationId(
        event
            .aggregate_id
            .parse()
            .map_err(|_| StreamsError::Envelope(format!("operation id {}", event.aggregate_id)))?,
    );
    Ok(Some(JobMessage {
        project: ProjectId(project),
        job: Job { operation_id, installation_id, connection_id, op_type, object, since, until, trigger },
        event_id: event.event_id,
        time: event.recorded_at,
    }))
}

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
    pub async fn process(&self, message: &JobMessage) -> Result<Disposition, StreamsError> {
        let _in_hand = InHand::new(&self.in_hand);
        if *self.stopping.borrow() {
            return Ok(Disposition::Released);
        }
        let command = CommandContext::new(message.project, format!("worker:{}", self.name));
        let id = message.job.operation_id;
        let lease = LeaseId(Uuid::now_v7());
        let lease_for = chrono::TimeDelta::from_std(self.policy.lease_for)
            .map_err(|_| StreamsError::Config("lease_for is too long".into()))?;
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
                Ok(_) => break,
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
    ) -> Result<Disposition, StreamsError> {
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
    /// last `Retried`).
    async fn is_latest_dispatch(&self, message: &JobMessage) -> Result<bool, StreamsError> {
        let latest: Option<Uuid> = sqlx::query_scalar(
            "SELECT event_id FROM events WHERE aggregate_type = 'operation' AND aggregate_id = $1
               AND event_type IN ('Requested', 'Retried') ORDER BY sequence DESC LIMIT 1",
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
    ) -> Result<Disposition, StreamsError> {
        match outcome {
            Ok(_) => Ok(disposition),
            Err(CommandError::Domain(DomainError::Operation(
                OperationError::StaleLease | OperationError::AlreadyFinished(_) | OperationError::NotRunning,
            ))) => Ok(Disposition::Superseded),
            Err(error) => Err(error.into()),
        }
    }
}

/// The error class as its code (`provider5xx`, `rate_limited`, ...).
fn class_code(class: ErrorClass) -> String {
    serde_json::to_value(class).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| "internal".into())
}

/// The envelope of a dead-lettered job: the job's own envelope with the error added.
pub fn dead_letter(original: &CloudEvent, code: &str, message: &str, worker: &str) -> CloudEvent {
    let mut letter = original.clone();
    letter.extensions.insert("errorcode".into(), Value::String(code.into()));
    letter.extensions.insert("errormessage".into(), Value::String(message.into()));
    letter.extensions.insert("worker".into(), Value::String(worker.into()));
    letter
}

/// A sync worker in consumer group `group`: takes jobs from the jobs topic one at a time (in
/// order per partition), and commits a job's offset only after its outcome is recorded (or
/// it was dead-lettered and the dead letter delivered). Returns when `stop` resolves (or the
/// worker is stopped): a job in hand is released and left unacknowledged, so the partition's
/// next owner runs it at once.
pub async fn run_kafka_worker<H: JobHandler>(
    worker: &Worker<H>,
    config: &KafkaConfig,
    group: &str,
    stop: impl Future<Output = ()>,
) -> Result<(), StreamsError> {
    let consuming = consume_jobs(worker, config, group);
    tokio::pin!(consuming);
    tokio::select! {
        result = &mut consuming => return result,
        _ = stop => worker.stop(),
    }
    consuming.await
}

async fn consume_jobs<H: JobHandler>(
    worker: &Worker<H>,
    config: &KafkaConfig,
    group: &str,
) -> Result<(), StreamsError> {
    crate::topics::ensure_topics(config, &[config.jobs_topic(), config.dead_letter_topic()]).await?;
    let consumer: StreamConsumer = config.consumer(group).create()?;
    consumer.subscribe(&[&config.jobs_topic()])?;
    let producer: FutureProducer = config.producer()?.create()?;
    let dead_letters = config.dead_letter_topic();
    loop {
        let message = tokio::select! {
            _ = worker.stopped() => return Ok(()),
            message = consumer.recv() => match message {
                Ok(message) => message,
                Err(error) => {
                    // Broker or metadata trouble: the consumer reconnects by itself.
                    tracing::warn!(%error, "consuming jobs failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let envelope = CloudEvent::parse(message.payload().unwrap_or_default());
        let job = envelope
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|e| JobMessage::from_cloud_event(e).map_err(|e| e.to_string()));
        let disposition = match &job {
            Ok(job) => loop {
                match worker.process(job).await {
                    Ok(Disposition::Released) => return Ok(()),
                    Ok(disposition) => break disposition,
                    Err(error) => {
                        // Not acknowledged: the same job again once the database is back.
                        tracing::warn!(%error, operation = %job.job.operation_id, "job not recorded; retrying");
                        tokio::select! {
                            _ = worker.stopped() => return Ok(()),
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            },
            Err(error) => Disposition::DeadLetter { code: "malformed_envelope".into(), message: error.clone() },
        };
        tracing::info!(?disposition, partition = message.partition(), offset = message.offset(), "job done");
        if let Disposition::DeadLetter { code, message: error } = &disposition {
            let letter = match &envelope {
                Ok(envelope) => dead_letter(envelope, code, error, &worker.name).to_bytes(),
                Err(_) => message.payload().unwrap_or_default().to_vec(),
            };
            let key = message.key().unwrap_or_default().to_vec();
            let record = FutureRecord::to(&dead_letters).key(&key).payload(&letter).headers(crate::envelope::headers());
            producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
        }
        if let Err(error) = consumer.commit_message(&message, CommitMode::Sync) {
            // A rebalance took the partition: its next owner gets the job again and finds
            // the outcome already recorded.
            tracing::warn!(%error, offset = message.offset(), "offset not committed");
        }
    }
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
    pub async fn run(&self, stop: impl Future<Output = ()>) -> Result<(), StreamsError> {
        let pool = self.worker.service.pool();
        let pause = |_: &StreamsError| Duration::from_secs(1);
        // The dispatch keeps running (its tasks releasing) until the worker is drained.
        let stop = async {
            stop.await;
            self.worker.stop();
            self.worker.drained().await;
        };
        run_as_leader(pool, JOB_DISPATCH, &self.holder, stop, pause, |l| self.dispatch_while_leading(l)).await;
        Ok(())
    }

    async fn dispatch_while_leading(&self, mut leadership: Leadership) -> Result<(), StreamsError> {
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
        let mut tasks: tokio::task::JoinSet<(InstallationId, LogCursor, Result<bool, StreamsError>)> =
            Default::default();
        let mut failed: Option<StreamsError> = None;
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
                    let (installation, at, result) = done.map_err(|e| StreamsError::JobTask(e.to_string()))?;
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
                let mut tx = pool.begin().await?;
                if !leadership.fence(&mut tx).await? {
                    return Err(StreamsError::Fenced(JOB_DISPATCH.into()));
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
) -> Result<(), StreamsError> {
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
