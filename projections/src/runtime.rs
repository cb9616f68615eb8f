//! The projector runtime: one leader per projector (`amplog_log::leader`: an advisory
//! lock on its own session, plus a fencing token every batch re-checks), batches read through the
//! shared log reader and applied with their checkpoint in one transaction, rebuilds into
//! shadow tables swapped in atomically.

use crate::fold::{Fold, Tables, TABLES};
use crate::ProjectionError;
use amplog_log::leader::{lock_key, run_as_leader, Leadership};
use amplog_log::{EventStore, LogCursor, LogReader};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};
use std::time::{Duration, Instant};

/// The projector that maintains every read-model table.
pub const READ_MODELS: &str = "read_models";

/// The NOTIFY channel a projector signals on when a batch commits (payload: its name), so
/// API subscriptions re-read the read models at once instead of polling.
pub const PROJECTED_CHANNEL: &str = "amplog_projected";

/// Runs one projector in this process whenever it can lead.
pub struct Runner {
    pool: PgPool,
    store: EventStore,
    pub name: String,
    pub holder: String,
    pub batch_size: i64,
}

impl Runner {
    pub fn new(pool: PgPool, store: EventStore, holder: impl Into<String>) -> Self {
        Self { pool, store, name: READ_MODELS.into(), holder: holder.into(), batch_size: 1000 }
    }

    async fn lead(&self) -> Result<Option<Leadership>, ProjectionError> {
        Ok(Leadership::try_acquire(&self.pool, &self.name, &self.holder).await?)
    }

    /// Runs until `stop` resolves: waits for leadership, then projects batch after batch.
    /// A fenced leader (a rebuild swapped the tables) leads again at once.
    pub async fn run(&self, stop: impl std::future::Future<Output = ()>) -> Result<(), ProjectionError> {
        let pause = |error: &ProjectionError| match error {
            ProjectionError::Fenced(_) => Duration::ZERO,
            _ => Duration::from_secs(1),
        };
        run_as_leader(&self.pool, &self.name, &self.holder, stop, pause, |l| self.project_while_leading(l)).await;
        Ok(())
    }

    async fn project_while_leading(&self, mut leadership: Leadership) -> Result<(), ProjectionError> {
        let reader = LogReader::new(self.pool.clone());
        let start = {
            let mut conn = self.pool.acquire().await?;
            LogReader::checkpoint(&mut conn, &self.name).await?
        };
        let mut subscription = reader.subscribe(start).await?;
        subscription.batch_size = self.batch_size;
        loop {
            let batch = subscription.next_batch_within(Duration::from_secs(2)).await?;
            // The leadership session must still be alive: it holds the advisory lock.
            leadership.alive().await?;
            let mut tx = amplog_log::tx::begin(&self.pool).await?;
            fence(&mut tx, &leadership).await?;
            if let Some(last) = batch.last() {
                use tracing::Instrument;
                let started = Instant::now();
                let span = tracing::info_span!("projector.batch", projector = %self.name, events = batch.len());
                Fold::apply_batch(&mut tx, &Tables::live(), &self.store, &batch).instrument(span).await?;
                LogReader::save_checkpoint(&mut tx, &self.name, last.cursor()).await?;
                sqlx::query("UPDATE projector_leases SET last_batch_events = $2, last_batch_ms = $3 WHERE name = $1")
                    .bind(&self.name)
                    .bind(batch.len() as i32)
                    .bind(started.elapsed().as_secs_f64() * 1000.0)
                    .execute(&mut *tx)
                    .await?;
                // Delivered at commit; one per batch, so the notify lock costs nothing here.
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(PROJECTED_CHANNEL)
                    .bind(&self.name)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                tracing::debug!(projector = %self.name, events = batch.len(), ms = started.elapsed().as_millis() as u64, "batch applied");
            } else {
                tx.commit().await?; // the heartbeat
            }
        }
    }

    /// Applies every event not yet projected, as leader, then returns (tests and one-shot
    /// jobs). Returns false when another process leads.
    pub async fn catch_up(&self) -> Result<bool, ProjectionError> {
        let Some(leadership) = self.lead().await? else { return Ok(false) };
        let mut conn = self.pool.acquire().await?;
        let cursor = LogReader::checkpoint(&mut conn, &self.name).await?;
        drop(conn);
        let mut log = LogReader::new(self.pool.clone()).catch_up(cursor, self.batch_size).await?;
        while let Some(batch) = log.next().await? {
            let mut tx = amplog_log::tx::begin(&self.pool).await?;
            fence(&mut tx, &leadership).await?;
            Fold::apply_batch(&mut tx, &Tables::live(), &self.store, &batch).await?;
            LogReader::save_checkpoint(&mut tx, &self.name, log.cursor()).await?;
            tx.commit().await?;
        }
        leadership.release().await;
        Ok(true)
    }
}

/// The batch's transaction must still belong to this leader.
async fn fence(tx: &mut PgConnection, leadership: &Leadership) -> Result<(), ProjectionError> {
    if leadership.fence(tx).await? {
        Ok(())
    } else {
        Err(ProjectionError::Fenced(leadership.name.clone()))
    }
}

