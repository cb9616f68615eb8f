//! Lifecycle notifications: the topics a builder can subscribe a destination to, each
//! derived from one kind of event in the log, and how a subscription's patterns match them.

/// Every topic, with the event it comes from.
pub const TOPICS: &[(&str, &str)] = &[
    ("installation.created", "an installation was created (by the API or a connect session)"),
    ("installation.updated", "an installation's revision or objects changed"),
    ("installation.paused", "an installation was paused: no reads run"),
    ("installation.unpaused", "an installation was unpaused"),
    ("installation.deleted", "an installation was deleted"),
    ("connection.created", "a customer's account was connected"),
    ("connection.needs_reauth", "a refresh was refused: the customer must connect again"),
    ("connection.reconnected", "a connection that needed re-authentication works again"),
    ("connection.revoked", "a connection was revoked"),
    ("read.succeeded", "a read finished"),
    ("read.backfill_done", "an object's backfill read finished: incremental reads from now on"),
    ("read.failed", "a read failed"),
    ("write.succeeded", "a write finished (each record's outcome is in the operation)"),
    ("write.failed", "a write failed"),
    ("operation.dead_lettered", "an operation failed after all its attempts: replay it once fixed"),
    ("destination.disabled", "a destination answered 410 Gone and receives nothing more"),
    ("connect_session.completed", "an end user finished a connect session"),
];

/// The most topics (or patterns) one subscription names.
pub const TOPICS_MAX: usize = 32;

pub fn is_topic(name: &str) -> bool {
    TOPICS.iter().any(|(t, _)| *t == name)
}

/// A subscription's pattern: a topic, `{group}.*` (every topic of a group) or `*`.
pub fn is_pattern(pattern: &str) -> bool {
    if pattern == "*" || is_topic(pattern) {
        return true;
    }
    pattern.strip_suffix(".*").is_some_and(|group| TOPICS.iter().any(|(t, _)| t.split('.').next() == Some(group)))
}

pub fn matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_name_topics_or_groups() {
        assert!(is_pattern("read.failed") && is_pattern("read.*") && is_pattern("*"));
        for bad in ["read", "read.", "reads.*", "read.**", "*.failed", "", "READ.FAILED", "read.failed "] {
            assert!(!is_pattern(bad), "{bad}");
        }
        assert!(matches("read.*", "read.failed") && !matches("read.*", "write.failed"));
        assert!(matches("*", "destination.disabled") && matches("write.failed", "write.failed"));
        assert!(TOPICS.iter().all(|(t, _)| t.split('.').count() == 2));
    }
}
