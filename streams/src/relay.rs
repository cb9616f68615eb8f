//! The relay: the log is the outbox. As the `kafka_relay` leader it reads the log through
//! the shared reader from its checkpoint, publishes every event to its aggregate type's
//! topic (keyed by aggregate id, CloudEvents JSON) and every job an event dispatches to the
//! jobs topic (keyed by installation), and moves its checkpoint only after the broker
//! acknowledged every message of a batch. Four stages on their own tasks, joined by
//! bounded channels: reading the log ahead, encoding each batch (stored payload text goes
//! into the envelope unparsed), producing, and acknowledging and checkpointing the batches
//! sent (up to `batches_in_flight` of them). Any error stops all four, drops the producer
//! and starts again from the checkpoint, so a message may be sent twice but an aggregate's
//! events are never skipped or reordered.

use crate::envelope::StoredEncoder;
use crate::jobs::{dispatches, job_for};
use crate::notifications;
use crate::{KafkaConfig, StreamsError};
use amplog_log::leader::{run_as_leader, Leadership};
use amplog_log::{CatchUp, EventStore, LogCursor, LogReader, StoredEvent, Subscription};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use sqlx::PgPool;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The relay's singleton and checkpoint name.
pub const RELAY: &str = "kafka_relay";

pub struct Relay {
    pool: PgPool,
    store: EventStore,
    config: KafkaConfig,
    pub holder: String,
    pub batch_size: i64,
    /// Batches sent but not yet acknowledged, at most: enough that the sending stage does
    /// not wait for acknowledgements while the broker is busy.
    pub batches_in_flight: usize,
}

/// What a catch-up relayed, and how long it took from its start until the last batch was
/// acknowledged and checkpointed (the producer's shutdown after that not counted: it waits
/// up to 0.1 s for the polling thread's current wait to end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaughtUp {
    pub events: u64,
    pub took: Duration,
}

/// A batch on its way: the cursor to save once every delivery is acknowledged.
enum Pending {
    Batch { cursor: LogCursor, events: usize, acks: Arc<BatchAcks> },
    Idle,
}

/// A batch's deliveries still unacknowledged, counted down by the producer's delivery
/// reports (one counter per batch, not a future per message), and the first failure.
struct BatchAcks {
    /// The batch's messages, plus one held by the sending stage until all are queued.
    outstanding: AtomicUsize,
    failed: OnceLock<KafkaError>,
    done: tokio::sync::Notify,
}

impl BatchAcks {
    fn new(messages: usize) -> Arc<Self> {
        Arc::new(Self {
            outstanding: AtomicUsize::new(messages + 1),
            failed: OnceLock::new(),
            done: Default::default(),
        })
    }

    fn release(&self) {
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one(); // kept for the waiter if it is not waiting yet
        }
    }

    /// Once every message of the batch is acknowledged: the first error reported, if any.
    async fn acknowledged(&self) -> Result<(), StreamsError> {
        self.done.notified().await;
        match self.failed.get() {
            Some(error) => Err(StreamsError::Kafka(error.clone())),
            None => Ok(()),
        }
    }
}

/// Hands each delivery report to its batch's counter (on the producer's polling thread).
struct Acknowledging;

impl ClientContext for Acknowledging {}

impl ProducerContext for Acknowledging {
    type DeliveryOpaque = Arc<BatchAcks>;

    fn delivery(&self, result: &DeliveryResult<'_>, acks: Arc<BatchAcks>) {
        if let Err((error, _)) = result {
            let _ = acks.failed.set(error.clone());
        }
        acks.release();
    }
}

type RelayProducer = ThreadedProducer<Acknowledging>;

impl Relay {
    /// Refuses producer settings that could reorder or drop messages.
    pub fn new(
        pool: PgPool,
        store: EventStore,
        config: KafkaConfig,
        holder: impl Into<String>,
    ) -> Result<Self, StreamsError> {
        config.producer()?;
        Ok(Self { pool, store, config, holder: holder.into(), batch_size: 5000, batches_in_flight: 20 })
    }

    /// Relays until `stop` resolves, leading whenever it can; recovers from broker and
    /// database outages by itself.
    pub async fn run(&self, stop: impl Future<Output = ()>) -> Result<(), StreamsError> {
        let pause = |_: &StreamsError| Duration::from_secs(1);
        run_as_leader(&self.pool, RELAY, &self.holder, stop, pause, |l| async { self.relay(l, false).await.map(drop) })
            .await;
        Ok(())
    }

