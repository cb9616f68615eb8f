//! What auditors get from the log itself: an installation's full timeline (its stream, its
//! connection's and its operations', in log order) and hash-chain verification.

use crate::error::CommandError;
use crate::hash::{self, Canonical};
use crate::reader::{RecordedEvent, EVENT_COLUMNS};
use futures::TryStreamExt;
use serde::Serialize;
use sqlx::{PgConnection, Row};

/// Every event of an installation, of its connection and of its operations, in log order.
pub async fn installation_history(
    conn: &mut PgConnection,
    installation_id: &str,
) -> Result<Vec<RecordedEvent>, CommandError> {
    let rows = sqlx::query(&format!(
        "WITH inst AS (
             SELECT event_type, payload FROM events
             WHERE aggregate_type = 'installation' AND aggregate_id = $1),
         streams AS (
             SELECT 'installation'::text AS t, $1::text AS id
             UNION SELECT 'connection', payload->>'connection_id' FROM inst WHERE event_type = 'Created'
             UNION SELECT 'operation', payload->>'operation_id' FROM inst WHERE event_type = 'OperationRequested')
         SELECT {EVENT_COLUMNS} FROM events e JOIN streams s ON e.aggregate_type = s.t AND e.aggregate_id = s.id
         ORDER BY e.transaction_id, e.position"
    ))
    .bind(installation_id)
    .fetch_all(conn)
    .await?;
    rows.iter().map(RecordedEvent::from_row).collect()
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
) -> Result<VerifyReport, CommandError> {
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
            })
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
) -> Result<Vec<(String, String)>, CommandError> {
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
