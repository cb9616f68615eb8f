//! What auditors get from the log itself: an installation's full timeline (its stream, its
//! connection's and its operations', in log order), a project's configuration history, and
//! hash-chain verification.

use crate::hash::{self, Canonical};
use crate::reader::{LogCursor, RecordedEvent, StoredEvent, EVENT_COLUMNS};
use crate::store::EventStore;
use crate::LogError;
use amplog_domain::connection::Connection;
use amplog_domain::installation::Installation;
use amplog_domain::operation::Operation;
use amplog_domain::Aggregate;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::Serialize;
use sqlx::{PgConnection, Row};
use std::collections::BTreeMap;

/// Which part of a timeline to read: events after `after` (log order), recorded in
/// `[from, to]`, at most `limit`.
#[derive(Clone, Copy, Debug)]
pub struct HistoryRange {
    pub after: LogCursor,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub limit: i64,
}

impl Default for HistoryRange {
    fn default() -> Self {
        Self { after: LogCursor::default(), from: None, to: None, limit: i64::MAX }
    }
}

/// Every event of an installation, of its connection and of its operations, in log order.
pub async fn installation_history(
    conn: &mut PgConnection,
    installation_id: &str,
) -> Result<Vec<RecordedEvent>, LogError> {
    installation_history_in(conn, installation_id, HistoryRange::default()).await
}

/// The part of an installation's timeline `range` selects, in log order.
///
/// A page reads about a page of events, not the whole timeline: it is bounded by the
/// transaction of the k-th operation requested after the cursor (operations requested later
/// have no event before it), and every stream is read from the cursor to that bound through
/// `events_by_stream_log_order`. When the bound holds fewer than `limit` events, k grows
/// and the page is read again; without a bound (fewer than k operations left) the page is
/// the rest of the timeline.
pub async fn installation_history_in(
    conn: &mut PgConnection,
    installation_id: &str,
    range: HistoryRange,
) -> Result<Vec<RecordedEvent>, LogError> {
    // The whole timeline (no page) needs no bound.
    let mut operations: i64 = if range.limit > 100_000 { i64::MAX } else { 64 };
    loop {
        let bound: Option<String> = sqlx::query_scalar(
            "SELECT transaction_id::text FROM events
             WHERE aggregate_type = 'installation' AND aggregate_id = $1 AND event_type = 'OperationRequested'
               AND (transaction_id, position) > ($2::text::xid8, $3)
             ORDER BY transaction_id, position OFFSET $4 LIMIT 1",
        )
        .bind(installation_id)
        .bind(range.after.transaction_id.to_string())
        .bind(range.after.position)
        .bind(operations - 1)
        .fetch_optional(&mut *conn)
        .await?;
        let rows = sqlx::query(&format!(
            "WITH inst AS (
                 SELECT event_type, payload FROM events
                 WHERE aggregate_type = 'installation' AND aggregate_id = $1
                   AND ($7::text IS NULL OR transaction_id <= $7::text::xid8)),
             streams AS (
                 SELECT 'installation'::text AS t, $1::text AS id
                 UNION SELECT 'connection', payload->>'connection_id' FROM inst WHERE event_type = 'Created'
                 UNION SELECT 'operation', payload->>'operation_id' FROM inst WHERE event_type = 'OperationRequested')
             SELECT e.* FROM streams s CROSS JOIN LATERAL (
                 SELECT {EVENT_COLUMNS} FROM events
                 WHERE aggregate_type = s.t AND aggregate_id = s.id
                   AND (transaction_id, position) > ($2::text::xid8, $3)
                   AND ($7::text IS NULL OR transaction_id <= $7::text::xid8)
                   AND ($4::timestamptz IS NULL OR recorded_at >= $4)
                   AND ($5::timestamptz IS NULL OR recorded_at <= $5)
                 ORDER BY transaction_id, position
                 LIMIT $6) e
             ORDER BY e.transaction_id, e.position
             LIMIT $6"
        ))
        .bind(installation_id)
        .bind(range.after.transaction_id.to_string())
        .bind(range.after.position)
        .bind(range.from)
        .bind(range.to)
        .bind(range.limit)
        .bind(&bound)
        .fetch_all(&mut *conn)
        .await?;
        if bound.is_none() || rows.len() as i64 >= range.limit {
            return rows.iter().map(|row| StoredEvent::from_row(row)?.parse()).collect();
        }
        operations = operations.saturating_mul(4);
    }
}

