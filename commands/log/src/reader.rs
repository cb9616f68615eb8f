//! The one log reader (DESIGN invariant 3), shared by projections, the Kafka relay and
//! replays. A `position` becomes visible at commit, not at insert, so readers order by
//! `(transaction_id, position)` and only read rows of transactions older than the oldest
//! one still running: `transaction_id < pg_snapshot_xmin(pg_current_snapshot())`. Below that
//! bound nothing can appear any more, so a cursor never passes an event it has not seen.
//! LISTEN/NOTIFY wakes readers; polling is the fallback.

use crate::LogError;
use crate::EVENTS_CHANNEL;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgConnection, PgPool, Row};
use std::time::Duration;
use uuid::Uuid;

/// Where a reader stands: the last `(transaction_id, position)` it has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LogCursor {
    pub transaction_id: u64,
    pub position: i64,
}

/// An event as read from the log, payload as stored (not upcast). `J` is how its payload
/// and metadata come: parsed JSON values (the default), or the stored JSON text
/// (`StoredEvent`) for readers that pass payloads on without looking into them.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedEvent<J = Value> {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: J,
    pub metadata: J,
    pub position: i64,
    pub transaction_id: u64,
    pub recorded_at: DateTime<Utc>,
    pub project_id: Option<Uuid>,
    pub hash: Option<Vec<u8>>,
}

/// An event whose payload and metadata are still the JSON text PostgreSQL stored.
pub type StoredEvent = RecordedEvent<String>;

impl<J> RecordedEvent<J> {
    pub fn cursor(&self) -> LogCursor {
        LogCursor { transaction_id: self.transaction_id, position: self.position }
    }
}

impl StoredEvent {
    /// Decodes a row of `EVENT_COLUMNS`, by index (a name lookup per column cost as much
    /// as the rest of the decoding). `transaction_id` comes as xid8's binary form, an
    /// unsigned 64-bit integer that int8's decoder reads the same way.
    pub fn from_row(row: &PgRow) -> Result<Self, LogError> {
        let xid: i64 = row.try_get_unchecked(9)?;
        Ok(Self {
            event_id: row.get(0),
            aggregate_type: row.get(1),
            aggregate_id: row.get(2),
            sequence: row.get(3),
            event_type: row.get(4),
            event_version: row.get(5),
            payload: row.try_get_unchecked(6)?,
            metadata: row.try_get_unchecked(7)?,
            position: row.get(8),
            transaction_id: xid as u64,
            recorded_at: row.get(10),
            project_id: row.get(11),
            hash: row.get(12),
        })
    }

    /// Decodes one tuple of a binary `COPY` of `EVENT_COLUMNS` (see `copy`).
    pub fn from_copy(tuple: &mut copy::Tuple<'_>) -> Result<Self, LogError> {
        Ok(Self {
            event_id: tuple.uuid()?,
            aggregate_type: tuple.text()?,
            aggregate_id: tuple.text()?,
            sequence: tuple.int8()?,
            event_type: tuple.text()?,
            event_version: tuple.text()?,
            payload: tuple.text()?,
            metadata: tuple.text()?,
            position: tuple.int8()?,
            transaction_id: tuple.int8()? as u64,
            recorded_at: tuple.timestamptz()?,
            project_id: tuple.nullable(copy::Tuple::uuid)?,
            hash: tuple.nullable(copy::Tuple::bytea)?,
        })
    }

    /// The event with its payload and metadata parsed.
    pub fn parse(self) -> Result<RecordedEvent, LogError> {
        let parse = |col: &str, text: &str| -> Result<Value, LogError> {
            serde_json::from_str(text).map_err(|e| LogError::corrupt(format!("event {col}"), e))
        };
        Ok(RecordedEvent {
            payload: parse("payload", &self.payload)?,
            metadata: parse("metadata", &self.metadata)?,
            event_id: self.event_id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            event_type: self.event_type,
            event_version: self.event_version,
            position: self.position,
            transaction_id: self.transaction_id,
            recorded_at: self.recorded_at,
            project_id: self.project_id,
            hash: self.hash,
        })
    }
}

/// The columns every log query selects, in `StoredEvent::from_row`'s order.
pub const EVENT_COLUMNS: &str = "event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, \
     payload, metadata, position, transaction_id, recorded_at, project_id, hash";

/// Reads the log in commit-safe order.
#[derive(Clone, Debug)]
pub struct LogReader {
    pool: PgPool,
}

impl LogReader {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Up to `limit` events after `after`, from transactions that can no longer change what
    /// precedes them.
    pub async fn read_batch(&self, after: LogCursor, limit: i64) -> Result<Vec<RecordedEvent>, LogError> {
        parse_all(self.read_stored_batch(after, limit).await?)
    }

