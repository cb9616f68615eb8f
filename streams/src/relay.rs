//! The relay: the log is the outbox. As the `kafka_relay` leader it reads the log through
//! the shared reader from its checkpoint, publishes every event to its aggregate type's
//! topic (keyed by aggregate id, CloudEvents JSON) and every job an event dispatches to the
//! jobs topic (keyed by installation), and moves its checkpoint only after the broker
//! acknowledged every message of a batch. Sending and acknowledging are pipelined (a few
//! batches in flight); any error drops the producer and starts again from the checkpoint,
//! so a message may be sent twice but an aggregate's events are never skipped or reordered.

use crate::envelope::{CloudEvent, CONTENT_TYPE};
use crate::jobs::job_for;
use crate::{KafkaConfig, StreamsError};
use amplog_commands::leader::{run_as_leader, Leadership};
use amplog_commands::{EventStore, LogCursor, LogReader};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use sqlx::PgPool;
use std::future::Future;
use std::time::{Duration, Instant};

/// The relay's singleton and checkpoint name.
pub const RELAY: &str = "kafka_relay";

pub struct Relay {
    pool: PgPool,
    store: EventStore,
    config: KafkaConfig,
    pub holder: String,
    pub batch_size: i64,
    /// Batches sent but not yet acknowledged, at most.
    pub batches_in_flight: usize,
}

/// A batch on its way: the cursor to save once every delivery is acknowledged.
enum Pending {
    Batch { cursor: LogCursor, events: usize, deliveries: Vec<DeliveryFuture> },
    Idle,
}

impl Relay {
    /// Refuses producer settings that could reorder or drop messages.
    pub fn new(
        pool: PgPool,
        store: EventStore,
        config: KafkaConfig,
        holder: impl Into<String>,
    ) -> Result<Self, StreamsError> {
        config.producer()?;
        Ok(Self { pool, store, config, holder: holder.into(), batch_size: 2000, batches_in_flight: 4 })
    }

    /// Relays until `stop` resolves, leading whenever it can; recovers from broker and
    /// database outages by itself.
    pub async fn run(&self, stop: impl Future<Output = ()>) -> Result<(), StreamsError> {
        let pause = |_: &StreamsError| Duration::from_secs(1);
        run_as_leader(&self.pool, RELAY, &self.holder, stop, pause, |l| async { self.relay(l, None).await.map(drop) })
            .await;
        Ok(())
    }

    /// Relays everything committed now, as leader, then returns the number of events
    /// relayed (benchmarks, one-shot jobs). `None` when another process leads.
    pub async fn catch_up(&self) -> Result<Option<u64>, StreamsError> {
        let Some(leadership) = Leadership::try_acquire(&self.pool, RELAY, &self.holder).await? else {
            return Ok(None);
        };
        let end = LogReader::new(self.pool.clone()).end().await?;
        Ok(Some(self.relay(leadership, Some(end)).await?))
    }

