//! Transactions that survive a cancelled caller.
//!
//! sqlx's PostgreSQL `BEGIN` is not cancel-safe (launchbadge/sqlx#4393, in 0.8.6 and
//! 0.9.0): it counts the transaction only after the `BEGIN` round trip, so a future dropped
//! during that round trip (a client that hangs up, a `timeout`, a lost leadership) leaves
//! the session inside a transaction nothing will end, and the pool hands it on. Every
//! later statement on that connection then runs inside it, and its snapshot holds the
//! cluster's `xmin` back, so every log reader waits for it. Here `BEGIN` runs on a task of
//! its own: it always finishes, and a transaction nobody waits for any more is dropped
//! there, which rolls it back.
//!
//! The workspace's `clippy.toml` refuses sqlx's own `begin`s everywhere else.
#![allow(clippy::disallowed_methods)]

use std::borrow::Cow;
use std::future::Future;

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres, Transaction};

/// `pool.begin()`, cancel-safe.
pub async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let pool = pool.clone();
    detached(async move { pool.begin().await }).await
}

/// `pool.begin_with(statement)`, cancel-safe: a `BEGIN` followed by settings in one
/// simple query.
pub async fn begin_with(
    pool: &PgPool,
    statement: impl Into<Cow<'static, str>>,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let pool = pool.clone();
    let statement = statement.into();
    detached(async move { pool.begin_with(statement).await }).await
}

/// `BEGIN` on a connection already held, cancel-safe.
pub async fn begin_on(conn: PoolConnection<Postgres>) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    detached(Transaction::begin(conn, None)).await
}

async fn detached(
    begin: impl Future<Output = Result<Transaction<'static, Postgres>, sqlx::Error>> + Send + 'static,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    match tokio::spawn(begin).await {
        Ok(begun) => begun,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Only a runtime shutting down cancels the task.
        Err(_) => Err(sqlx::Error::PoolClosed),
    }
}