    /// `read_batch`, payloads left as stored JSON text.
    pub async fn read_stored_batch(&self, after: LogCursor, limit: i64) -> Result<Vec<StoredEvent>, LogError> {
        copy_stored_batch(&self.pool, after, limit).await
    }

    /// How many committed events after `after` have a position up to `up_to`. An empty
    /// batch does not mean the log is read: rows above the snapshot's xmin wait for older
    /// transactions — of any database of the cluster — to end. Catch-up jobs read until
    /// this is zero for the log's end as they found it.
    pub async fn committed_after(&self, after: LogCursor, up_to: i64) -> Result<i64, LogError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE (transaction_id, position) > ($1::text::xid8, $2) AND position <= $3",
        )
        .bind(after.transaction_id.to_string())
        .bind(after.position)
        .bind(up_to)
        .fetch_one(&self.pool)
        .await?)
    }

    /// The highest position committed now: where a catch-up job stops.
    pub async fn end(&self) -> Result<i64, LogError> {
        Ok(sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events").fetch_one(&self.pool).await?)
    }

    /// A catch-up from `after` to the log's end as it is now (see `CatchUp`).
    pub async fn catch_up(&self, after: LogCursor, batch_size: i64) -> Result<CatchUp, LogError> {
        Ok(CatchUp { reader: self.clone(), cursor: after, end: self.end().await?, batch_size })
    }

    /// A subscription from `after` that waits for new events.
    pub async fn subscribe(&self, after: LogCursor) -> Result<Subscription, LogError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(EVENTS_CHANNEL).await?;
        Ok(Subscription {
            reader: self.clone(),
            cursor: after,
            listener,
            batch_size: 1000,
            poll_interval: Duration::from_millis(500),
        })
    }

    /// The saved position of reader `name` (the log's start when it has none).
    pub async fn checkpoint(conn: &mut PgConnection, name: &str) -> Result<LogCursor, LogError> {
        let row = sqlx::query("SELECT transaction_id::text AS xid, position FROM reader_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(conn)
            .await?;
        Ok(match row {
            None => LogCursor::default(),
            Some(row) => LogCursor {
                transaction_id: row.get::<String, _>("xid").parse().map_err(|e| LogError::corrupt("checkpoint", e))?,
                position: row.get("position"),
            },
        })
    }

    /// Saves reader `name`'s position; call it in the transaction that applies the batch.
    pub async fn save_checkpoint(conn: &mut PgConnection, name: &str, cursor: LogCursor) -> Result<(), LogError> {
        sqlx::query(
            "INSERT INTO reader_checkpoints (name, transaction_id, position) VALUES ($1, $2::text::xid8, $3)
             ON CONFLICT (name) DO UPDATE SET transaction_id = EXCLUDED.transaction_id,
                 position = EXCLUDED.position, updated_at = now()",
        )
        .bind(name)
        .bind(cursor.transaction_id.to_string())
        .bind(cursor.position)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// `LogReader::read_batch` on the caller's connection (inside its transaction, say).
pub async fn read_batch_in(
    conn: &mut PgConnection,
    after: LogCursor,
    limit: i64,
) -> Result<Vec<RecordedEvent>, LogError> {
    parse_all(read_stored_batch_in(conn, after, limit).await?)
}

/// `read_batch_in`, payloads left as stored JSON text.
pub async fn read_stored_batch_in(
    conn: &mut PgConnection,
    after: LogCursor,
    limit: i64,
) -> Result<Vec<StoredEvent>, LogError> {
    // Planned with each cursor's values: a cached generic plan may not use the index.
    let rows = sqlx::query(&batch_query(after, limit)).persistent(false).fetch_all(conn).await?;
    rows.iter().map(StoredEvent::from_row).collect()
}

/// The log query for one batch. The cursor and limit are integers formatted into the
/// text: `COPY` takes no parameters.
fn batch_query(after: LogCursor, limit: i64) -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM events
         WHERE (transaction_id, position) > ('{}'::xid8, {})
           AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY transaction_id, position
         LIMIT {limit}",
        after.transaction_id, after.position
    )
}

