//! Topic creation at start-up: brokers such as tansu do not auto-create topics, and a
//! production cluster should not, so amplog creates its topics with the configured
//! partitions and replication (an existing topic is left as it is).

use crate::{KafkaConfig, StreamsError};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
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
