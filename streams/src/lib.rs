//! Kafka: the relay from the log to topics, the CloudEvents envelope, consumers and sync-job
//! dispatch with its in-process fallback. Not built yet: issue 6.
