//! Sync jobs end to end against the real broker and PostgreSQL: dispatch through the relay
//! and a consumer group, a worker killed between doing a job and recording it, dead letters,
//! the tenant taken from the envelope, and the same dispatch in-process without Kafka.

use amplog_commands::testing::{read_of, seed, test_db, Seeded};
use amplog_commands::{CommandContext, CommandService};
use amplog_domain::operation::{ErrorClass, Operation, OperationStatus};
use amplog_domain::OperationId;
use amplog_log::EventStore;
use amplog_providers::worker::{InProcessDispatch, JobContext, JobFailure, JobHandler, Worker, WorkerPolicy};
use amplog_streams::jobs::{run_kafka_worker, Job, JobMessage};
use amplog_streams::testing::{kafka_config, Collector};
use amplog_streams::{KafkaConfig, Relay};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Does jobs by object: `contacts` succeeds, `deals` always fails (transiently),
/// `companies` hangs forever on its first run (the worker dies there) and succeeds after.
#[derive(Default)]
struct TestHandler {
    /// Runs per object: the job's effect, counted when it is done.
    contacts: AtomicU32,
    companies: AtomicU32,
    deals: AtomicU32,
    hanging: Notify,
}

impl JobHandler for TestHandler {
    async fn run(&self, job: JobContext<'_>) -> Result<(), JobFailure> {
        match job.message.job.object.as_str() {
            "contacts" => {
                self.contacts.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            "companies" => {
                // The work is done (counted) before the outcome is recorded.
                if self.companies.fetch_add(1, Ordering::SeqCst) == 0 {
                    self.hanging.notify_one();
                    std::future::pending::<()>().await;
                }
                Ok(())
            }
            _ => {
                self.deals.fetch_add(1, Ordering::SeqCst);
                Err(JobFailure {
                    class: ErrorClass::Provider5xx,
                    message: "502 from the provider".into(),
                    retryable: true,
                })
            }
        }
    }
}

fn policy() -> WorkerPolicy {
    WorkerPolicy {
        lease_for: Duration::from_secs(2),
        max_attempts: 3,
        backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
    }
}

fn worker(service: &CommandService, handler: &Arc<TestHandler>, name: &str) -> Arc<Worker<TestHandler>> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AMPLOG_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init().ok();
    let mut worker = Worker::new(service.clone(), handler.clone(), name);
    worker.policy = policy();
    Arc::new(worker)
}

fn spawn_relay(service: &CommandService, config: &KafkaConfig) -> JoinHandle<()> {
    let relay = Relay::new(service.pool().clone(), EventStore::default(), config.clone(), "relay").unwrap();
    tokio::spawn(async move { relay.run(std::future::pending()).await.unwrap() })
}

fn spawn_worker(worker: Arc<Worker<TestHandler>>, config: &KafkaConfig, group: &str) -> JoinHandle<()> {
    let (config, group) = (config.clone(), group.to_string());
    tokio::spawn(async move { run_kafka_worker(&*worker, &config, &group, std::future::pending()).await.unwrap() })
}

async fn request(service: &CommandService, s: &Seeded, object: &str) -> OperationId {
    let outcome = service.request_operation(&s.ctx, s.installation, &read_of(object)).await.unwrap();
    OperationId(outcome.id_of("operation").unwrap())
}