    /// Relays everything committed now, as leader, then says what it relayed (benchmarks,
    /// one-shot jobs). `None` when another process leads.
    pub async fn catch_up(&self) -> Result<Option<CaughtUp>, StreamsError> {
        let started = Instant::now();
        let Some(leadership) = Leadership::try_acquire(&self.pool, RELAY, &self.holder).await? else {
            return Ok(None);
        };
        let (events, checkpointed) = self.relay(leadership, true).await?;
        let caught_up = CaughtUp { events, took: checkpointed.duration_since(started) };
        tracing::info!(events, seconds = caught_up.took.as_secs_f64(), "relay caught up");
        Ok(Some(caught_up))
    }

    /// Relays until it fails, or with `catch_up` until it reached the log's end as it found
    /// it: the events relayed, and when the last checkpoint was saved.
    async fn relay(&self, mut leadership: Leadership, catch_up: bool) -> Result<(u64, Instant), StreamsError> {
        // Topics are checked (and created) while the first batches are read and encoded,
        // then the producer asks for every topic's metadata: librdkafka's idempotent
        // producer requests its producer id when a metadata response arrives, else on a
        // 500 ms timer, and holds every message until it has one; and a message for a topic
        // it has no metadata for waits for its own request. The sending stage waits for both, so
        // the producer holds no message before the connecting threads let go of its handle
        // (an error's drop still purges the queue).
        let producer: Arc<RelayProducer> = Arc::new(self.config.producer()?.create_with_context(Acknowledging)?);
        let (config, connecting) = (self.config.clone(), producer.clone());
        let topics = tokio::spawn(async move {
            let ensured = crate::topics::ensure_topics(&config, &config.topics()).await;
            let topics = config.topics();
            // Errors show when producing; this only asks early.
            let _ =
                tokio::task::spawn_blocking(move || crate::topics::fetch_metadata(connecting.client(), &topics)).await;
            ensured
        });
        let reader = LogReader::new(self.pool.clone());
        let start = LogReader::checkpoint(&mut *self.pool.acquire().await?, RELAY).await?;
        let log = match catch_up {
            true => Log::CatchUp(reader.catch_up(start, self.batch_size).await?),
            false => {
                let mut subscription = reader.subscribe(start).await?;
                subscription.batch_size = self.batch_size;
                Log::Live(subscription)
            }
        };
        let (queue, mut acknowledged) = tokio::sync::mpsc::channel::<Pending>(self.batches_in_flight.max(1));
        tracing::info!(checkpoint = ?start, brokers = %self.config.brokers, "relaying");

        // Four stages on their own tasks: reading the log, encoding what was read, producing
        // it, and acknowledging what was sent (checkpoint).
        let (read, batches) = tokio::sync::mpsc::channel::<Option<Vec<StoredEvent>>>(2);
        let mut reading = tokio::spawn(read_log(log, read));
        let (prepared, messages) = tokio::sync::mpsc::channel::<Prepared>(2);
        let encoder = Encoder { pool: self.pool.clone(), store: self.store.clone(), config: self.config.clone() };
        let (recycle, recycled) = tokio::sync::mpsc::unbounded_channel::<Encoded>();
        let mut encoding = tokio::spawn(encoder.run(batches, prepared, recycled));
        // The producer lives until every delivery is acknowledged (the sending stage ends
        // earlier, and dropping the last handle purges what is still queued).
        let mut sending = tokio::spawn(produce(producer.clone(), topics, messages, queue, recycle));
        let joined = |stage: &'static str| {
            move |e: tokio::task::JoinError| StreamsError::RelayStage(format!("{stage} stage: {e}"))
        };
        let read = async { (&mut reading).await.map_err(joined("reading"))? };
        let encode = async { (&mut encoding).await.map_err(joined("encoding"))? };
        let send = async { (&mut sending).await.map_err(joined("sending"))? };
        let commit = async {
            let (mut relayed, mut reported, started) = (0u64, Instant::now(), Instant::now());
            let mut checkpointed = started;
            while let Some(pending) = acknowledged.recv().await {
                let (cursor, events, acks) = match pending {
                    Pending::Batch { cursor, events, acks } => (Some(cursor), events, Some(acks)),
                    Pending::Idle => (None, 0, None),
                };
                // A batch's span: from its last acknowledgement to its checkpoint.
                let span = match cursor {
                    Some(_) => tracing::info_span!("relay.batch", events),
                    None => tracing::Span::none(),
                };
                let checkpoint = async {
                    if let Some(acks) = acks {
                        acks.acknowledged().await?;
                    }
                    leadership.alive().await?;
                    let mut tx = amplog_log::tx::begin(&self.pool).await?;
                    if !leadership.fence(&mut tx).await? {
                        return Err(StreamsError::Fenced(RELAY.into()));
                    }
                    if let Some(cursor) = cursor {
                        LogReader::save_checkpoint(&mut tx, RELAY, cursor).await?;
                    }
                    tx.commit().await?;
                    Ok(())
                };
                tracing::Instrument::instrument(checkpoint, span).await?;
                checkpointed = Instant::now();
                relayed += events as u64;
                if events > 0 && reported.elapsed() >= Duration::from_secs(5) {
                    let rate = relayed as f64 / started.elapsed().as_secs_f64();
                    tracing::info!(relayed, rate = rate as u64, "relay progress");
                    reported = Instant::now();
                }
            }
            Ok((relayed, checkpointed))
        };
        let outcome = tokio::try_join!(read, encode, send, commit);
        // On any error the other stages stop too (their channels close, or they are
        // aborted here).
        reading.abort();
        encoding.abort();
        sending.abort();
        drop(producer);
        let ((), (), (), relayed) = outcome?;
        leadership.release().await;
        Ok(relayed)
    }
}

