//! Leader election for singletons (each projector, the Kafka relay, the job dispatcher): a
//! PostgreSQL advisory lock held on a session of its own, plus a fencing token in
//! `projector_leases` that every unit of work re-checks inside its own transaction, so a
//! leader that lost its session can never commit after its successor.

use crate::LogError;
use sqlx::{Connection, PgConnection, PgPool};
use std::future::Future;
use std::time::Duration;

/// A stable 63-bit advisory-lock key per singleton name (FNV-1a).
pub fn lock_key(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("amplog.projector.{name}").bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash >> 1) as i64
}

/// Held while this process leads singleton `name`: the session that owns the advisory lock
/// and the fencing token it was granted.
pub struct Leadership {
    session: PgConnection,
    pub name: String,
    pub token: i64,
    _reported: crate::telemetry::LeaderGuard,
}

impl Leadership {
    /// Tries to lead `name`: the advisory lock, then a new fencing token. `None` when
    /// another session holds the lock.
    pub async fn try_acquire(pool: &PgPool, name: &str, holder: &str) -> Result<Option<Self>, LogError> {
        let mut session = pool.acquire().await?.detach();
        // The session names itself, so status queries report whoever holds the lock now.
        sqlx::query("SELECT set_config('application_name', $1, false)")
            .bind(holder.chars().take(63).collect::<String>())
            .execute(&mut session)
            .await?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(lock_key(name)).fetch_one(&mut session).await?;
        if !locked {
            session.close().await.ok();
            return Ok(None);
        }
        let token: i64 = sqlx::query_scalar(
            "INSERT INTO projector_leases (name, token, holder, acquired_at, heartbeat) VALUES ($1, 1, $2, now(), now())
             ON CONFLICT (name) DO UPDATE SET token = projector_leases.token + 1, holder = EXCLUDED.holder,
                 acquired_at = now(), heartbeat = now()
             RETURNING token",
        )
        .bind(name)
        .bind(holder)
        .fetch_one(&mut session)
        .await?;
        tracing::info!(singleton = %name, token, %holder, "leading");
        let reported = crate::telemetry::metrics().leading(name);
        Ok(Some(Self { session, name: name.to_string(), token, _reported: reported }))
    }

    /// Fails when the session holding the advisory lock is gone.
    pub async fn alive(&mut self) -> Result<(), LogError> {
        sqlx::query("SELECT 1").execute(&mut self.session).await?;
        Ok(())
    }

    /// Checks, in the caller's transaction, that this token is still current (and beats the
    /// heartbeat). A newer leader or a rebuild bumps the token; the row lock orders the two.
    pub async fn fence(&self, tx: &mut PgConnection) -> Result<bool, LogError> {
        fence(tx, &self.name, self.token).await
    }

    /// Gives the lock up, by the time this returns: closing the session alone frees it
    /// only once its backend has exited, and a leader taking over at once found it held.
    pub async fn release(mut self) {
        let unlocked =
            sqlx::query("SELECT pg_advisory_unlock($1)").bind(lock_key(&self.name)).execute(&mut self.session);
        unlocked.await.ok();
        self.session.close().await.ok();
    }
}

/// `Leadership::fence` for a name and token kept apart from their session.
pub async fn fence(tx: &mut PgConnection, name: &str, token: i64) -> Result<bool, LogError> {
    let held = sqlx::query("UPDATE projector_leases SET heartbeat = now() WHERE name = $1 AND token = $2")
        .bind(name)
        .bind(token)
        .execute(tx)
        .await?;
    Ok(held.rows_affected() == 1)
}

/// Runs `work` as the leader of `name` whenever this process can lead, until `stop`
/// resolves: polls for the lock while another session holds it; when `work` fails (or is
/// fenced), logs why and leads again after `pause(&error)`, from the work's checkpoint.
pub async fn run_as_leader<E, W, F>(
    pool: &PgPool,
    name: &str,
    holder: &str,
    stop: impl Future<Output = ()>,
    pause: impl Fn(&E) -> Duration,
    mut work: W,
) where
    E: std::fmt::Display + From<LogError>,
    W: FnMut(Leadership) -> F,
    F: Future<Output = Result<(), E>>,
{
    tokio::pin!(stop);
    loop {
        let step = async {
            match Leadership::try_acquire(pool, name, holder).await? {
                None => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Ok(())
                }
                Some(leadership) => work(leadership).await,
            }
        };
        tokio::select! {
            _ = &mut stop => return,
            result = step => if let Err(error) = result {
                tracing::warn!(%error, singleton = %name, "stopped leading; trying again");
                tokio::time::sleep(pause(&error)).await;
            },
        }
    }
}
