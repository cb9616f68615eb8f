//! Tenancy's second line: every read an API request makes runs in one transaction as the
//! `amplog_app` role (no table ownership, SELECT only) with `amplog.project_id` set, so
//! PostgreSQL's forced row-level security hides every other project's row even if a query
//! forgot its own `project_id = $1`. The transaction begins at the first read.

use crate::error::ApiError;
use amplog_domain::ProjectId;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

/// The role API reads run as (created by migration 0003).
pub const APP_ROLE: &str = "amplog_app";

pub struct TenantDb {
    pool: PgPool,
    pub project: ProjectId,
    group: Option<String>,
    statement_timeout_ms: u64,
    tx: Mutex<Option<Transaction<'static, Postgres>>>,
    /// How many times the connection was handed out (≈ statements): dev mode reports it
    /// in the response's extensions, which shows DataLoader batching at work.
    uses: AtomicUsize,
}

impl TenantDb {
    pub fn new(pool: PgPool, project: ProjectId, statement_timeout_ms: u64) -> Self {
        Self { pool, project, group: None, statement_timeout_ms, tx: Mutex::new(None), uses: AtomicUsize::new(0) }
    }

    /// Narrowed to one group of the project (an end user's token): row-level security then
    /// hides every other group's installations, connections, operations, read states and
    /// usage too.
    pub fn with_group(mut self, group: Option<String>) -> Self {
        self.group = group;
        self
    }

    /// The statement that makes what follows it in its transaction run as `amplog_app`,
    /// scoped to the project (and the group). Both values are rendered from typed values
    /// (a UUID, an integer), so nothing can be injected; the group is tenant input: it
    /// reaches the statement hex-encoded, never as text.
    fn settings(&self) -> String {
        let group = match &self.group {
            Some(group) => format!(
                ", set_config('amplog.group_ref', convert_from(decode('{}', 'hex'), 'UTF8'), true)",
                hex::encode(group)
            ),
            None => String::new(),
        };
        format!(
            "SELECT set_config('role', '{APP_ROLE}', true), set_config('amplog.project_id', '{}', true), \
             set_config('statement_timeout', '{}', true){group};",
            self.project.0, self.statement_timeout_ms
        )
    }

    /// The request's connection: a transaction as `amplog_app`, scoped to the project.
    pub async fn conn(&self) -> Result<MappedMutexGuard<'_, PgConnection>, ApiError> {
        self.uses.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.tx.lock().await;
        if guard.is_none() {
            // One round trip: BEGIN and the settings as one simple query.
            let begin = format!("BEGIN; {}", self.settings());
            *guard = Some(
                amplog_log::telemetry::metrics().waiting_for(amplog_log::tx::begin_with(&self.pool, begin)).await?,
            );
        }
        Ok(MutexGuard::map(guard, |tx| &mut **tx.as_mut().expect("begun above")))
    }

    /// One-statement reads in one round trip, in the same tenancy as `conn`: the settings and
    /// the reads are one simple query, so one implicit transaction, which ends with it.
    pub async fn read_once(
        &self,
        reads: &[amplog_projections::reads::InstallationRead],
    ) -> Result<Vec<amplog_projections::reads::Fetched>, ApiError> {
        self.uses.fetch_add(1, Ordering::Relaxed);
        let mut conn = amplog_log::telemetry::metrics().waiting_for(self.pool.acquire()).await?;
        Ok(amplog_projections::reads::read(&mut conn, &self.settings(), self.project.0, reads).await?)
    }

    pub fn uses(&self) -> usize {
        self.uses.load(Ordering::Relaxed)
    }

    /// Ends the transaction (reads only: nothing to keep), so a long-lived caller such as a
    /// subscription does not hold a snapshot between polls.
    pub async fn release(&self) {
        if let Some(tx) = self.tx.lock().await.take() {
            tx.rollback().await.ok();
        }
    }
}