/// Waits until the operation is finished; returns its state.
async fn finished(service: &CommandService, ctx: &CommandContext, id: OperationId, timeout: Duration) -> Operation {
    let deadline = Instant::now() + timeout;
    loop {
        let state = service.load::<Operation>(ctx, id.0).await.unwrap().state;
        if state.status.is_terminal() || Instant::now() > deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The operation's event types, in order.
async fn events_of(service: &CommandService, id: OperationId) -> Vec<String> {
    sqlx::query_scalar("SELECT event_type FROM events WHERE aggregate_id = $1 ORDER BY sequence")
        .bind(id.to_string())
        .fetch_all(service.pool())
        .await
        .unwrap()
}

/// The sum of the group's committed offsets on the jobs topic.
async fn committed(config: &KafkaConfig, group: &str) -> i64 {
    let consumer: StreamConsumer = config.consumer(group).create().unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    for p in 0..config.partitions {
        list.add_partition(&config.jobs_topic(), p);
    }
    let offsets = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
    offsets.elements().iter().filter_map(|e| e.offset().to_raw()).filter(|o| *o > 0).sum()
}

#[tokio::test]
async fn a_worker_killed_between_doing_and_recording_a_job_is_redone_and_recorded_once() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let config = kafka_config();
    let handler = Arc::new(TestHandler::default());
    let relay = spawn_relay(&service, &config);
    let group = &format!("{}workers", config.topic_prefix);

    let first = spawn_worker(worker(&service, &handler, "first"), &config, group);
    let ok = request(&service, &s, "contacts").await;
    let killed = request(&service, &s, "companies").await;
    assert_eq!(finished(&service, &s.ctx, ok, Duration::from_secs(60)).await.status, OperationStatus::Succeeded);
    tokio::time::timeout(Duration::from_secs(60), handler.hanging.notified()).await.expect("the job ran");
    // Killed after doing the job, before recording it: no outcome, no offset commit.
    first.abort();
    let _ = first.await;
    assert_eq!(handler.companies.load(Ordering::SeqCst), 1);

    let second = spawn_worker(worker(&service, &handler, "second"), &config, group);
    let state = finished(&service, &s.ctx, killed, Duration::from_secs(90)).await;
    assert_eq!(state.status, OperationStatus::Succeeded);
    assert_eq!(handler.companies.load(Ordering::SeqCst), 2, "the job was redone");
    // One success; the second worker took the expired lease over (attempt 2).
    assert_eq!(events_of(&service, killed).await, ["Requested", "Started", "Started", "Succeeded"]);
    assert_eq!(state.attempts, 2);
    assert_eq!(events_of(&service, ok).await, ["Requested", "Started", "Succeeded"]);
    assert_eq!(handler.contacts.load(Ordering::SeqCst), 1, "a recorded job is not redone");
    second.abort();
    let _ = second.await;
    // Both offsets are committed now: nothing is left for the group.
    assert_eq!(committed(&config, group).await, 2);
    relay.abort();
}

#[tokio::test]
async fn a_job_that_keeps_failing_is_a_failed_operation_and_a_dead_letter() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let config = kafka_config();
    let handler = Arc::new(TestHandler::default());
    let relay = spawn_relay(&service, &config);
    let worker = spawn_worker(worker(&service, &handler, "w"), &config, &format!("{}workers", config.topic_prefix));
    let id = request(&service, &s, "deals").await;
    let after = request(&service, &s, "contacts").await;

    let state = finished(&service, &s.ctx, id, Duration::from_secs(60)).await;
    assert_eq!(state.status, OperationStatus::Failed);
    assert_eq!(state.error_class, Some(ErrorClass::Provider5xx));
    assert_eq!(handler.deals.load(Ordering::SeqCst), 3, "max_attempts");
    assert_eq!(events_of(&service, id).await, ["Requested", "Started", "Failed"]);
    let mut dead = Collector::new(&config, &[config.dead_letter_topic()]).await;
    assert!(dead.until(Duration::from_secs(30), |r| !r.is_empty()).await);
    let letter = &dead.received[0];
    assert_eq!(letter.key, s.installation.to_string());
    assert_eq!(letter.event.subject, id.to_string());
    assert_eq!(letter.event.extensions["errorcode"], "provider5xx");
    assert!(letter.event.extensions["errormessage"].as_str().unwrap().contains("3 attempts: 502"));
    // The group moved on to the next job.
    assert_eq!(finished(&service, &s.ctx, after, Duration::from_secs(60)).await.status, OperationStatus::Succeeded);
    worker.abort();
    relay.abort();
}

