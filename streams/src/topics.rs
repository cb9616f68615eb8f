//! Topic creation at start-up: brokers such as tansu do not auto-create topics, and a
//! production cluster should not, so amplog creates its topics with the configured
//! partitions and replication (an existing topic is left as it is); and asking for their
//! metadata before producing.

use crate::{KafkaConfig, StreamsError};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, DefaultClientContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use std::time::Duration;

/// Creates each of `topics` that does not exist yet.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[String]) -> Result<(), StreamsError> {
    let admin: AdminClient<DefaultClientContext> = config.admin().create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|name| NewTopic::new(name, config.partitions, TopicReplication::Fixed(config.replication)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new, &options).await;
    // Dropping an admin client joins its thread, ~0.1 s: the answer is already here (a
    // relay's catch-up waited that long before producing anything).
    tokio::task::spawn_blocking(move || drop(admin));
    for result in results? {
        match result {
            Ok(name) => tracing::info!(topic = %name, partitions = config.partitions, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(StreamsError::Config(format!("creating topic {name}: {code}")));
            }
        }
    }
    Ok(())
}

/// Asks for each topic's metadata, all at once, and waits for the answers (blocking: call it
/// off the async threads). A producer that has them sends a topic's first message without
/// waiting for librdkafka's own request, and its idempotent producer asks for its producer
/// id at the first answer instead of on a 500 ms timer (docs/benchmarks-history.md).
pub fn fetch_metadata<C: ClientContext>(client: &Client<C>, topics: &[String]) -> Result<(), KafkaError> {
    std::thread::scope(|scope| {
        let asks: Vec<_> = topics
            .iter()
            .map(|topic| scope.spawn(move || client.fetch_metadata(Some(topic), Duration::from_secs(5))))
            .collect();
        asks.into_iter()
            .try_for_each(|ask| ask.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)).map(drop))
    })
}
