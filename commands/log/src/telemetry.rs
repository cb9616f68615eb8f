//! What this process did, as Prometheus metrics of its own (every role serves them at
//! `/metrics`): HTTP requests, webhook attempts, leadership, lease takeovers and its
//! database pool. The metrics derived from the log and the read models are the same on
//! every replica and rendered by `amplog-projections`; these differ per process.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{LazyLock, Mutex};

type Labels = Vec<(&'static str, String)>;

/// Request durations' buckets, in seconds.
const HTTP_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

fn http_histogram() -> Histogram {
    Histogram::new(HTTP_BUCKETS.iter().copied())
}

/// The process's metrics.
pub struct ProcessMetrics {
    http: Family<Labels, Histogram, fn() -> Histogram>,
    webhook_attempts: Family<Labels, Counter>,
    webhook_failures: Family<Labels, Counter>,
    leader: Family<Labels, Gauge>,
    leader_changes: Family<Labels, Counter>,
    lease_takeovers: Counter,
    graphql_answers: Family<Labels, Counter>,
    pool_waiting: AtomicI64,
    pools: Mutex<Vec<PgPool>>,
    per_project: AtomicBool,
}

static METRICS: LazyLock<ProcessMetrics> = LazyLock::new(|| ProcessMetrics {
    http: Family::new_with_constructor(http_histogram),
    webhook_attempts: Family::default(),
    webhook_failures: Family::default(),
    leader: Family::default(),
    leader_changes: Family::default(),
    lease_takeovers: Counter::default(),
    graphql_answers: Family::default(),
    pool_waiting: AtomicI64::new(0),
    pools: Mutex::new(Vec::new()),
    per_project: AtomicBool::new(false),
});

/// This process's metrics.
pub fn metrics() -> &'static ProcessMetrics {
    &METRICS
}

/// A request method as a label: the standard ones, every other token `other` (a client
/// may send any).
pub fn method_label(method: &str) -> &'static str {
    const KNOWN: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"];
    KNOWN.iter().find(|m| **m == method).copied().unwrap_or("other")
}

/// What a webhook carried: a read's records to a destination, or a lifecycle notification.
#[derive(Clone, Copy, Debug)]
pub enum WebhookKind {
    Records,
    Notification,
}

impl WebhookKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Records => "records",
            Self::Notification => "notification",
        }
    }
}

