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
    /// Distinct CloudEvents ids received.
    ids: HashSet<String>,
}

impl Collector {
    pub async fn new(config: &KafkaConfig, topics: &[String]) -> Self {
        crate::topics::ensure_topics(config, topics).await.expect("create topics");
        let mut client = config.consumer("amplog-test-collector");
        // tansu answers a fetch with one record batch: ask again at once.
        client.set("fetch.wait.max.ms", "10");
        let consumer: StreamConsumer = client.create().expect("consumer");
        let mut assignment = TopicPartitionList::new();
        for topic in topics {
            for partition in 0..config.partitions {
                assignment.add_partition_offset(topic, partition, Offset::Beginning).expect("offset");
            }
        }
        consumer.assign(&assignment).expect("assign");
        Self { consumer, received: Vec::new(), ids: HashSet::new() }
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
                h.iter()
                    .find(|h| h.key == "content-type")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into())
            });
            let event = CloudEvent::parse(message.payload().unwrap_or_default()).expect("a CloudEvent");
            self.ids.insert(event.id.clone());
            self.received.push(Received {
                topic: message.topic().to_string(),
                key: String::from_utf8_lossy(message.key().unwrap_or_default()).into(),
                partition: message.partition(),
                offset: message.offset(),
                content_type,
                event,
            });
        }
        true
    }

    /// Reads until `distinct` different events arrived, or `timeout`.
    pub async fn until_distinct(&mut self, distinct: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.ids.len() < distinct && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let before = self.received.len();
            self.until(left.min(Duration::from_secs(1)), |r| r.len() > before).await;
        }
        self.ids.len() >= distinct
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

/// A broker of a test's own (`AMPLOG_TEST_TANSU`), on sqlite storage so its data survives a
/// restart, for tests that restart it or load it heavily.
pub struct OwnBroker {
    dir: tempfile::TempDir,
    port: u16,
    storage: &'static str,
    child: Option<std::process::Child>,
}

impl OwnBroker {
    pub fn start() -> Self {
        Self::with_storage("sqlite://tansu.db")
    }

    /// On tansu's in-memory storage: faster to read back, lost on restart, and unable to
    /// serve a fetch that starts inside a record batch (fine for readers from the start).
    pub fn in_memory() -> Self {
        Self::with_storage("memory://tansu/")
    }

    fn with_storage(storage: &'static str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut broker = Self { dir: tempfile::tempdir().unwrap(), port, storage, child: None };
        broker.restart();
        broker
    }

    pub fn restart(&mut self) {
        let tansu = std::env::var("AMPLOG_TEST_TANSU").unwrap_or_else(|_| "tansu".into());
        let url = format!("tcp://127.0.0.1:{}", self.port);
        // A sqlite path is relative to the broker's working folder.
        let storage = self.storage;
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("tansu.log")).unwrap();
        let child = std::process::Command::new(tansu)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", storage])
            .current_dir(self.dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tansu (AMPLOG_TEST_TANSU)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("tansu did not start on {}", self.port);
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill();
    }
}