/// Where the reading stage reads from.
enum Log {
    /// Up to the log's end as it was at the start.
    CatchUp(CatchUp),
    /// Everything, waiting for new events.
    Live(Subscription),
}

/// The reading stage: reads the log ahead of the encoding stage; live, `None` when nothing
/// new came within a second. Ends when a catch-up read its last batch, or when the next
/// stage stopped.
async fn read_log(log: Log, out: tokio::sync::mpsc::Sender<Option<Vec<StoredEvent>>>) -> Result<(), StreamsError> {
    match log {
        Log::CatchUp(mut log) => {
            while let Some(batch) = log.next_stored().await? {
                if out.send(Some(batch)).await.is_err() {
                    break;
                }
            }
        }
        Log::Live(mut subscription) => loop {
            let batch = subscription.next_stored_batch_within(Duration::from_secs(1)).await?;
            if out.send((!batch.is_empty()).then_some(batch)).await.is_err() {
                break;
            }
        },
    }
    Ok(())
}

/// What the encoding stage hands the sending stage.
enum Prepared {
    /// A batch's messages, in log order, and the cursor of its last event.
    Batch { cursor: LogCursor, events: usize, messages: Encoded },
    /// Nothing new within a second (the commit stage still confirms its leadership).
    Idle,
}

/// A batch's messages, their payloads written one after another into one buffer. The
/// sending stage hands each buffer back once the producer has copied it, so a catch-up
/// reuses a few buffers instead of allocating (and the kernel zeroing) fresh memory for
/// every message.
#[derive(Default)]
struct Encoded {
    messages: Vec<Message>,
    payloads: Vec<u8>,
}

/// The payload capacity a recycled buffer keeps: a batch of ordinary events fits (5,000 of
/// ~600 bytes); a batch of large payloads gives its memory back once it is sent.
const KEPT: usize = 16 << 20;

/// One message to produce: its payload is `payloads[end of the previous one..end]`.
struct Message {
    topic: Arc<str>,
    key: String,
    end: usize,
}

impl Encoded {
    fn push(&mut self, topic: Arc<str>, key: String) {
        self.messages.push(Message { topic, key, end: self.payloads.len() });
    }

    /// Each message with its payload.
    fn iter(&self) -> impl Iterator<Item = (&Message, &[u8])> {
        let starts = std::iter::once(0).chain(self.messages.iter().map(|m| m.end));
        self.messages.iter().zip(starts).map(|(m, start)| (m, &self.payloads[start..m.end]))
    }

    /// Empties the buffer for the next batch, keeping at most `KEPT` bytes of it.
    fn clear(&mut self) {
        self.messages.clear();
        self.payloads.clear();
        self.payloads.shrink_to(KEPT);
    }
}

/// The encoding stage: turns each batch read into its messages (envelopes, and the jobs
/// the events dispatch).
struct Encoder {
    pool: PgPool,
    store: EventStore,
    config: KafkaConfig,
}

