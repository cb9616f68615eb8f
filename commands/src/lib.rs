//! The write side of amplog and the only writer of the log (`amplog-log`): one method per
//! command — idempotency, tenant-scoped loads, the pure decision, one atomic append — and
//! the encrypted credential store and webhook destinations.

pub mod credentials;
pub mod database;
pub mod destinations;
pub mod error;
pub mod service;
#[cfg(feature = "testing")]
pub mod testing;

/// What a command appended (the log's type; the service returns it).
pub use amplog_log::CommandOutcome;
pub use error::CommandError;
pub use service::{CommandContext, CommandService};

/// Connects a pool and applies the embedded migrations.
pub async fn connect_and_migrate(
    options: sqlx::postgres::PgConnectOptions,
    max_connections: u32,
) -> Result<sqlx::PgPool, CommandError> {
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(max_connections).connect_with(options).await?;
    let mut conn = pool.acquire().await?;
    amplog_migrations::migrate(&mut conn).await?;
    Ok(pool)
}