/// Rebuilds every read model from the start of the log into shadow tables, then swaps them
/// in with the checkpoint in one transaction; queries read the old tables meanwhile. The
/// swap fences the running leader, which then resumes from the rebuilt checkpoint.
pub async fn rebuild(
    pool: &PgPool,
    store: &EventStore,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, ProjectionError> {
    let shadow = Tables::shadow();
    let mut conn = pool.acquire().await?;
    for table in TABLES {
        let name = shadow.name(table);
        sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (LIKE {table} INCLUDING ALL)"))
            .execute(&mut *conn)
            .await?;
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&mut *conn).await?;
    drop(conn);
    let mut log = LogReader::new(pool.clone()).catch_up(LogCursor::default(), 10_000).await?;
    let mut done = 0u64;
    while let Some(batch) = log.next().await? {
        let mut tx = amplog_log::tx::begin(pool).await?;
        Fold::apply_batch(&mut tx, &shadow, store, &batch).await?;
        tx.commit().await?;
        done += batch.len() as u64;
        progress(done, total.max(done as i64) as u64);
    }
    let mut cursor = log.cursor();
    // The swap: fence the leader, project what arrived meanwhile, rename, checkpoint.
    let mut tx = amplog_log::tx::begin(pool).await?;
    sqlx::query(
        "INSERT INTO projector_leases (name, token) VALUES ($1, 1)
         ON CONFLICT (name) DO UPDATE SET token = projector_leases.token + 1",
    )
    .bind(READ_MODELS)
    .execute(&mut *tx)
    .await?;
    loop {
        let batch = amplog_log::reader::read_batch_in(&mut tx, cursor, 10_000).await?;
        let Some(last) = batch.last() else { break };
        Fold::apply_batch(&mut tx, &shadow, store, &batch).await?;
        cursor = last.cursor();
        done += batch.len() as u64;
    }
    for table in TABLES {
        let name = shadow.name(table);
        sqlx::raw_sql(&format!(
            "ALTER TABLE {table} RENAME TO {table}__old; ALTER TABLE {name} RENAME TO {table}; DROP TABLE {table}__old;
             SELECT amplog_secure('{table}')"
        ))
        .execute(&mut *tx)
        .await?;
    }
    LogReader::save_checkpoint(&mut tx, READ_MODELS, cursor).await?;
    tx.commit().await?;
    progress(done, done);
    Ok(done)
}

/// Where a projector stands.
#[derive(Clone, Debug, Serialize)]
pub struct ProjectorStatus {
    pub name: String,
    pub checkpoint: LogCursor,
    pub lag_events: i64,
    pub lag_seconds: f64,
    pub leader: Option<String>,
    pub token: i64,
    pub heartbeat: Option<DateTime<Utc>>,
}

pub async fn status(pool: &PgPool, name: &str) -> Result<ProjectorStatus, ProjectionError> {
    let mut conn = pool.acquire().await?;
    let checkpoint = LogReader::checkpoint(&mut conn, name).await?;
    let lag = sqlx::query(
        "SELECT count(*) AS events, EXTRACT(EPOCH FROM now() - min(recorded_at))::float8 AS seconds FROM events
         WHERE (transaction_id, position) > ($1::text::xid8, $2)",
    )
    .bind(checkpoint.transaction_id.to_string())
    .bind(checkpoint.position)
    .fetch_one(&mut *conn)
    .await?;
    let lease = sqlx::query("SELECT token, heartbeat FROM projector_leases WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
    // The leader is whoever holds the advisory lock now, not whoever held it last.
    let leader: Option<String> = sqlx::query_scalar(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
    )
    .bind(lock_key(name))
    .fetch_optional(&mut *conn)
    .await?;
    Ok(ProjectorStatus {
        name: name.to_string(),
        checkpoint,
        lag_events: lag.get("events"),
        lag_seconds: lag.get::<Option<f64>, _>("seconds").unwrap_or(0.0),
        leader,
        token: lease.as_ref().map(|l| l.get("token")).unwrap_or(0),
        heartbeat: lease.as_ref().and_then(|l| l.get("heartbeat")),
    })
}

/// Read-your-writes: waits (at most `timeout`) until projector `name` has applied every
/// event up to `cursor` (a command's `CommandOutcome::last_cursor`). Returns whether it has.
pub async fn wait_for(
    pool: &PgPool,
    name: &str,
    cursor: LogCursor,
    timeout: Duration,
) -> Result<bool, ProjectionError> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut conn = pool.acquire().await?;
        if LogReader::checkpoint(&mut conn, name).await? >= cursor {
            return Ok(true);
        }
        drop(conn);
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The read models' fingerprint: per table, its row count and an md5 of its rows in key
/// order. Two databases (or one before and after a rebuild) hold the same read models when
/// their fingerprints are equal.
pub async fn fingerprint(pool: &PgPool) -> Result<std::collections::BTreeMap<String, (i64, String)>, ProjectionError> {
    let mut out = std::collections::BTreeMap::new();
    for table in TABLES {
        let row: (i64, String) = sqlx::query_as(&format!(
            "SELECT count(*), md5(coalesce(string_agg(key || '|' || project_id || '|' || doc::text, ',' ORDER BY key), ''))
             FROM {table}"
        ))
        .fetch_one(pool)
        .await?;
        out.insert(table.to_string(), row);
    }
    Ok(out)
}