impl ProcessMetrics {
    /// One HTTP request answered: its route pattern (never the raw path), method and status.
    pub fn http_request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let labels =
            vec![("route", route.to_string()), ("method", method_label(method).into()), ("status", status.to_string())];
        self.http.get_or_create(&labels).observe(seconds);
    }

    /// Whether labels may name tenants (`AMPLOG_METRICS_PER_PROJECT`, which needs the
    /// metrics token): then webhook attempts are counted per destination.
    pub fn set_per_project(&self, on: bool) {
        self.per_project.store(on, Ordering::Relaxed);
    }

    /// One webhook attempt to `destination` (`{project}/{name}`, a label only per project);
    /// `delivered` when acknowledged.
    pub fn webhook_attempt(&self, kind: WebhookKind, destination: &str, delivered: bool) {
        let mut labels = vec![("kind", kind.as_str().to_string())];
        if self.per_project.load(Ordering::Relaxed) {
            labels.push(("destination", destination.to_string()));
        }
        self.webhook_attempts.get_or_create(&labels).inc();
        // The failures' series exists from the first attempt on (a ratio needs both).
        let failures = self.webhook_failures.get_or_create(&labels);
        if !delivered {
            failures.inc();
        }
    }

    /// This process became the leader of `role`; the returned guard says so until dropped.
    pub fn leading(&self, role: &str) -> LeaderGuard {
        let labels = vec![("role", role.to_string())];
        self.leader_changes.get_or_create(&labels).inc();
        self.leader.get_or_create(&labels).inc();
        LeaderGuard { labels }
    }

    /// A worker took over an operation whose previous worker's lease had expired.
    pub fn lease_takeover(&self) {
        self.lease_takeovers.inc();
    }

    /// A GraphQL request answered by a compiled plan (`plan`) or by the executor.
    pub fn graphql_answer(&self, by: &'static str) {
        self.graphql_answers.get_or_create(&vec![("by", by.to_string())]).inc();
    }

    /// Reports `pool`'s connections (in use, idle, the maximum) in this process's metrics.
    pub fn watch_pool(&self, pool: &PgPool) {
        self.pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(pool.clone());
    }

    /// Counts a wait for a pooled connection while `acquire` runs (the command service's
    /// and the API's transactions take their connections through it).
    pub async fn waiting_for<T>(&self, acquire: impl std::future::Future<Output = T>) -> T {
        self.pool_waiting.fetch_add(1, Ordering::Relaxed);
        let _done = Decrement(&self.pool_waiting);
        acquire.await
    }

    /// The metrics as OpenMetrics text.
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        registry.register(
            "amplog_http_request_duration_seconds",
            "HTTP requests answered, by route, method and status",
            self.http.clone(),
        );
        registry.register("amplog_webhook_attempts", "Webhook delivery attempts", self.webhook_attempts.clone());
        registry.register(
            "amplog_webhook_failures",
            "Webhook delivery attempts not acknowledged",
            self.webhook_failures.clone(),
        );
        registry.register("amplog_leader", "1 while this process leads the role", self.leader.clone());
        registry.register(
            "amplog_leader_changes",
            "Times this process became a role's leader",
            self.leader_changes.clone(),
        );
        registry.register(
            "amplog_lease_takeovers",
            "Operations taken over from a worker whose lease expired",
            self.lease_takeovers.clone(),
        );
        registry.register(
            "amplog_graphql_answers",
            "GraphQL requests over HTTP answered, by a compiled plan or by the executor",
            self.graphql_answers.clone(),
        );
        let pools = self.pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let (mut in_use, mut idle, mut max) = (0i64, 0i64, 0i64);
        for pool in pools.iter().filter(|p| !p.is_closed()) {
            let (size, free) = (pool.size() as i64, pool.num_idle() as i64);
            in_use += size - free;
            idle += free;
            max += pool.options().get_max_connections() as i64;
        }
        let connections = Family::<Labels, Gauge>::default();
        connections.get_or_create(&vec![("state", "in_use".to_string())]).set(in_use);
        connections.get_or_create(&vec![("state", "idle".to_string())]).set(idle);
        registry.register("amplog_db_pool_connections", "Pooled database connections, by state", connections);
        let gauge = |value: i64| {
            let g = Gauge::<i64>::default();
            g.set(value);
            g
        };
        registry.register("amplog_db_pool_max_connections", "The pools' maximum size", gauge(max));
        registry.register(
            "amplog_db_pool_waiting",
            "Transactions waiting for a pooled connection",
            gauge(self.pool_waiting.load(Ordering::Relaxed)),
        );
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            return "# EOF\n".to_string();
        }
        out
    }
}

/// Joins OpenMetrics texts into one exposition (one `# EOF`, at its end).
pub fn join(parts: &[&str]) -> String {
    let mut out = String::new();
    for line in parts.iter().flat_map(|p| p.lines()).filter(|l| *l != "# EOF") {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("# EOF\n");
    out
}

/// Held while this process leads a role (`amplog_leader{role} 1`).
pub struct LeaderGuard {
    labels: Labels,
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        METRICS.leader.get_or_create(&self.labels).dec();
    }
}

struct Decrement<'a>(&'a AtomicI64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The W3C `traceparent` of the current span: what an event's metadata, a job and a
/// CloudEvent carry so that the work they start joins the trace. `None` when no trace is
/// recorded (tracing off, or no span).
pub fn current_traceparent() -> Option<String> {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let mut carrier = std::collections::HashMap::new();
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(&tracing::Span::current().context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` (not yet entered) a child of the span `traceparent` names, recorded in
/// another task or process. A missing or malformed `traceparent` leaves the span where it is.
pub fn follow(span: &tracing::Span, traceparent: Option<&str>) {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let Some(traceparent) = traceparent.filter(|t| t.len() <= 64) else { return };
    let carrier = std::collections::HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        // Refused when tracing is off or the span already started: it stays a root.
        let _ = span.set_parent(parent);
    }
}

/// The `traceparent` member of an event's metadata.
pub fn traceparent_of(metadata: &serde_json::Value) -> Option<&str> {
    metadata.get("traceparent")?.as_str()
}

#[cfg(test)]
mod tests {
    /// A client may send any token as a method: labels take the standard ones only.
    #[test]
    fn a_hostile_method_is_one_label() {
        for method in ["GET", "POST", "DELETE"] {
            assert_eq!(super::method_label(method), method);
        }
        for hostile in ["M1", "get", "X".repeat(10_000).as_str(), ""] {
            assert_eq!(super::method_label(hostile), "other");
        }
    }
}
