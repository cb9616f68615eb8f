//! The Kafka relay beside a raw rdkafka producer, against the same broker in the same run:
//! catch-up throughput (the log's events relayed vs the same payloads produced directly), and
//! end-to-end latency from a command's commit to the event consumed from its topic at a
//! steady rate.

use crate::cpu::CpuSnapshot;
use crate::{Report, Stats};
use amplog_commands::{CommandContext, CommandService, EventStore, LogCursor, LogReader};
use amplog_domain::operation::{Cursor, OperationType, PageRecord, Trigger};
use amplog_domain::{InstallationId, LeaseId, OperationId};
use amplog_streams::{CloudEvent, KafkaConfig, Relay};
use anyhow::{Context, Result};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use rdkafka::{Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

fn config(brokers: &str) -> KafkaConfig {
    let mut config = KafkaConfig::new(brokers);
    config.topic_prefix = format!("bench{}.", &Uuid::new_v4().simple().to_string()[..8]);
    config
}

/// 1,000 running read operations of one installation, with `events` page events among them.
async fn seed(svc: &CommandService, events: usize) -> Result<(CommandContext, Vec<(OperationId, LeaseId)>)> {
    let writer = crate::setup_writers(svc, 1).await?.remove(0);
    let (ctx, installation): (CommandContext, InstallationId) = (writer.ctx, writer.installation);
    let read = amplog_commands::service::NewOperation {
        op_type: OperationType::Read,
        object: "contacts".into(),
        since: None,
        until: None,
        trigger: Trigger::Scheduled,
    };
    let mut ops = Vec::new();
    for _ in 0..1000 {
        let op = OperationId(svc.request_operation(&ctx, installation, &read).await?.id_of("operation").context("id")?);
        let lease = LeaseId(Uuid::now_v7());
        svc.start_operation(&ctx, op, lease, chrono::Duration::days(1)).await?;
        ops.push((op, lease));
    }
    let per_op = events / ops.len();
    let tasks: Vec<_> = ops
        .chunks(250)
        .map(|chunk| {
            let (svc, ctx, chunk) = (svc.clone(), ctx.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for (op, lease) in chunk {
                    let mut left = per_op;
                    while left > 0 {
                        let n = left.min(50);
                        svc.record_pages(&ctx, op, lease, &vec![crate::page(n as u64); n]).await?;
                        left -= n;
                    }
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok((ctx, ops))
}

/// What the relay publishes for the whole log: `(topic, key, envelope bytes)`.
async fn payloads(pool: &PgPool, config: &KafkaConfig) -> Result<Vec<(String, String, Vec<u8>)>> {
    let (reader, store) = (LogReader::new(pool.clone()), EventStore::default());
    let (mut cursor, mut out) = (LogCursor::default(), Vec::new());
    loop {
        let batch = reader.read_batch(cursor, 10_000).await?;
        let Some(last) = batch.last() else { break };
        cursor = last.cursor();
        for event in &batch {
            let envelope = CloudEvent::from_recorded(event, &store).to_bytes();
            out.push((config.aggregate_topic(&event.aggregate_type), event.aggregate_id.clone(), envelope));
        }
    }
    Ok(out)
}

/// Counts delivery reports and failures, and wakes the sender at the last report (the raw
/// producer's only bookkeeping).
struct Deliveries {
    expected: usize,
    reported: AtomicUsize,
    failed: AtomicUsize,
    all: tokio::sync::Notify,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if self.reported.fetch_add(1, Ordering::AcqRel) + 1 == self.expected {
            self.all.notify_one();
        }
    }
}

/// Raw baseline: the same payloads through one rdkafka producer with the same delivery
/// settings (idempotent, acks=all), every delivery reported, none failed. It waits for the
/// reports as the relay does, not with `flush`: rust-rdkafka's `flush` polls in 100 ms
/// steps beside the polling thread, which took the report it waited for in about half the
/// runs (0.40 or 0.50 s walls). Timed like the relay's
/// catch-up: from creating the producer to having dropped it (librdkafka's shutdown joins
/// its polling thread, ~0.1 s). It asks for every topic's metadata first, as the relay
/// does: else librdkafka's idempotent producer waits up to 500 ms for its producer id, and
/// a message for a topic without metadata waits for librdkafka's own request (BENCHMARKS.md).
async fn raw_produce(config: &KafkaConfig, messages: &[(String, String, Vec<u8>)]) -> Result<Duration> {
    let started = Instant::now();
    let deliveries =
        Deliveries { expected: messages.len(), reported: 0.into(), failed: 0.into(), all: Default::default() };
    let producer: ThreadedProducer<Deliveries> = config.producer()?.create_with_context(deliveries)?;
    let (topics, client) = (config.topics(), producer.client());
    tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let asks: Vec<_> = topics
                .iter()
                .map(|topic| scope.spawn(move || client.fetch_metadata(Some(topic), Duration::from_secs(5))))
                .collect();
            asks.into_iter().try_for_each(|ask| ask.join().expect("a metadata request panicked").map(drop))
        })
    })?;
    for (topic, key, payload) in messages {
        let mut record = BaseRecord::to(topic).key(key).payload(payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(2)).await
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }
    tokio::time::timeout(Duration::from_secs(60), producer.context().all.notified()).await?;
    anyhow::ensure!(producer.context().failed.load(Ordering::Relaxed) == 0, "raw deliveries failed");
    drop(producer);
    Ok(started.elapsed())
}