/// The part of a project's configuration history `range` selects, in log order: its own
/// stream (API keys, destinations, JWT keys), its provider apps' and connect sessions',
/// its organization's record of it, admin keys' uses in it (through the partial index
/// `events_configuration`).
pub async fn project_history_in(
    conn: &mut PgConnection,
    project_id: uuid::Uuid,
    range: HistoryRange,
) -> Result<Vec<RecordedEvent>, LogError> {
    let rows = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events
         WHERE project_id = $1
           AND aggregate_type IN ('project', 'provider_app', 'connect_session', 'organization', 'admin_key')
           AND (transaction_id, position) > ($2::text::xid8, $3)
           AND ($4::timestamptz IS NULL OR recorded_at >= $4)
           AND ($5::timestamptz IS NULL OR recorded_at <= $5)
         ORDER BY transaction_id, position
         LIMIT $6"
    ))
    .bind(project_id)
    .bind(range.after.transaction_id.to_string())
    .bind(range.after.position)
    .bind(range.from)
    .bind(range.to)
    .bind(range.limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|row| StoredEvent::from_row(row)?.parse()).collect()
}

/// The ids of every stream of `aggregate_type`, in the order they began.
pub async fn stream_ids(conn: &mut PgConnection, aggregate_type: &str) -> Result<Vec<String>, LogError> {
    Ok(sqlx::query_scalar(
        "SELECT aggregate_id FROM events WHERE aggregate_type = $1 AND sequence = 1 ORDER BY transaction_id, position",
    )
    .bind(aggregate_type)
    .fetch_all(conn)
    .await?)
}

/// What is wrong at one event of a stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum BreakKind {
    /// The stored hash is not the hash of the stored row: the row was altered.
    HashMismatch { stored: String, computed: String },
    /// The stored previous hash is not the previous event's hash: an event was altered,
    /// removed or inserted before this one.
    BrokenLink,
    /// Sequences must run 1, 2, 3, ...
    SequenceGap { expected: i64 },
    /// The event carries no hash (written around amplog's append).
    Unhashed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainBreak {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    #[serde(flatten)]
    pub kind: BreakKind,
}

/// The result of a verification: what was checked, the head of each stream, what broke.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub streams: u64,
    pub events: u64,
    pub heads: Vec<(String, String, i64, String)>,
    pub breaks: Vec<ChainBreak>,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.breaks.is_empty()
    }
}

/// Recomputes the hash chains of the given streams (every stream when `None`), streaming
/// the rows. `progress` is called every 10,000 events.
pub async fn verify(
    conn: &mut PgConnection,
    streams: Option<&[(String, String)]>,
    mut progress: impl FnMut(u64),
) -> Result<VerifyReport, LogError> {
    let (types, ids): (Vec<&str>, Vec<&str>) =
        streams.unwrap_or_default().iter().map(|(t, i)| (t.as_str(), i.as_str())).unzip();
    let sql = format!(
        "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload::text AS payload,
                metadata::text AS metadata, prev_hash, hash
         FROM events {}
         ORDER BY aggregate_type, aggregate_id, sequence",
        if streams.is_some() {
            "WHERE (aggregate_type, aggregate_id) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))"
        } else {
            ""
        }
    );
    let mut query = sqlx::query(&sql);
    if streams.is_some() {
        query = query.bind(&types).bind(&ids);
    }
    let mut rows = query.fetch(conn);
    let mut report = VerifyReport::default();
    let mut current: Option<(String, String, i64, Option<Vec<u8>>)> = None;
    while let Some(row) = rows.try_next().await? {
        let aggregate_type: String = row.get("aggregate_type");
        let aggregate_id: String = row.get("aggregate_id");
        let sequence: i64 = row.get("sequence");
        let prev_hash: Option<Vec<u8>> = row.get("prev_hash");
        let stored: Option<Vec<u8>> = row.get("hash");
        let same_stream = current.as_ref().is_some_and(|(t, i, _, _)| *t == aggregate_type && *i == aggregate_id);
        if !same_stream {
            if let Some(head) = current.take() {
                report.heads.push(head_of(head));
            }
            report.streams += 1;
            current = Some((aggregate_type.clone(), aggregate_id.clone(), 0, None));
        }
        let (_, _, last_sequence, last_hash) = current.as_mut().expect("set above");
        let mut fail = |kind| {
            report.breaks.push(ChainBreak {
                aggregate_type: aggregate_type.clone(),
                aggregate_id: aggregate_id.clone(),
                sequence,
                kind,
            });
        };
        if sequence != *last_sequence + 1 {
            fail(BreakKind::SequenceGap { expected: *last_sequence + 1 });
        }
        match stored {
            None => fail(BreakKind::Unhashed),
            Some(stored) => {
                if prev_hash != *last_hash {
                    fail(BreakKind::BrokenLink);
                }
                let payload: String = row.get("payload");
                let metadata: String = row.get("metadata");
                let computed = hash::chain(
                    prev_hash.as_deref(),
                    &Canonical {
                        aggregate_type: &aggregate_type,
                        aggregate_id: &aggregate_id,
                        sequence,
                        event_type: row.get("event_type"),
                        event_version: row.get("event_version"),
                        payload: &payload,
                        metadata: &metadata,
                    },
                );
                if computed[..] != stored[..] {
                    fail(BreakKind::HashMismatch { stored: hex::encode(&stored), computed: hex::encode(computed) });
                }
                *last_hash = Some(stored);
            }
        }
        *last_sequence = sequence;
        report.events += 1;
        if report.events % 10_000 == 0 {
            progress(report.events);
        }
    }
    if let Some(head) = current.take() {
        report.heads.push(head_of(head));
    }
    Ok(report)
}

