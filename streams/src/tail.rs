//! `amplog tail`: prints a topic's messages as JSON lines (analytics users, debugging).

use crate::{KafkaConfig, StreamsError};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use serde_json::{json, Value};
use std::future::Future;
use std::io::Write;

/// What to read.
#[derive(Clone, Debug)]
pub struct TailOptions {
    pub topic: String,
    /// From the oldest retained message instead of new ones only.
    pub from_beginning: bool,
    /// Stop after this many messages.
    pub max: Option<u64>,
}

/// Writes one JSON line per message (`topic`, `partition`, `offset`, `key`, `value`; the
/// value parsed as JSON when it is JSON) until `stop` resolves or `max` is reached. Reads
/// with a throwaway consumer group that never commits, so it disturbs no one.
pub async fn tail(
    config: &KafkaConfig,
    options: &TailOptions,
    mut out: impl Write,
    stop: impl Future<Output = ()>,
) -> Result<u64, StreamsError> {
    let group = format!("amplog-tail-{}", uuid::Uuid::new_v4());
    let mut client = config.consumer(&group);
    client.set("auto.offset.reset", if options.from_beginning { "earliest" } else { "latest" });
    let consumer: StreamConsumer = client.create()?;
    consumer.subscribe(&[&options.topic])?;
    tokio::pin!(stop);
    let mut printed = 0;
    while options.max.is_none_or(|max| printed < max) {
        let message = tokio::select! {
            _ = &mut stop => break,
            message = consumer.recv() => message?,
        };
        let value = message.payload().map(|bytes| {
            serde_json::from_slice::<Value>(bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into()))
        });
        let line = json!({
            "topic": message.topic(),
            "partition": message.partition(),
            "offset": message.offset(),
            "key": message.key().map(String::from_utf8_lossy),
            "value": value,
        });
        writeln!(out, "{line}")?;
        out.flush()?;
        printed += 1;
    }
    Ok(printed)
}