/// `read_stored_batch_in` as a binary `COPY` of the same query: PostgreSQL sends the same
/// values, and decoding its tuples here costs a fraction of sqlx's row decoding. A `COPY`
/// abandoned half-read leaves the connection out of step with the server (sqlx does not
/// drain it), so this always reads to the end, and runs on a task of its own that a
/// cancelled caller (a timeout around a subscription's wait) leaves to finish.
async fn copy_stored_batch(pool: &PgPool, after: LogCursor, limit: i64) -> Result<Vec<StoredEvent>, LogError> {
    let pool = pool.clone();
    let read = tokio::spawn(async move {
        let mut conn = pool.acquire().await?;
        let mut messages =
            conn.copy_out_raw(&format!("COPY ({}) TO STDOUT (FORMAT binary)", batch_query(after, limit))).await?;
        let mut events = Vec::with_capacity(limit.clamp(0, 10_000) as usize);
        let (mut first, mut failed) = (true, None);
        while let Some(message) = messages.next().await {
            let message = message?;
            if failed.is_none() {
                if let Err(error) = copy::decode(&message, std::mem::take(&mut first), &mut events) {
                    failed = Some(error);
                }
            }
        }
        failed.map_or(Ok(events), Err)
    });
    match read.await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(LogError::Database(sqlx::Error::Io(std::io::Error::other(e)))),
    }
}

/// PostgreSQL's binary `COPY` format: a header, then one tuple per data message (a field
/// count, then each field as a length and its bytes, -1 for NULL), then a trailer (-1).
mod copy {
    use crate::reader::StoredEvent;
    use crate::LogError;
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    /// Decodes one data message (PostgreSQL sends a tuple per message, the header in the
    /// first, the trailer in the last).
    pub fn decode(message: &[u8], first: bool, events: &mut Vec<StoredEvent>) -> Result<(), LogError> {
        let mut body = message;
        if first {
            skip_header(&mut body)?;
            if body.is_empty() {
                return Ok(()); // the header on its own (PostgreSQL sends it with a tuple)
            }
        }
        if let Some(mut tuple) = Tuple::start(&mut body, 13)? {
            events.push(StoredEvent::from_copy(&mut tuple)?);
        }
        Ok(())
    }

    const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

    fn bad(detail: &str) -> LogError {
        LogError::corrupt("binary COPY of the log", detail)
    }

    fn take<'a>(body: &mut &'a [u8], n: usize) -> Result<&'a [u8], LogError> {
        if body.len() < n {
            return Err(bad("truncated"));
        }
        let (head, rest) = body.split_at(n);
        *body = rest;
        Ok(head)
    }

    fn int<const N: usize>(body: &mut &[u8]) -> Result<[u8; N], LogError> {
        Ok(take(body, N)?.try_into().expect("N bytes"))
    }

    fn skip_header(body: &mut &[u8]) -> Result<(), LogError> {
        if take(body, SIGNATURE.len())? != SIGNATURE {
            return Err(bad("no signature"));
        }
        let _flags = int::<4>(body)?;
        let extension = u32::from_be_bytes(int::<4>(body)?) as usize;
        take(body, extension)?;
        Ok(())
    }

    /// One tuple's fields, read in order.
    pub struct Tuple<'a> {
        body: &'a [u8],
    }

    impl<'a> Tuple<'a> {
        /// The tuple in `body`, or `None` at the trailer.
        pub fn start(body: &mut &'a [u8], columns: i16) -> Result<Option<Self>, LogError> {
            match i16::from_be_bytes(int::<2>(body)?) {
                -1 => Ok(None),
                n if n == columns => Ok(Some(Self { body })),
                n => Err(bad(&format!("{n} columns, expected {columns}"))),
            }
        }

        fn field(&mut self) -> Result<Option<&'a [u8]>, LogError> {
            match i32::from_be_bytes(int::<4>(&mut self.body)?) {
                -1 => Ok(None),
                n if n >= 0 => Ok(Some(take(&mut self.body, n as usize)?)),
                _ => Err(bad("negative field length")),
            }
        }

        fn required(&mut self) -> Result<&'a [u8], LogError> {
            self.field()?.ok_or_else(|| bad("NULL in a NOT NULL column"))
        }

        /// A nullable field, read with `read` when present.
        pub fn nullable<T>(&mut self, read: fn(&mut Self) -> Result<T, LogError>) -> Result<Option<T>, LogError> {
            match self.body.get(..4) {
                Some([0xff, 0xff, 0xff, 0xff]) => {
                    self.body = &self.body[4..];
                    Ok(None)
                }
                _ => read(self).map(Some),
            }
        }

        pub fn text(&mut self) -> Result<String, LogError> {
            std::str::from_utf8(self.required()?).map(str::to_owned).map_err(|e| bad(&e.to_string()))
        }

        pub fn bytea(&mut self) -> Result<Vec<u8>, LogError> {
            Ok(self.required()?.to_vec())
        }

        pub fn int8(&mut self) -> Result<i64, LogError> {
            let bytes = self.required()?;
            Ok(i64::from_be_bytes(bytes.try_into().map_err(|_| bad("int8 of the wrong size"))?))
        }

        pub fn uuid(&mut self) -> Result<Uuid, LogError> {
            Uuid::from_slice(self.required()?).map_err(|e| bad(&e.to_string()))
        }

        /// Microseconds since 2000-01-01 00:00:00 UTC.
        pub fn timestamptz(&mut self) -> Result<DateTime<Utc>, LogError> {
            const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;
            let micros = self.int8()?;
            DateTime::from_timestamp_micros(micros + POSTGRES_EPOCH_MICROS).ok_or_else(|| bad("timestamp out of range"))
        }
    }
}

