//! The write side of amplog and the only writer of the log: load an aggregate (snapshot +
//! tail, upcast), decide with the pure domain, append atomically with a hash chain, under an
//! optional idempotency key. Also owns the encrypted credential store, the audit queries
//! (history, chain verification) and the one log reader every consumer uses.

pub mod audit;
pub mod credentials;
pub mod destinations;
pub mod error;
pub mod hash;
pub mod leader;
pub mod reader;
pub mod service;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::CommandError;
pub use reader::{CatchUp, LogCursor, LogReader, RecordedEvent, StoredEvent, Subscription};
pub use service::{CommandContext, CommandService};
pub use store::{AppendedEvent, CommandOutcome, EventStore, Loaded};

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
