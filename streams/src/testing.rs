//! Test helpers (feature `testing`): the test broker's configuration with topics of their
//! own per test, and a collector that reads topics back and checks per-aggregate order.

use crate::envelope::CloudEvent;
use crate::KafkaConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// The broker `scripts/test` started.
pub fn brokers() -> String {
    std::env::var("AMPLOG_TEST_KAFKA_BROKERS")
        .expect("AMPLOG_TEST_KAFKA_BROKERS must name a Kafka-protocol broker (scripts/test starts one)")
}

/// A configuration on the test broker whose topics no other test uses.
pub fn kafka_config() -> KafkaConfig {
    config_on(&brokers())
}

pub fn config_on(brokers: &str) -> KafkaConfig {
    let mut config = KafkaConfig::new(brokers);
    config.topic_prefix = format!("t{}.", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    config.partitions = 3;
    config
}

/// One message read back.
#[derive(Clone, Debug)]
pub struct Received {
    pub topic: String,
    pub key: String,
    pub partition: i32,
    pub offset: i64,
    pub content_type: Option<String>,
    pub event: CloudEvent,
}

/// Reads topics from their beginning (assigned partitions, no group).
pub struct Collector {
    consumer: StreamConsumer,
    pub received: Vec<Received>,
}

impl Collector {
    pub async fn new(config: &KafkaConfig, topics: &[String]) -> Self {
        crate::topics::ensure_topics(config, topics).await.expect("create topics");
        let consumer: StreamConsumer = config.consumer("amplog-test-collector").create().expect("consumer");
        let mut assignment = TopicPartitionList::new();
        for topic in topics {
            for partition in 0..config.partitions {
                assignment.add_partition_offset(topic, partition, Offset::Beginning).expect("offset");
            }
        }
        consumer.assign(&assignment).expect("assign");
        Self { consumer, received: Vec::new() }
    }

    /// Reads until `done` holds for what was received, or `timeout`. Returns whether it held.
    pub async fn until(&mut self, timeout: Duration, done: impl Fn(&[Received]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(&self.received) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let Ok(message) = tokio::time::timeout(left.min(Duration::from_millis(500)), self.consumer.recv()).await
            else {
                continue;
            };
            let message = message.expect("consume");
            use rdkafka::message::Headers;
            let content_type = message.headers().and_then(|h| {
                h.iter().find(|h| h.key == "content-type").and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into())
            });
            self.received.push(Received {
                topic: message.topic().to_string(),
                key: String::from_utf8_lossy(message.key().unwrap_or_default()).into(),
                partition: message.partition(),
                offset: message.offset(),
                content_type,
                event: CloudEvent::parse(message.payload().unwrap_or_default()).expect("a CloudEvent"),
            });
        }
        true
    }

    /// Reads for `quiet` more, to catch anything still arriving (duplicates).
    pub async fn drain(&mut self, quiet: Duration) {
        self.until(quiet, |_| false).await;
    }
}

/// What arrived, per `(subject, sequence)`, in arrival order.
#[derive(Debug, Default)]
pub struct OrderReport {
    pub distinct: usize,
    pub duplicates: usize,
    /// First arrivals whose sequence was not above every earlier first arrival of the same
    /// aggregate: `(subject, sequence, previous highest)`.
    pub out_of_order: Vec<(String, i64, i64)>,
}

pub fn order_report(received: &[Received]) -> OrderReport {
    let mut seen = HashSet::new();
    let mut highest: HashMap<&str, i64> = HashMap::new();
    let mut report = OrderReport::default();
    for r in received {
        let sequence = r.event.sequence.expect("event envelopes carry a sequence");
        if !seen.insert((r.event.subject.as_str(), sequence)) {
            report.duplicates += 1;
            continue;
        }
        report.distinct += 1;
        let top = highest.entry(r.event.subject.as_str()).or_insert(0);
        if sequence <= *top {
            report.out_of_order.push((r.event.subject.clone(), sequence, *top));
        }
        *top = (*top).max(sequence);
    }
    report
}
