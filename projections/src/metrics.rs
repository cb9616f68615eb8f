//! Prometheus metrics, derived at scrape time from the read models and the projector
//! state in PostgreSQL — not from in-process counters — so they read the same after a
//! restart and on every replica. Encoded as OpenMetrics by `prometheus-client`, and as
//! the Prometheus text format (`as_prometheus_text`) for clients that do not ask for
//! OpenMetrics. Project ids appear as a `project` label only when asked (`per_project`):
//! an open scrape says nothing of who the tenants are.

use crate::runtime::{status, READ_MODELS};
use crate::ProjectionError;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use sqlx::{PgPool, Row};

type Labels = Vec<(String, String)>;
/// One metric family: name, help, and a value per label set.
type Family<T> = (&'static str, &'static str, Vec<(Labels, T)>);
/// One histogram series: labels, sum, count, cumulative buckets.
type HistogramSeries = (Labels, f64, u64, Vec<(f64, u64)>);

/// Upper bounds (seconds) of the operation duration histogram.
pub const DURATION_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0];

#[derive(Debug, Default)]
struct Snapshot {
    gauges: Vec<Family<f64>>,
    /// Named without `_total`: the encoder appends it.
    counters: Vec<Family<u64>>,
    durations: Vec<HistogramSeries>,
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, series) in &self.gauges {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, value) in series {
                metric.encode_family(labels)?.encode_gauge(value)?;
            }
        }
        for (name, help, series) in &self.counters {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, value) in series {
                metric.encode_family(labels)?.encode_counter::<Labels, u64, u64>(value, None)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "amplog_operation_duration_seconds",
            "Durations of finished operations, from start to finish",
            None,
            MetricType::Histogram,
        )?;
        for (labels, sum, count, buckets) in &self.durations {
            metric.encode_family(labels)?.encode_histogram::<Labels>(*sum, *count, buckets, None)?;
        }
        Ok(())
    }
}