/// How catch-up jobs (the projector's, a rebuild, the relay's) read: batch after batch from
/// a cursor until every event committed up to the log's end as it was at the start is read.
/// An empty batch is not that end while older transactions hold the snapshot's xmin back,
/// so it waits for them (5 ms at a time); batches may go past the end, never short of it.
pub struct CatchUp {
    reader: LogReader,
    cursor: LogCursor,
    end: i64,
    batch_size: i64,
}

impl CatchUp {
    /// Where the next batch starts: after the last event returned.
    pub fn cursor(&self) -> LogCursor {
        self.cursor
    }

    /// The next batch, payloads as stored; `None` once everything up to the end is read.
    pub async fn next_stored(&mut self) -> Result<Option<Vec<StoredEvent>>, LogError> {
        loop {
            let batch = self.reader.read_stored_batch(self.cursor, self.batch_size).await?;
            if let Some(last) = batch.last() {
                self.cursor = last.cursor();
                return Ok(Some(batch));
            }
            if self.reader.committed_after(self.cursor, self.end).await? == 0 {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The next batch, parsed; `None` once everything up to the end is read.
    pub async fn next(&mut self) -> Result<Option<Vec<RecordedEvent>>, LogError> {
        self.next_stored().await?.map(parse_all).transpose()
    }

    /// Every batch left up to the end at once, payloads as stored (for a log that fits in
    /// memory: tests, a benchmark's baseline).
    pub async fn rest_stored(mut self) -> Result<Vec<StoredEvent>, LogError> {
        let mut all = Vec::new();
        while let Some(batch) = self.next_stored().await? {
            all.extend(batch);
        }
        Ok(all)
    }

    /// Every batch left up to the end at once, parsed.
    pub async fn rest(self) -> Result<Vec<RecordedEvent>, LogError> {
        parse_all(self.rest_stored().await?)
    }
}

/// A position in the log that advances as batches are taken, waking on NOTIFY and polling
/// every `poll_interval` in case a notification was missed.
pub struct Subscription {
    reader: LogReader,
    cursor: LogCursor,
    listener: PgListener,
    pub batch_size: i64,
    pub poll_interval: Duration,
}

impl Subscription {
    pub fn cursor(&self) -> LogCursor {
        self.cursor
    }

    /// The next batch, waiting until there is one. The cursor moves past it.
    pub async fn next_batch(&mut self) -> Result<Vec<RecordedEvent>, LogError> {
        parse_all(self.next_stored_batch().await?)
    }

    /// Like `next_batch`, but gives up after `wait` and returns an empty batch.
    pub async fn next_batch_within(&mut self, wait: Duration) -> Result<Vec<RecordedEvent>, LogError> {
        parse_all(self.next_stored_batch_within(wait).await?)
    }

    /// `next_batch`, payloads left as stored JSON text.
    pub async fn next_stored_batch(&mut self) -> Result<Vec<StoredEvent>, LogError> {
        loop {
            let batch = self.read_stored_now().await?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            match tokio::time::timeout(self.poll_interval, self.listener.recv()).await {
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "log listener failed; polling until it reconnects");
                    tokio::time::sleep(self.poll_interval).await;
                }
            }
        }
    }

    /// What can be read now, without waiting (empty when nothing is). The cursor moves
    /// past it.
    async fn read_stored_now(&mut self) -> Result<Vec<StoredEvent>, LogError> {
        let batch = self.reader.read_stored_batch(self.cursor, self.batch_size).await?;
        if let Some(last) = batch.last() {
            self.cursor = last.cursor();
        }
        Ok(batch)
    }

    /// `next_batch_within`, payloads left as stored JSON text.
    pub async fn next_stored_batch_within(&mut self, wait: Duration) -> Result<Vec<StoredEvent>, LogError> {
        match tokio::time::timeout(wait, self.next_stored_batch()).await {
            Ok(result) => result,
            Err(_) => Ok(Vec::new()),
        }
    }
}

fn parse_all(batch: Vec<StoredEvent>) -> Result<Vec<RecordedEvent>, LogError> {
    batch.into_iter().map(StoredEvent::parse).collect()
}
