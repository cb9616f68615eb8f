//! The Kafka relay beside a raw rdkafka producer, against the same broker in the same run:
//! catch-up throughput (the log's events relayed vs the same payloads produced directly), and
//! end-to-end latency from a command's commit to the event consumed from its topic at a
//! steady rate.

use crate::cpu::CpuSnapshot;
use crate::{Report, Stats};
use amplog_commands::{CommandContext, CommandService};
use amplog_domain::operation::{Cursor, OperationType, PageRecord, Trigger};
use amplog_domain::{InstallationId, LeaseId, OperationId};
use amplog_log::{EventStore, LogCursor, LogReader};
use amplog_streams::{CloudEvent, KafkaConfig, Relay, RELAY};
use anyhow::{Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
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

/// What the relay publishes for the whole log: `(aggregate type, key, envelope bytes)`.
async fn envelopes(pool: &PgPool) -> Result<Vec<(String, String, Vec<u8>)>> {
    // A catch-up: an empty batch is not the end while another transaction holds the xmin.
    let store = EventStore::default();
    let events = LogReader::new(pool.clone()).catch_up(LogCursor::default(), 10_000).await?.rest().await?;
    Ok(events
        .iter()
        .map(|event| {
            let envelope = CloudEvent::from_recorded(event, &store).to_bytes();
            (event.aggregate_type.clone(), event.aggregate_id.clone(), envelope)
        })
        .collect())
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

/// Raw baseline: the same records through one rdkafka producer with the same delivery
/// settings (idempotent, acks=all), every delivery reported, none failed. With `header`, a
/// record is what the relay sends: topic, key, envelope and the `content-type` header the
/// CloudEvents Kafka binding requires of every structured-mode message; without, the
/// envelope alone (the baseline of earlier sessions, still reported). Timed as the relay's
/// catch-up is: from creating the producer to the last delivery report, which it waits for
/// as the relay does (not with `flush`, which polls in 100 ms steps), and not through the
/// producer's drop (rust-rdkafka's `ThreadedProducer` joins its polling thread, which
/// sleeps out its current 100 ms wait: 0 to 0.1 s of nothing, drawn anew in every run).
/// It asks for every topic's metadata first, as the relay does: else librdkafka's
/// idempotent producer waits up to 500 ms for its producer id, and a message for a topic
/// without metadata waits for librdkafka's own request (docs/benchmarks-history.md).
async fn raw_produce(config: &KafkaConfig, envelopes: &[(String, String, Vec<u8>)], header: bool) -> Result<Duration> {
    let topics: HashMap<&str, String> =
        envelopes.iter().map(|(kind, ..)| (kind.as_str(), config.aggregate_topic(kind))).collect();
    let started = Instant::now();
    let deliveries =
        Deliveries { expected: envelopes.len(), reported: 0.into(), failed: 0.into(), all: Default::default() };
    let producer: ThreadedProducer<Deliveries> = config.producer()?.create_with_context(deliveries)?;
    tokio::task::block_in_place(|| amplog_streams::topics::fetch_metadata(producer.client(), &config.topics()))?;
    for (kind, key, payload) in envelopes {
        let mut record = BaseRecord::to(&topics[kind.as_str()]).key(key).payload(payload);
        if header {
            record = record.headers(amplog_streams::envelope::headers());
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }
    tokio::time::timeout(Duration::from_secs(60), producer.context().all.notified()).await?;
    let took = started.elapsed();
    anyhow::ensure!(producer.context().failed.load(Ordering::Relaxed) == 0, "raw deliveries failed");
    Ok(took)
}

/// Catch-ups measured per side, in runs taken in turn: relay, raw with the header, raw
/// without (one run is ~0.3-0.8 s, and single runs on two shared cores vary by ±15 %).
const CATCH_UP_RUNS: usize = 5;

pub async fn run(report: &mut Report, url: &str, brokers: &str, events: usize, rate: u64, seconds: u64) -> Result<()> {
    let pool = crate::fresh_database(url, "amplog_bench_relay").await?;
    let svc = crate::service(&pool);
    eprintln!("relay: seeding {events} events across 1,000 operations...");
    // Autovacuum would process the fresh log during some catch-ups and not others: off,
    // the relay finds rows as a live relay does (not yet vacuumed, hint bits unset).
    sqlx::query("ALTER TABLE events SET (autovacuum_enabled = false)").execute(&pool).await?;
    let (ctx, ops) = seed(&svc, events).await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&pool).await?;

    // Catch-up: the relay from an empty checkpoint to the log's end, each run to topics of
    // its own; and the raw producer sending the same envelopes, built beforehand, to yet
    // other topics. The first run finds the rows as a live relay does, later ones with
    // their hint bits set by the reads before.
    let envelopes = envelopes(&pool).await?;
    let (mut relay_walls, mut raw_walls) = (Vec::new(), [Vec::new(), Vec::new()]);
    for run in 1..=CATCH_UP_RUNS {
        sqlx::query("DELETE FROM reader_checkpoints WHERE name = $1").bind(RELAY).execute(&pool).await?;
        let ours = config(brokers);
        amplog_streams::topics::ensure_topics(&ours, &ours.topics()).await?;
        let relay = Relay::new(pool.clone(), EventStore::default(), ours.clone(), "bench")?;
        eprintln!("relay catch-up, run {run}/{CATCH_UP_RUNS}: {total} events...");
        let cpu = CpuSnapshot::now();
        let caught_up = relay.catch_up().await?.context("the relay leads")?;
        eprintln!(
            "  relay: {} events until checkpointed in {:.3} s; {}",
            caught_up.events,
            caught_up.took.as_secs_f64(),
            cpu.since()
        );
        // The baseline sends exactly what the relay relayed, or the ratio means nothing.
        anyhow::ensure!(
            caught_up.events == envelopes.len() as u64,
            "the relay relayed {} events, the raw baseline has {}",
            caught_up.events,
            envelopes.len()
        );
        relay_walls.push((caught_up.events, caught_up.took));
        delete_topics(&ours).await?;
        for (header, walls) in [true, false].into_iter().zip(&mut raw_walls) {
            let raw_config = config(brokers);
            amplog_streams::topics::ensure_topics(&raw_config, &raw_config.topics()).await?;
            let cpu = CpuSnapshot::now();
            let took = raw_produce(&raw_config, &envelopes, header).await?;
            let what = if header { "same records" } else { "no header" };
            eprintln!(
                "  raw ({what}): {} messages delivered in {:.3} s; {}",
                envelopes.len(),
                took.as_secs_f64(),
                cpu.since()
            );
            walls.push((envelopes.len() as u64, took));
            delete_topics(&raw_config).await?;
        }
    }
    let relay_rate = median_rate(&relay_walls);
    let [with_header, without] = raw_walls.each_ref().map(|walls| median_rate(walls));
    let relayed = relay_walls[0].0;
    report.rows.push(format!(
        "| relay catch-up into Kafka ({relayed} events + 1,000 jobs, log → CloudEvents → acknowledged, checkpointed), median of {CATCH_UP_RUNS} runs | {relay_rate:.0} events/s ({}) | {with_header:.0} messages/s ({}), raw rdkafka producer, same records (with their content-type header), same settings | {:.2} (target ≥ 0.5) |",
        rates(&relay_walls),
        rates(&raw_walls[0]),
        relay_rate / with_header
    ));
    report.rows.push(format!(
        "| the same, against the raw producer sending the envelopes without the header | | {without:.0} messages/s ({}) | {:.2} |",
        rates(&raw_walls[1]),
        relay_rate / without
    ));
    for row in &report.rows[report.rows.len() - 2..] {
        eprintln!("{row}");
    }

    let ours = config(brokers);
    amplog_streams::topics::ensure_topics(&ours, &ours.topics()).await?;
    e2e_latency(report, &pool, &svc, &ctx, &ops, &ours, rate, seconds).await?;
    pool.close().await;
    Ok(())
}

/// Deletes a run's topics, so that the broker holds only one run's messages at a time:
/// tansu's memory storage slows down as it fills (without this, its CPU per run rose from
/// 0.20 to 0.66 core-s by the third round of three runs).
async fn delete_topics(config: &KafkaConfig) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = config.admin().create()?;
    let topics = config.topics();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    for result in admin.delete_topics(&names, &AdminOptions::new()).await? {
        result.map_err(|(topic, code)| anyhow::anyhow!("deleting topic {topic}: {code}"))?;
    }
    Ok(())
}

/// The median of runs' rates, each `(items, wall)`.
fn median_rate(runs: &[(u64, Duration)]) -> f64 {
    let mut rates: Vec<f64> = runs.iter().map(|(n, wall)| *n as f64 / wall.as_secs_f64()).collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// Each run's rate and wall, in run order.
fn rates(runs: &[(u64, Duration)]) -> String {
    let each: Vec<String> = runs
        .iter()
        .map(|(n, wall)| format!("{:.0}k/s in {:.2} s", *n as f64 / wall.as_secs_f64() / 1e3, wall.as_secs_f64()))
        .collect();
    format!("runs: {}", each.join(", "))
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
                let page = PageRecord { records: 10, bytes: 100, cursor: Cursor::default(), reread: 0 };
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
