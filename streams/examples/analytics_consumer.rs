//! An analytics consumer of amplog's event topics: joins a consumer group, reads
//! CloudEvents, skips the duplicates at-least-once delivery allows (by CloudEvents id),
//! takes the tenant from the envelope, and commits offsets after handling.
//!
//!     cargo run -p amplog-streams --example analytics_consumer -- 127.0.0.1:9092 amplog.installation.v1
//!
//! A real consumer keeps the seen ids (or the highest `sequence` per `subject`) in its own
//! store, in the same transaction as what it derives from the event.

use amplog_streams::CloudEvent;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::Message;
use std::collections::HashMap;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let brokers = args.next().unwrap_or_else(|| "127.0.0.1:9092".into());
    let topic = args.next().unwrap_or_else(|| "amplog.installation.v1".into());
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "analytics-example")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&topic])?;
    // Per aggregate, the highest sequence handled: an event at or below it is a duplicate.
    let mut handled: HashMap<String, i64> = HashMap::new();
    loop {
        let message = consumer.recv().await?;
        let event = CloudEvent::parse(message.payload().unwrap_or_default())?;
        let sequence = event.sequence.unwrap_or_default();
        let last = handled.entry(event.subject.clone()).or_insert(0);
        if sequence > *last {
            *last = sequence;
            // The tenant is the envelope's `projectid`, never a field of `data`.
            println!(
                "{} project={} {} #{} {}",
                event.time,
                event.projectid.map(|p| p.to_string()).unwrap_or_default(),
                event.event_type,
                sequence,
                event.subject
            );
        }
        consumer.commit_message(&message, CommitMode::Async)?;
    }
}