#[tokio::test]
async fn a_worker_takes_the_tenant_from_the_envelope_never_from_the_data() {
    let db = test_db().await;
    let service = db.service();
    let a = seed(&service).await;
    let b = seed(&service).await;
    let config = kafka_config();
    amplog_streams::topics::ensure_topics(&config, &config.topics()).await.unwrap();
    let handler = Arc::new(TestHandler::default());
    // No relay: this test writes the jobs topic itself.
    let victim = request(&service, &a, "contacts").await;
    let job = Job {
        operation_id: victim,
        installation_id: a.installation,
        connection_id: a.connection,
        op_type: amplog_domain::operation::OperationType::Read,
        object: "contacts".into(),
        since: None,
        until: None,
        trigger: amplog_domain::operation::Trigger::Triggered,
    };
    // The job's identity is its `Requested` event, as the relay publishes it.
    let requested: uuid::Uuid =
        sqlx::query_scalar("SELECT event_id FROM events WHERE aggregate_id = $1 AND event_type = 'Requested'")
            .bind(victim.to_string())
            .fetch_one(service.pool())
            .await
            .unwrap();
    let message = |project| JobMessage {
        project,
        job: job.clone(),
        event_id: requested,
        time: chrono::Utc::now(),
        traceparent: None,
    };
    // 1. Project B's envelope naming project A's operation.
    let forged = message(b.ctx.project_id).to_cloud_event();
    // 2. No tenant in the envelope at all.
    let mut anonymous = message(a.ctx.project_id).to_cloud_event();
    anonymous.projectid = None;
    // 3. Project A's envelope whose data claims project B: the envelope wins.
    let mut claimed = message(a.ctx.project_id).to_cloud_event();
    claimed.data["project_id"] = serde_json::json!(b.ctx.project_id);
    let producer: FutureProducer = config.producer().unwrap().create().unwrap();
    let topic = config.jobs_topic();
    for envelope in [&forged, &anonymous, &claimed] {
        let bytes = envelope.to_bytes();
        let key = a.installation.to_string();
        let record = FutureRecord::to(&topic).key(&key).payload(&bytes);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
    let worker = spawn_worker(worker(&service, &handler, "w"), &config, &format!("{}workers", config.topic_prefix));
    let state = finished(&service, &a.ctx, victim, Duration::from_secs(60)).await;
    assert_eq!(state.status, OperationStatus::Succeeded);
    // Only the third message ran the job: the forged one found no such operation in B.
    assert_eq!(events_of(&service, victim).await, ["Requested", "Started", "Succeeded"]);
    assert_eq!(handler.contacts.load(Ordering::SeqCst), 1);
    let actors: Vec<String> = sqlx::query_scalar(
        "SELECT metadata->>'actor' FROM events WHERE aggregate_id = $1 AND sequence > 1 ORDER BY sequence",
    )
    .bind(victim.to_string())
    .fetch_all(service.pool())
    .await
    .unwrap();
    assert_eq!(actors, ["worker:w", "worker:w"]);
    let mut dead = Collector::new(&config, &[config.dead_letter_topic()]).await;
    assert!(dead.until(Duration::from_secs(30), |r| r.len() >= 2).await);
    let codes: Vec<_> = dead.received.iter().map(|r| r.event.extensions["errorcode"].clone()).collect();
    assert_eq!(codes, ["operation.not_found", "malformed_envelope"]);
    assert_eq!(dead.received[0].event.projectid, Some(b.ctx.project_id.0));
    worker.abort();
}

#[tokio::test]
async fn without_kafka_the_same_jobs_run_in_process_from_the_log() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let handler = Arc::new(TestHandler::default());
    let spawn = |name: &str| {
        let dispatch = InProcessDispatch::new(worker(&service, &handler, name), EventStore::default(), name);
        tokio::spawn(async move { dispatch.run(std::future::pending()).await.unwrap() })
    };
    let first = spawn("first");
    let ok = request(&service, &s, "contacts").await;
    let failing = request(&service, &s, "deals").await;
    let killed = request(&service, &s, "companies").await;
    tokio::time::timeout(Duration::from_secs(60), handler.hanging.notified()).await.expect("the job ran");
    first.abort();
    let _ = first.await;
    let second = spawn("second");
    assert_eq!(finished(&service, &s.ctx, killed, Duration::from_secs(60)).await.status, OperationStatus::Succeeded);
    assert_eq!(events_of(&service, killed).await, ["Requested", "Started", "Started", "Succeeded"]);
    assert_eq!(handler.companies.load(Ordering::SeqCst), 2);
    assert_eq!(events_of(&service, ok).await, ["Requested", "Started", "Succeeded"]);
    assert_eq!(events_of(&service, failing).await, ["Requested", "Started", "Failed"]);
    // The dead letter is a row, with the job's envelope.
    let row: (String, String, serde_json::Value) =
        sqlx::query_as("SELECT error_code, error_message, envelope FROM dead_letters WHERE operation_id = $1")
            .bind(failing.0)
            .fetch_one(service.pool())
            .await
            .unwrap();
    assert_eq!(row.0, "provider5xx");
    assert!(row.1.starts_with("3 attempts"), "{}", row.1);
    assert_eq!(row.2["projectid"], serde_json::json!(s.ctx.project_id));
    second.abort();
}

#[tokio::test]
async fn a_retried_operation_dispatches_its_job_again_as_requested() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let (op, lease) = amplog_commands::testing::start_read(&service, &s, "deals").await;
    service.fail_operation(&s.ctx, op, lease, ErrorClass::RateLimited, "429", true).await.unwrap();
    service.retry_operation(&s.ctx, op).await.unwrap();
    // A catch-up, not one batch: another test's open transaction can hold the xmin back.
    let events = amplog_log::LogReader::new(service.pool().clone())
        .catch_up(amplog_log::LogCursor::default(), 1000)
        .await
        .unwrap()
        .rest()
        .await
        .unwrap();
    let mut conn = service.pool().acquire().await.unwrap();
    let mut jobs = Vec::new();
    for event in events.iter().filter(|e| e.aggregate_id == op.to_string()) {
        if let Some(job) = amplog_streams::jobs::job_for(&mut conn, &EventStore::default(), event).await.unwrap() {
            jobs.push((event.event_type.clone(), event.event_id, job));
        }
    }
    assert_eq!(jobs.iter().map(|(t, ..)| t.as_str()).collect::<Vec<_>>(), ["Requested", "Retried"]);
    let (requested, retried) = (&jobs[0].2, &jobs[1].2);
    assert_eq!(retried.job, requested.job, "the retry runs what was requested");
    assert_eq!(retried.event_id, jobs[1].1, "a new job id: the Retried event's");
    assert_ne!(retried.event_id, requested.event_id);
    assert_eq!(retried.project, s.ctx.project_id);
    assert_eq!(retried.job.object, "deals");

    // The first job, redelivered after the retry dispatched the second (its offset was never
    // committed), runs nothing: only the latest dispatch of an operation runs it.
    let handler = Arc::new(TestHandler::default());
    let worker = worker(&service, &handler, "late");
    assert_eq!(worker.process(requested).await.unwrap(), amplog_providers::worker::Disposition::Superseded);
    assert_eq!(handler.deals.load(Ordering::SeqCst), 0);
    assert_eq!(events_of(&service, op).await.last().map(String::as_str), Some("Retried"));
}