    async fn relay(&self, mut leadership: Leadership, end: Option<i64>) -> Result<u64, StreamsError> {
        crate::topics::ensure_topics(&self.config, &self.config.topics()).await?;
        let producer: FutureProducer = self.config.producer()?.create()?;
        let reader = LogReader::new(self.pool.clone());
        let start = LogReader::checkpoint(&mut *self.pool.acquire().await?, RELAY).await?;
        let mut subscription = reader.subscribe(start).await?;
        subscription.batch_size = self.batch_size;
        let (queue, mut acknowledged) = tokio::sync::mpsc::channel::<Pending>(self.batches_in_flight.max(1));
        tracing::info!(checkpoint = ?start, brokers = %self.config.brokers, "relaying");

        // Reading and sending run on a task of their own, beside the acknowledging side.
        let sender = Sender {
            pool: self.pool.clone(),
            store: self.store.clone(),
            config: self.config.clone(),
            producer,
            reader,
            queue,
        };
        let mut sending = tokio::spawn(sender.run(subscription, end));
        let send =
            async { (&mut sending).await.map_err(|e| StreamsError::Config(format!("the relay's sender: {e}")))? };
        let commit = async {
            let (mut relayed, mut reported, started) = (0u64, Instant::now(), Instant::now());
            while let Some(pending) = acknowledged.recv().await {
                let (cursor, events) = match pending {
                    Pending::Batch { cursor, events, deliveries } => {
                        for delivery in deliveries {
                            match delivery.await {
                                Ok(Ok(_)) => {}
                                Ok(Err((error, _))) => return Err(StreamsError::Kafka(error)),
                                Err(_) => return Err(StreamsError::Kafka(KafkaError::Canceled)),
                            }
                        }
                        (Some(cursor), events)
                    }
                    Pending::Idle => (None, 0),
                };
                leadership.alive().await?;
                let mut tx = self.pool.begin().await?;
                if !leadership.fence(&mut tx).await? {
                    return Err(StreamsError::Fenced(RELAY.into()));
                }
                if let Some(cursor) = cursor {
                    LogReader::save_checkpoint(&mut tx, RELAY, cursor).await?;
                }
                tx.commit().await?;
                relayed += events as u64;
                if events > 0 && reported.elapsed() >= Duration::from_secs(5) {
                    let rate = relayed as f64 / started.elapsed().as_secs_f64();
                    tracing::info!(relayed, rate = rate as u64, "relay progress");
                    reported = Instant::now();
                }
            }
            Ok(relayed)
        };
        let outcome = tokio::try_join!(send, commit);
        // On any error the sender stops too (its queue closes, or it is aborted here).
        sending.abort();
        let ((), relayed) = outcome?;
        leadership.release().await;
        Ok(relayed)
    }
}

/// The sending side: reads batches, publishes them, queues their deliveries.
struct Sender {
    pool: PgPool,
    store: EventStore,
    config: KafkaConfig,
    producer: FutureProducer,
    reader: LogReader,
    queue: tokio::sync::mpsc::Sender<Pending>,
}

impl Sender {
    async fn run(self, mut subscription: amplog_commands::Subscription, end: Option<i64>) -> Result<(), StreamsError> {
        let jobs_topic = self.config.jobs_topic();
        let mut conn = self.pool.acquire().await?;
        loop {
            let batch = subscription.next_batch_within(Duration::from_secs(1)).await?;
            let Some(last) = batch.last() else {
                if let Some(end) = end {
                    if self.reader.committed_after(subscription.cursor(), end).await? == 0 {
                        return Ok(());
                    }
                }
                self.queue.send(Pending::Idle).await.map_err(|_| closed())?;
                continue;
            };
            let (cursor, events) = (last.cursor(), batch.len());
            let mut deliveries = Vec::with_capacity(events);
            for event in batch {
                let job = job_for(&mut conn, &self.store, &event).await?;
                let topic = self.config.aggregate_topic(&event.aggregate_type);
                let key = event.aggregate_id.clone();
                let envelope = CloudEvent::from_event(event, &self.store).to_bytes();
                deliveries.push(send_one(&self.producer, &topic, &key, &envelope).await?);
                if let Some(job) = job {
                    let envelope = job.to_cloud_event().to_bytes();
                    deliveries.push(send_one(&self.producer, &jobs_topic, &job.key(), &envelope).await?);
                }
            }
            let pending = Pending::Batch { cursor, events, deliveries };
            self.queue.send(pending).await.map_err(|_| closed())?;
        }
    }
}

fn closed() -> StreamsError {
    StreamsError::Config("the relay's acknowledgement side stopped".into())
}

/// Queues one message, waiting while the producer's local queue is full (order kept).
async fn send_one(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> Result<DeliveryFuture, StreamsError> {
    loop {
        let headers = OwnedHeaders::new().insert(Header { key: "content-type", value: Some(CONTENT_TYPE) });
        let record = FutureRecord::to(topic).key(key).payload(payload).headers(headers);
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(2)).await
            }
            Err((error, _)) => return Err(error.into()),
        }
    }
}
