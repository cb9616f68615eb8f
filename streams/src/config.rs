//! Kafka settings: where the brokers are, how topics are named and sized, and the producer
//! settings the relay insists on. Extra librdkafka properties (security, compression,
//! batching) pass through, but never one that could reorder or drop a message.

use crate::StreamsError;
use rdkafka::ClientConfig;
use std::collections::BTreeMap;

/// The aggregate types that get a topic each.
pub const AGGREGATE_TYPES: &[&str] = &[
    "project",
    "integration",
    "connection",
    "installation",
    "operation",
    "provider_app",
    "connect_session",
    "organization",
    "admin_key",
    "change",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Prepended to every topic name (`amplog.` gives `amplog.installation.v1`).
    pub topic_prefix: String,
    /// Partitions of the topics created at start-up.
    pub partitions: i32,
    /// Replication factor of the topics created at start-up.
    pub replication: i32,
    /// Extra librdkafka properties for every client (checked by `check_properties`).
    pub properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic_prefix: "amplog.".into(),
            partitions: 6,
            replication: 1,
            properties: BTreeMap::new(),
        }
    }

    /// Parses `key=value` pairs separated by commas (the CLI's `--kafka-property` form).
    pub fn with_properties(mut self, pairs: &[String]) -> Result<Self, StreamsError> {
        for pair in pairs {
            let (key, value) =
                pair.split_once('=').ok_or_else(|| StreamsError::Config(format!("`{pair}` is not key=value")))?;
            self.properties.insert(key.trim().to_string(), value.trim().to_string());
        }
        check_properties(&self.properties)?;
        Ok(self)
    }

    /// The topic of one aggregate type's events.
    pub fn aggregate_topic(&self, aggregate_type: &str) -> String {
        format!("{}{aggregate_type}.v1", self.topic_prefix)
    }

    /// The topic sync jobs are dispatched on, keyed by installation.
    pub fn jobs_topic(&self) -> String {
        format!("{}jobs.v1", self.topic_prefix)
    }

    /// Lifecycle notifications (`notifications::derive`), keyed by installation.
    pub fn notifications_topic(&self) -> String {
        format!("{}notifications.v1", self.topic_prefix)
    }

    /// Where jobs that keep failing go, with their error.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}jobs.dead-letter.v1", self.topic_prefix)
    }

    /// Every topic amplog writes to.
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = AGGREGATE_TYPES.iter().map(|t| self.aggregate_topic(t)).collect();
        topics.push(self.jobs_topic());
        topics.push(self.dead_letter_topic());
        topics.push(self.notifications_topic());
        topics
    }

    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    /// Admin clients (topic creation).
    pub fn admin(&self) -> ClientConfig {
        self.client()
    }

    /// The producer settings that keep every aggregate's events in order and lose none:
    /// idempotence (acks=all, at most 5 requests in flight, retries), the gapless guarantee
    /// (a gap is a fatal error, never a silent skip), and no delivery timeout, so an
    /// unreachable broker delays messages instead of failing them.
    pub fn producer(&self) -> Result<ClientConfig, StreamsError> {
        check_properties(&self.properties)?;
        let mut config = ClientConfig::new();
        // Batching defaults first; the caller's properties may tune them; safety last.
        config.set("linger.ms", "5").set("batch.num.messages", "10000");
        for (key, value) in self.client().config_map() {
            config.set(key, value);
        }
        for (key, value) in SAFE_PRODUCER {
            config.set(*key, *value);
        }
        Ok(config)
    }

    /// A consumer of `group` that commits offsets only when told to.
    pub fn consumer(&self, group: &str) -> ClientConfig {
        let mut config = self.client();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000");
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }
}

const SAFE_PRODUCER: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("max.in.flight.requests.per.connection", "5"),
    ("enable.gapless.guarantee", "true"),
    ("message.timeout.ms", "0"),
    ("partitioner", "murmur2_random"),
];

/// Refuses properties that could reorder, drop or duplicate-out-of-order messages, or that
/// turn off the offset discipline of the consumers.
pub fn check_properties(properties: &BTreeMap<String, String>) -> Result<(), StreamsError> {
    for (key, value) in properties {
        let refuse =
            |why: &'static str| Err(StreamsError::UnsafeSetting { key: key.clone(), value: value.clone(), why });
        let number = || value.parse::<i64>().ok();
        match key.as_str() {
            "enable.idempotence" if value != "true" => return refuse("the relay's producer must be idempotent"),
            "acks" | "request.required.acks" if value != "all" && value != "-1" => {
                return refuse("only acks=all survives a leader change without loss")
            }
            "max.in.flight.requests.per.connection" | "max.in.flight" if number().is_none_or(|n| n > 5) => {
                return refuse("more than 5 requests in flight can reorder an idempotent producer's messages")
            }
            "retries" | "message.send.max.retries" if number().is_none_or(|n| n < 1) => {
                return refuse("a producer that does not retry drops messages on transient errors")
            }
            "enable.gapless.guarantee" if value != "true" => {
                return refuse("without the gapless guarantee a failed batch can leave a hole in a key's order")
            }
            "partitioner" if value == "random" => return refuse("a random partitioner splits an aggregate's events"),
            "transactional.id" => return refuse("amplog does not use Kafka transactions (DESIGN invariant 5)"),
            "enable.auto.commit" | "enable.auto.offset.store" if value != "false" => {
                return refuse("consumers commit an offset only after the job's outcome is recorded")
            }
            "bootstrap.servers" | "group.id" => return refuse("set by amplog itself"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn settings_that_could_reorder_or_drop_are_refused() {
        for (key, value) in [
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("acks", "0"),
            ("max.in.flight.requests.per.connection", "6"),
            ("retries", "0"),
            ("enable.gapless.guarantee", "false"),
            ("partitioner", "random"),
            ("transactional.id", "x"),
            ("enable.auto.commit", "true"),
        ] {
            let error = check_properties(&props(&[(key, value)])).unwrap_err();
            assert_eq!(error.code(), "unsafe_kafka_setting", "{key}={value}");
        }
        let safe = props(&[("compression.type", "lz4"), ("acks", "all"), ("linger.ms", "20"), ("retries", "10")]);
        check_properties(&safe).unwrap();
    }

    #[test]
    fn the_producer_config_is_idempotent_and_never_times_out() {
        let config = KafkaConfig::new("127.0.0.1:9092")
            .with_properties(&["compression.type=lz4".into(), "linger.ms=20".into()])
            .unwrap()
            .producer()
            .unwrap();
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("message.timeout.ms"), Some("0"));
        assert_eq!(config.get("compression.type"), Some("lz4"));
        assert_eq!(config.get("linger.ms"), Some("20"));
        assert!(KafkaConfig::new("b").with_properties(&["acks".into()]).is_err());
    }
}