impl Encoder {
    /// Ends when the reading stage ended, or when the sending stage stopped.
    async fn run(
        self,
        mut batches: tokio::sync::mpsc::Receiver<Option<Vec<StoredEvent>>>,
        out: tokio::sync::mpsc::Sender<Prepared>,
        mut recycled: tokio::sync::mpsc::UnboundedReceiver<Encoded>,
    ) -> Result<(), StreamsError> {
        let mut conn = self.pool.acquire().await?;
        let jobs_topic: Arc<str> = self.config.jobs_topic().into();
        let notifications_topic: Arc<str> = self.config.notifications_topic().into();
        let mut envelopes = StoredEncoder::new(&self.store);
        // By aggregate type: a handful, found faster by comparing than by hashing.
        let mut topics: Vec<(String, Arc<str>)> = Vec::new();
        while let Some(batch) = batches.recv().await {
            let Some(last) = batch.as_ref().and_then(|batch| batch.last()) else {
                match out.send(Prepared::Idle).await {
                    Ok(()) => continue,
                    Err(_) => return Ok(()),
                }
            };
            let (cursor, batch) = (last.cursor(), batch.unwrap_or_default());
            let events = batch.len();
            let mut messages = recycled.try_recv().unwrap_or_default();
            for event in batch {
                let job = match dispatches(&event) {
                    true => job_for(&mut conn, &self.store, &event.clone().parse()?).await?,
                    false => None,
                };
                let notified = match notifications::notifies(&event) {
                    true => notifications::derive(&mut conn, &self.store, &event.clone().parse()?).await?,
                    false => Vec::new(),
                };
                let topic = match topics.iter().find(|(kind, _)| *kind == event.aggregate_type) {
                    Some((_, topic)) => topic.clone(),
                    None => {
                        let topic: Arc<str> = self.config.aggregate_topic(&event.aggregate_type).into();
                        topics.push((event.aggregate_type.clone(), topic.clone()));
                        topic
                    }
                };
                envelopes.encode(&event, &mut messages.payloads)?;
                messages.push(topic, event.aggregate_id);
                if let Some(job) = job {
                    serde_json::to_writer(&mut messages.payloads, &job.to_cloud_event())
                        .expect("an envelope always serialises");
                    messages.push(jobs_topic.clone(), job.key());
                }
                for notification in notified {
                    serde_json::to_writer(&mut messages.payloads, &notification.to_cloud_event())
                        .expect("an envelope always serialises");
                    messages.push(notifications_topic.clone(), notification.key.to_string());
                }
            }
            if out.send(Prepared::Batch { cursor, events, messages }).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// The sending stage: produces each batch's messages in order and queues their
/// deliveries for the commit stage.
async fn produce(
    producer: Arc<RelayProducer>,
    topics: tokio::task::JoinHandle<Result<(), StreamsError>>,
    mut batches: tokio::sync::mpsc::Receiver<Prepared>,
    queue: tokio::sync::mpsc::Sender<Pending>,
    recycle: tokio::sync::mpsc::UnboundedSender<Encoded>,
) -> Result<(), StreamsError> {
    topics.await.map_err(|e| StreamsError::RelayStage(format!("topic check: {e}")))??;
    while let Some(prepared) = batches.recv().await {
        let pending = match prepared {
            Prepared::Idle => Pending::Idle,
            Prepared::Batch { cursor, events, mut messages } => {
                let acks = BatchAcks::new(messages.messages.len());
                for (message, payload) in messages.iter() {
                    send_one(&producer, message, payload, &acks).await?;
                }
                acks.release();
                messages.clear();
                let _ = recycle.send(messages); // the encoding stage may have ended
                Pending::Batch { cursor, events, acks }
            }
        };
        queue.send(pending).await.map_err(|_| closed())?;
    }
    Ok(())
}

fn closed() -> StreamsError {
    StreamsError::RelayStage("acknowledgement stage stopped".into())
}

/// Queues one message, waiting while the producer's local queue is full (order kept).
async fn send_one(
    producer: &RelayProducer,
    message: &Message,
    payload: &[u8],
    acks: &Arc<BatchAcks>,
) -> Result<(), StreamsError> {
    let mut record = BaseRecord::with_opaque_to(&message.topic, acks.clone())
        .key(&message.key)
        .payload(payload)
        .headers(crate::envelope::headers());
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((error, _)) => return Err(error.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_buffer_gives_each_message_its_own_payload() {
        let (topic, mut encoded): (Arc<str>, Encoded) = ("t".into(), Encoded::default());
        for round in 0..2 {
            for (key, payload) in [("a", &b"{\"n\":1}"[..]), ("b", b""), ("c", b"[2]")] {
                encoded.payloads.extend_from_slice(payload);
                encoded.push(topic.clone(), format!("{key}{round}"));
            }
            let sent: Vec<(String, &[u8])> = encoded.iter().map(|(m, p)| (m.key.clone(), p)).collect();
            let expected =
                [(format!("a{round}"), &b"{\"n\":1}"[..]), (format!("b{round}"), b""), (format!("c{round}"), b"[2]")];
            assert_eq!(sent, expected);
            encoded.clear();
            assert!(encoded.iter().next().is_none() && encoded.payloads.capacity() > 0);
        }
        encoded.payloads.resize(KEPT * 2, b' ');
        encoded.push(topic, "big".into());
        encoded.clear();
        assert!(encoded.payloads.capacity() <= KEPT, "a large batch's buffer is not kept whole");
    }
}