/// The labels of a series; `project` only with per-project metrics.
fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs.iter().filter(|(k, v)| *k != "project" || !v.is_empty()).map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// The OpenMetrics content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format's content type.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders every metric as OpenMetrics text; with `per_project`, series are split by a
/// `project` label.
pub async fn render(pool: &PgPool, per_project: bool) -> Result<String, ProjectionError> {
    let mut snap = Snapshot::default();
    // Grouped by project, or by one empty key (then no `project` label).
    let p = if per_project { "project_id::text" } else { "''::text" };

    let rows = sqlx::query(&format!(
        "SELECT {p} AS p, op_type, status, count(*) AS n FROM operations GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    ))
    .fetch_all(pool)
    .await?;
    snap.gauges.push((
        "amplog_operations",
        "Operations by project, type and current status",
        rows.iter()
            .map(|r| {
                let l = labels(&[("project", r.get("p")), ("type", r.get("op_type")), ("status", r.get("status"))]);
                (l, r.get::<i64, _>("n") as f64)
            })
            .collect(),
    ));

    let rows = sqlx::query(&format!(
        "SELECT {p} AS p, sum((doc->>'records_read')::bigint)::bigint AS read,
                sum((doc->>'records_written')::bigint)::bigint AS written, sum((doc->>'bytes')::bigint)::bigint AS bytes,
                sum((doc->>'proxy_calls')::bigint)::bigint AS proxy
         FROM usage_daily GROUP BY 1 ORDER BY 1"
    ))
    .fetch_all(pool)
    .await?;
    for (name, help, column) in [
        ("amplog_records_read", "Records read from providers", "read"),
        ("amplog_records_written", "Records written to providers", "written"),
        ("amplog_bytes", "Bytes moved by reads and writes", "bytes"),
        ("amplog_proxy_calls", "Proxy calls requested", "proxy"),
    ] {
        let series =
            rows.iter().map(|r| (labels(&[("project", r.get("p"))]), r.get::<i64, _>(column) as u64)).collect();
        snap.counters.push((name, help, series));
    }

    let rows = sqlx::query(&format!(
        "SELECT {p} AS p, split_part(kv.key, '.', 1) AS t, split_part(kv.key, '.', 2) AS s, sum(kv.value::bigint)::bigint AS n
         FROM usage_daily, jsonb_each_text(doc->'operations') AS kv GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    ))
    .fetch_all(pool)
    .await?;
    snap.counters.push((
        "amplog_operations_finished",
        "Operations that finished, by project, type and final status",
        rows.iter()
            .map(|r| {
                (
                    labels(&[("project", r.get("p")), ("type", r.get("t")), ("status", r.get("s"))]),
                    r.get::<i64, _>("n") as u64,
                )
            })
            .collect(),
    ));

    let rows =
        sqlx::query(&format!("SELECT {p} AS p, status, count(*) AS n FROM connections GROUP BY 1, 2 ORDER BY 1, 2"))
            .fetch_all(pool)
            .await?;
    snap.gauges.push((
        "amplog_connections",
        "Connections by project and status",
        rows.iter()
            .map(|r| (labels(&[("project", r.get("p")), ("status", r.get("status"))]), r.get::<i64, _>("n") as f64))
            .collect(),
    ));

    let rows = sqlx::query(&format!(
        "SELECT {p} AS p, health, count(*) AS n FROM installations
         WHERE NOT (doc->>'deleted')::boolean AND NOT paused GROUP BY 1, 2 ORDER BY 1, 2"
    ))
    .fetch_all(pool)
    .await?;
    snap.gauges.push((
        "amplog_active_installations",
        "Installations neither paused nor deleted, by project and health",
        rows.iter()
            .map(|r| (labels(&[("project", r.get("p")), ("health", r.get("health"))]), r.get::<i64, _>("n") as f64))
            .collect(),
    ));

    // Bucket counts are computed by PostgreSQL: a scrape never ships every duration.
    let filters: Vec<String> = DURATION_BUCKETS
        .iter()
        .enumerate()
        .map(|(i, b)| format!("count(*) FILTER (WHERE d <= {b:?}) AS b{i}"))
        .collect();
    let rows = sqlx::query(&format!(
        "SELECT op_type, count(*) AS n, coalesce(sum(d), 0) AS sum, {}
         FROM (SELECT op_type, (doc->>'duration_ms')::float8 / 1000.0 AS d FROM operations
               WHERE doc->>'duration_ms' IS NOT NULL) AS finished
         GROUP BY 1 ORDER BY 1",
        filters.join(", ")
    ))
    .fetch_all(pool)
    .await?;
    for r in &rows {
        let count = r.get::<i64, _>("n") as u64;
        // The encoder cumulates: it takes each bucket's own count, not the running total.
        let mut below = 0u64;
        let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(DURATION_BUCKETS.len() + 1);
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            let cumulative = r.get::<i64, _>(format!("b{i}").as_str()) as u64;
            buckets.push((*bound, cumulative - below));
            below = cumulative;
        }
        buckets.push((f64::INFINITY, count - below));
        snap.durations.push((labels(&[("type", r.get("op_type"))]), r.get("sum"), count, buckets));
    }

    let st = status(pool, READ_MODELS).await?;
    let projector = labels(&[("projector", st.name.clone())]);
    let batch: Option<(Option<i32>, Option<f64>)> =
        sqlx::query_as("SELECT last_batch_events, last_batch_ms FROM projector_leases WHERE name = $1")
            .bind(READ_MODELS)
            .fetch_optional(pool)
            .await?;
    let (batch_events, batch_ms) = batch.unwrap_or_default();
    for (name, help, value) in [
        ("amplog_projector_lag_events", "Events in the log the projector has not applied", st.lag_events as f64),
        ("amplog_projector_lag_seconds", "Age of the oldest event the projector has not applied", st.lag_seconds),
        (
            "amplog_projector_leader",
            "1 when a process leads the projector",
            if st.leader.is_some() { 1.0 } else { 0.0 },
        ),
        (
            "amplog_projector_last_batch_events",
            "Events in the projector's last batch",
            batch_events.unwrap_or(0) as f64,
        ),
        (
            "amplog_projector_last_batch_seconds",
            "How long the projector's last batch took",
            batch_ms.unwrap_or(0.0) / 1000.0,
        ),
    ] {
        snap.gauges.push((name, help, vec![(projector.clone(), value)]));
    }

    // Every log reader with a checkpoint (the projector, the relay, the notifier, …).
    let readers: Vec<String> =
        sqlx::query_scalar("SELECT name FROM reader_checkpoints ORDER BY name").fetch_all(pool).await?;
    let (mut lag_events, mut lag_seconds, mut leaders) = (Vec::new(), Vec::new(), Vec::new());
    for reader in readers {
        let st = status(pool, &reader).await?;
        let l = labels(&[("reader", reader)]);
        lag_events.push((l.clone(), st.lag_events as f64));
        lag_seconds.push((l.clone(), st.lag_seconds));
        leaders.push((l, if st.leader.is_some() { 1.0 } else { 0.0 }));
    }
    snap.gauges.push(("amplog_reader_lag_events", "Events in the log a reader has not processed", lag_events));
    snap.gauges.push(("amplog_reader_lag_seconds", "Age of the oldest event a reader has not processed", lag_seconds));
    snap.gauges.push(("amplog_reader_leader", "1 when a process leads the reader", leaders));

    let rows = sqlx::query(&format!(
        "SELECT {p} AS p, count(*) AS n FROM operations
         WHERE status = 'failed' AND (doc->>'dead_lettered')::boolean GROUP BY 1 ORDER BY 1"
    ))
    .fetch_all(pool)
    .await?;
    let mut dead: Vec<(Labels, f64)> =
        rows.iter().map(|r| (labels(&[("project", r.get("p"))]), r.get::<i64, _>("n") as f64)).collect();
    if dead.is_empty() && !per_project {
        dead.push((Vec::new(), 0.0));
    }
    snap.gauges.push(("amplog_dead_letters", "Operations dead-lettered and not replayed", dead));

    // Pending from the queue's own index; given up within the 30 days deliveries are kept.
    let rows = sqlx::query(&format!(
        "SELECT {p} AS p, CASE WHEN given_up_at IS NULL THEN 'pending' ELSE 'failed' END AS s, count(*) AS n
         FROM notification_deliveries WHERE delivered_at IS NULL GROUP BY 1, 2 ORDER BY 1, 2"
    ))
    .fetch_all(pool)
    .await?;
    let mut deliveries: Vec<(Labels, f64)> = rows
        .iter()
        .map(|r| (labels(&[("project", r.get("p")), ("status", r.get("s"))]), r.get::<i64, _>("n") as f64))
        .collect();
    for status in ["pending", "failed"] {
        if !per_project && !rows.iter().any(|r| r.get::<String, _>("s") == status) {
            deliveries.push((labels(&[("status", status.to_string())]), 0.0));
        }
    }
    snap.gauges.push(("amplog_notification_deliveries", "Notifications not delivered, by status", deliveries));

    let mut registry = Registry::default();
    registry.register_collector(Box::new(snap));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .map_err(|e| ProjectionError::Corrupt(e.to_string()))?;
    // A series without labels is written `name{} value`; drop the empty braces.
    Ok(out
        .lines()
        .map(|l| match l.find('{') {
            Some(at) if l[at..].starts_with("{} ") => format!("{}{}\n", &l[..at], &l[at + 2..]),
            _ => format!("{l}\n"),
        })
        .collect())
}

/// OpenMetrics text as the Prometheus text format (0.0.4): a counter's `# HELP` and
/// `# TYPE` name its `_total` series (OpenMetrics names the family without it), and there
/// is no `# EOF`.
pub fn as_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len() + counters.len() * 16);
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{tag}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}