pub async fn run(report: &mut Report, url: &str, brokers: &str, events: usize, rate: u64, seconds: u64) -> Result<()> {
    let pool = crate::fresh_database(url, "amplog_bench_relay").await?;
    let svc = crate::service(&pool);
    eprintln!("relay: seeding {events} events across 1,000 operations...");
    // Autovacuum would process the fresh log during some catch-ups and not others: off,
    // the relay finds rows as a live relay does (not yet vacuumed, hint bits unset).
    sqlx::query("ALTER TABLE events SET (autovacuum_enabled = false)").execute(&pool).await?;
    let (ctx, ops) = seed(&svc, events).await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&pool).await?;

    // Catch-up: the relay from an empty checkpoint to the log's end.
    let ours = config(brokers);
    amplog_streams::topics::ensure_topics(&ours, &ours.topics()).await?;
    let relay = Relay::new(pool.clone(), EventStore::default(), ours.clone(), "bench")?;
    eprintln!("relay: catching up {total} events...");
    let (started, cpu) = (Instant::now(), CpuSnapshot::now());
    let relayed = relay.catch_up().await?.context("the relay leads")?;
    let relay_time = started.elapsed();
    let relay_cpu = cpu.since();
    // Raw: the same envelopes, built beforehand, produced directly to other topics.
    let raw_config = config(brokers);
    amplog_streams::topics::ensure_topics(&raw_config, &raw_config.topics()).await?;
    let messages = payloads(&pool, &raw_config).await?;
    eprintln!("raw producer: {} messages...", messages.len());
    let cpu = CpuSnapshot::now();
    let raw_time = raw_produce(&raw_config, &messages).await?;
    let raw_cpu = cpu.since();
    eprintln!("relay catch-up: {relay_cpu}\nraw producer: {raw_cpu}");
    let relay_rate = relayed as f64 / relay_time.as_secs_f64();
    let raw_rate = messages.len() as f64 / raw_time.as_secs_f64();
    let row = format!(
        "| relay catch-up into Kafka ({relayed} events + 1,000 jobs, log → CloudEvents → acknowledged, checkpointed) | {relay_rate:.0} events/s | {raw_rate:.0} messages/s (raw rdkafka producer, same payloads, same settings) | {:.2} (target ≥ 0.5) |",
        relay_rate / raw_rate
    );
    eprintln!("{row}");
    report.rows.push(row);

    e2e_latency(report, &pool, &svc, &ctx, &ops, &ours, rate, seconds).await?;
    pool.close().await;
    Ok(())
}

/// Commit → consumed: a relay runs; commands append one page event each at a steady `rate`;
/// a consumer on the operation topic notes when each event id arrives.
#[allow(clippy::too_many_arguments)]
async fn e2e_latency(
    report: &mut Report,
    pool: &PgPool,
    svc: &CommandService,
    ctx: &CommandContext,
    ops: &[(OperationId, LeaseId)],
    config: &KafkaConfig,
    rate: u64,
    seconds: u64,
) -> Result<()> {
    let relay = Relay::new(pool.clone(), EventStore::default(), config.clone(), "bench-e2e")?;
    let relaying = tokio::spawn(async move { relay.run(std::future::pending()).await });
    let mut client = config.consumer("amplog-bench-e2e");
    // tansu holds a fetch for its full wait even when data arrives: ask every 10 ms.
    client.set("fetch.wait.max.ms", "10");
    let consumer: StreamConsumer = client.create()?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..config.partitions {
        assignment.add_partition_offset(&config.aggregate_topic("operation"), partition, Offset::End)?;
    }
    consumer.assign(&assignment)?;
    tokio::time::sleep(Duration::from_secs(3)).await; // leadership, assignment
    let committed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let arrived: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let consuming = {
        let arrived = arrived.clone();
        tokio::spawn(async move {
            loop {
                let message = consumer.recv().await?;
                let now = Instant::now();
                let event = CloudEvent::parse(message.payload().unwrap_or_default())?;
                arrived.lock().unwrap().insert(event.id, now);
            }
            #[allow(unreachable_code)]
            Ok::<_, anyhow::Error>(())
        })
    };
    eprintln!("end-to-end latency at {rate} events/s for {seconds} s...");
    let per_tick = (rate / 100).max(1) as usize;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (start, mut next) = (Instant::now(), 0usize);
    let mut inflight = Vec::new();
    while start.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        for _ in 0..per_tick {
            let (op, lease) = ops[next % ops.len()];
            next += 1;
            let (svc, ctx, committed) = (svc.clone(), ctx.clone(), committed.clone());
            inflight.push(tokio::spawn(async move {
                let page = PageRecord { records: 10, bytes: 100, cursor: Cursor::default() };
                let outcome = svc.record_pages(&ctx, op, lease, &[page]).await?;
                let now = Instant::now();
                let mut map = committed.lock().unwrap();
                for event in outcome.events {
                    map.insert(event.event_id.to_string(), now);
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        inflight.retain(|t| !t.is_finished());
    }
    for task in inflight {
        task.await??;
    }
    let elapsed = start.elapsed();
    let sent = committed.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let all_arrived = {
            let arrived = arrived.lock().unwrap();
            committed.lock().unwrap().keys().all(|id| arrived.contains_key(id))
        };
        if all_arrived {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consuming.abort();
    relaying.abort();
    let (committed, arrived) = (committed.lock().unwrap(), arrived.lock().unwrap());
    let latencies: Vec<Duration> =
        committed.iter().filter_map(|(id, t)| arrived.get(id).map(|a| a.saturating_duration_since(*t))).collect();
    let lost = sent - latencies.len();
    let stats = Stats { ops: sent as u64, events: sent as u64, elapsed, latencies };
    let name = format!(
        "end-to-end latency, command commit → consumed from Kafka, steady {rate} events/s (achieved {:.0}/s, {sent} events, {lost} not arrived)",
        stats.events_per_sec()
    );
    report.latency_row(&name, &stats, "target p99 < 250 ms");
    Ok(())
}