fn head_of((t, i, sequence, hash): (String, String, i64, Option<Vec<u8>>)) -> (String, String, i64, String) {
    (t, i, sequence, hash.map(hex::encode).unwrap_or_default())
}

/// The streams of an installation's timeline, for `verify`.
pub async fn installation_streams(
    conn: &mut PgConnection,
    installation_id: &str,
) -> Result<Vec<(String, String)>, LogError> {
    let mut streams = vec![("installation".to_string(), installation_id.to_string())];
    let rows = sqlx::query(
        "SELECT DISTINCT CASE event_type WHEN 'Created' THEN 'connection' ELSE 'operation' END AS t,
                CASE event_type WHEN 'Created' THEN payload->>'connection_id' ELSE payload->>'operation_id' END AS id
         FROM events WHERE aggregate_type = 'installation' AND aggregate_id = $1
           AND event_type IN ('Created', 'OperationRequested')",
    )
    .bind(installation_id)
    .fetch_all(conn)
    .await?;
    streams.extend(rows.iter().map(|r| (r.get("t"), r.get("id"))));
    Ok(streams)
}

/// Up to which point `installation_as_of` replays.
#[derive(Clone, Copy, Debug)]
pub enum AsOf {
    /// Events recorded at or before this time.
    Time(DateTime<Utc>),
    /// Events at or before this log position. Within a stream, positions grow with
    /// sequences, so this is a prefix of every stream.
    Position(i64),
}

/// An installation, its connection and its operations as they stood at a point of the
/// past, folded from the log by the domain's own `apply`.
#[derive(Clone, Debug, Serialize)]
pub struct InstallationAsOf {
    pub installation: Installation,
    pub connection: Option<Connection>,
    pub operations: BTreeMap<String, Operation>,
    /// The events replayed, and the last of them.
    pub events: u64,
    pub last_position: Option<i64>,
    pub last_recorded_at: Option<DateTime<Utc>>,
}

/// Replays an installation's timeline up to `at`; `None` when it had no event by then.
pub async fn installation_as_of(
    conn: &mut PgConnection,
    store: &EventStore,
    installation_id: &str,
    at: AsOf,
) -> Result<Option<InstallationAsOf>, LogError> {
    let events = installation_history(conn, installation_id).await?;
    let mut installation = Installation::default();
    let mut connection: Option<Connection> = None;
    let mut operations: BTreeMap<String, Operation> = BTreeMap::new();
    let mut replayed = 0u64;
    let (mut last_position, mut last_recorded_at) = (None, None);
    for event in events.into_iter().filter(|e| match at {
        AsOf::Time(t) => e.recorded_at <= t,
        AsOf::Position(p) => e.position <= p,
    }) {
        let (kind, version) = (event.event_type.as_str(), event.event_version.as_str());
        match event.aggregate_type.as_str() {
            "installation" => installation.apply(&store.decode::<Installation>(kind, version, event.payload)?),
            "connection" => connection.get_or_insert_with(Connection::default).apply(&store.decode::<Connection>(
                kind,
                version,
                event.payload,
            )?),
            "operation" => operations
                .entry(event.aggregate_id.clone())
                .or_default()
                .apply(&store.decode::<Operation>(kind, version, event.payload)?),
            _ => continue,
        }
        replayed += 1;
        last_position = Some(event.position);
        last_recorded_at = Some(event.recorded_at);
    }
    Ok((replayed > 0).then_some(InstallationAsOf {
        installation,
        connection,
        operations,
        events: replayed,
        last_position,
        last_recorded_at,
    }))
}
