//! Sync jobs on Kafka. An operation that is requested (or retried) is a job, keyed by
//! installation: the relay publishes it to the jobs topic (`job_for`), and workers form a
//! consumer group that commits an offset only after the job's outcome is recorded
//! (`run_kafka_worker`, over any `JobProcessor`: the sync worker lives with the providers).

use crate::envelope::{source, CloudEvent};
use crate::{KafkaConfig, StreamsError};
use amplog_domain::operation::{Operation, OperationEvent, OperationType, Trigger};
use amplog_domain::{ConnectionId, InstallationId, OperationId, ProjectId};
use amplog_log::{EventStore, RecordedEvent};
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
use std::time::Duration;
use uuid::Uuid;

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
    /// The `Requested`, `Retried` or `DeadLetterReplayed` event's id: the CloudEvents id, for deduplication.
    pub event_id: Uuid,
    pub time: DateTime<Utc>,
    /// The W3C trace context of its dispatch: the worker's span continues the trace.
    pub traceparent: Option<String>,
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
            traceparent: self.traceparent.clone(),
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
        // The trace context is a hint, never trusted for anything else: a malformed one is dropped.
        let traceparent = event.traceparent.clone().filter(|t| t.len() <= 64);
        Ok(Self { project: ProjectId(project), job, event_id, time: event.time, traceparent })
    }

    /// The Kafka key: the installation, so one installation's jobs stay in order.
    pub fn key(&self) -> String {
        self.job.installation_id.to_string()
    }
}

/// Whether a logged event dispatches a job.
pub fn dispatches<J>(event: &RecordedEvent<J>) -> bool {
    event.aggregate_type == "operation"
        && matches!(event.event_type.as_str(), "Requested" | "Retried" | "DeadLetterReplayed")
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
    let requested = match event.event_type.as_str() {
        "Requested" => store.decode::<Operation>("Requested", &event.event_version, event.payload.clone())?,
        _ => first_event(conn, store, &event.aggregate_id).await?,
    };
    let OperationEvent::Requested { installation_id, connection_id, op_type, object, since, until, trigger, .. } =
        requested
    else {
        return Ok(None);
    };
    let operation_id = OperationId(
        event
            .aggregate_id
            .parse()
            .map_err(|_| StreamsError::Envelope(format!("operation id {}", event.aggregate_id)))?,
    );
    // The dispatch: a span in the trace of the command that recorded the event.
    let span = tracing::info_span!(
        "dispatch",
        operation.id = %operation_id.0,
        installation.id = %installation_id.0,
        op_type = ?op_type,
        event = %event.event_type,
    );
    amplog_log::telemetry::follow(&span, amplog_log::telemetry::traceparent_of(&event.metadata));
    let traceparent = span.in_scope(amplog_log::telemetry::current_traceparent);
    Ok(Some(JobMessage {
        project: ProjectId(project),
        job: Job { operation_id, installation_id, connection_id, op_type, object, since, until, trigger },
        event_id: event.event_id,
        time: event.recorded_at,
        traceparent,
    }))
}

/// An operation's first event (its `Requested`, or a proxy call's `Proxied`), decoded.
pub(crate) async fn first_event(
    conn: &mut PgConnection,
    store: &EventStore,
    operation: &str,
) -> Result<OperationEvent, StreamsError> {
    let (kind, version, payload): (String, String, sqlx::types::Json<Value>) = sqlx::query_as(
        "SELECT event_type, event_version, payload FROM events
         WHERE aggregate_type = 'operation' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(operation)
    .fetch_one(&mut *conn)
    .await?;
    Ok(store.decode::<Operation>(&kind, &version, payload.0)?)
}

/// What a job's processing asks of its transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ack {
    /// Done, whatever its outcome: acknowledge it.
    Done,
    /// Acknowledge it once it is in the dead-letter topic with its error.
    DeadLetter { code: String, message: String },
    /// Given up unfinished by a stopping worker: leave it to the partition's next owner.
    Leave,
}

/// Runs the jobs a transport takes (the sync worker).
pub trait JobProcessor: Sync {
    type Error: std::fmt::Display;
    /// Names the processor in dead letters.
    fn name(&self) -> &str;
    /// `Err`: the outcome was not recorded (the database went away); the same job is
    /// offered again.
    fn run_job(&self, job: &JobMessage) -> impl Future<Output = Result<Ack, Self::Error>> + Send;
    /// Stops: jobs in hand are given up (`Ack::Leave`), no new one starts.
    fn stop(&self);
    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static;
}

/// The envelope of a dead-lettered job: the job's own envelope with the error added.
pub fn dead_letter(original: &CloudEvent, code: &str, message: &str, worker: &str) -> CloudEvent {
    let mut letter = original.clone();
    letter.extensions.insert("errorcode".into(), Value::String(code.into()));
    letter.extensions.insert("errormessage".into(), Value::String(message.into()));
    letter.extensions.insert("worker".into(), Value::String(worker.into()));
    letter
}

/// A member of consumer group `group`: takes jobs from the jobs topic one at a time (in
/// order per partition), and commits a job's offset only after its outcome is recorded (or
/// it was dead-lettered and the dead letter delivered). Returns when `stop` resolves (or the
/// processor is stopped): a job in hand is given up and left unacknowledged, so the
/// partition's next owner runs it at once.
pub async fn run_kafka_worker<P: JobProcessor>(
    worker: &P,
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

async fn consume_jobs<P: JobProcessor>(worker: &P, config: &KafkaConfig, group: &str) -> Result<(), StreamsError> {
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
            .map_err(ToString::to_string)
            .and_then(|e| JobMessage::from_cloud_event(e).map_err(|e| e.to_string()));
        let ack = match &job {
            Ok(job) => loop {
                match worker.run_job(job).await {
                    Ok(Ack::Leave) => return Ok(()),
                    Ok(ack) => break ack,
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
            Err(error) => Ack::DeadLetter { code: "malformed_envelope".into(), message: error.clone() },
        };
        tracing::debug!(?ack, partition = message.partition(), offset = message.offset(), "job done");
        if let Ack::DeadLetter { code, message: error } = &ack {
            let letter = match &envelope {
                Ok(envelope) => dead_letter(envelope, code, error, worker.name()).to_bytes(),
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
