//! Connecting to PostgreSQL: one host, or several in libpq's form
//! (`postgres://user@host1:5432,host2:5432/db`), of which amplog uses the primary — the
//! one not in recovery — and moves to another by itself when the primary fails and a
//! standby is promoted. sqlx connects to one host; this is the rest.

use crate::CommandError;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// The hosts a database URL names, each as its own connection options.
#[derive(Clone, Debug)]
pub struct Hosts {
    candidates: Vec<(String, PgConnectOptions)>,
}

impl Hosts {
    /// Parses a URL naming one host or several (comma-separated, each `host[:port]`).
    /// `target_session_attrs` is libpq's and dropped: with several hosts amplog always
    /// wants the primary.
    pub fn parse(url: &str) -> Result<Self, CommandError> {
        let invalid = |why: &str| CommandError::Invalid(format!("the database URL {why}"));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| invalid("has no scheme"))?;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hostlist) = match authority.rfind('@') {
            Some(at) => (&authority[..=at], &authority[at + 1..]),
            None => ("", authority),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let kept: Vec<&str> =
                    query.split('&').filter(|p| !p.is_empty() && !p.starts_with("target_session_attrs=")).collect();
                match kept.is_empty() {
                    true => path.to_string(),
                    false => format!("{path}?{}", kept.join("&")),
                }
            }
            None => tail.to_string(),
        };
        let mut candidates = Vec::new();
        for host in hostlist.split(',') {
            if host.is_empty() {
                return Err(invalid("names an empty host"));
            }
            let options = PgConnectOptions::from_str(&format!("{scheme}://{userinfo}{host}{tail}"))
                .map_err(|e| invalid(&format!("is not a PostgreSQL URL: {e}")))?;
            candidates.push((host.to_string(), Self::probed(options)));
        }
        Ok(Self { candidates })
    }

    /// Every connection asks the server to probe it: a client cut off by the network (a
    /// partitioned leader) loses its session, its advisory locks and its open transaction
    /// within about 11 s, instead of the operating system's two hours.
    fn probed(options: PgConnectOptions) -> PgConnectOptions {
        options.options([
            ("tcp_keepalives_idle", "5"),
            ("tcp_keepalives_interval", "2"),
            ("tcp_keepalives_count", "3"),
            ("tcp_user_timeout", "11000"),
        ])
    }

    /// One host's options (the embedded PostgreSQL's).
    pub fn single(options: PgConnectOptions) -> Self {
        let host = format!("{}:{}", options.get_host(), options.get_port());
        Self { candidates: vec![(host, Self::probed(options))] }
    }

    /// Each host's name (`host:port`), in the URL's order.
    pub fn names(&self) -> Vec<&str> {
        self.candidates.iter().map(|(h, _)| h.as_str()).collect()
    }

    /// The first host, in the URL's order, that answers and is not in recovery.
    pub async fn primary(&self) -> Option<(String, PgConnectOptions)> {
        for (host, options) in &self.candidates {
            let probe = async {
                let mut conn = options.connect().await?;
                let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()").fetch_one(&mut conn).await?;
                conn.close().await.ok();
                Ok::<bool, sqlx::Error>(standby)
            };
            match tokio::time::timeout(Duration::from_secs(2), probe).await {
                Ok(Ok(false)) => return Some((host.clone(), options.clone())),
                Ok(Ok(true)) => tracing::debug!(%host, "a standby"),
                Ok(Err(error)) => tracing::debug!(%host, %error, "does not answer"),
                Err(_) => tracing::debug!(%host, "does not answer within 2 s"),
            }
        }
        None
    }
}

/// A pool on the primary and, with several hosts, the task that moves it to a new primary.
pub struct Database {
    pub pool: PgPool,
    follower: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Some(task) = self.follower.take() {
            task.abort();
        }
    }
}

/// How long a start waits for some host to be the primary (one may be being promoted).
const FIND_PRIMARY: Duration = Duration::from_secs(30);

impl Database {
    /// Connects a pool of `max_connections` to the primary among `hosts` and applies the
    /// embedded migrations. With several hosts, a connection that finds itself on a
    /// standby is refused, and a task checks every second that the pool's host is still
    /// the primary, pointing the pool at the one that is when it is not.
    pub async fn connect(hosts: Hosts, max_connections: u32) -> Result<Self, CommandError> {
        let deadline = Instant::now() + FIND_PRIMARY;
        let (host, options) = loop {
            match hosts.primary().await {
                Some(found) => break found,
                None if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(500)).await,
                None => {
                    return Err(CommandError::Invalid(format!(
                        "no primary among the database hosts {:?} (each refused, or is a standby)",
                        hosts.names()
                    )))
                }
            }
        };
        let several = hosts.candidates.len() > 1;
        let mut pool_options = PgPoolOptions::new().max_connections(max_connections);
        if several {
            pool_options = pool_options.after_connect(|conn, _| {
                Box::pin(async move {
                    let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()").fetch_one(&mut *conn).await?;
                    match standby {
                        true => Err(sqlx::Error::Protocol("connected to a standby: the primary moved".into())),
                        false => Ok(()),
                    }
                })
            });
        }
        let pool = pool_options.connect_with(options).await?;
        tracing::info!(%host, "database primary");
        let mut conn = pool.acquire().await?;
        amplog_migrations::migrate(&mut conn).await?;
        drop(conn);
        let follower = several.then(|| tokio::spawn(follow_primary(pool.clone(), hosts, host)));
        Ok(Self { pool, follower })
    }
}

/// Every second: is the pool's host still the primary? When it does not answer, or answers
/// as a standby, the pool's future connections go to whichever host is the primary now
/// (connections to a failed host fail their next check and are dropped by the pool).
async fn follow_primary(pool: PgPool, hosts: Hosts, mut current: String) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let check = async {
            let mut conn = pool.acquire().await?;
            sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()").fetch_one(&mut *conn).await
        };
        if let Ok(Ok(false)) = tokio::time::timeout(Duration::from_secs(2), check).await {
            continue;
        }
        match hosts.primary().await {
            Some((host, options)) if host != current => {
                tracing::warn!(from = %current, to = %host, "the database primary moved");
                pool.set_connect_options(options);
                current = host;
            }
            Some(_) => {}
            None => tracing::warn!(hosts = ?hosts.names(), "no database host is the primary"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Hosts;

    #[test]
    fn a_url_names_one_host_or_several_each_with_the_rest_of_the_url() {
        let one = Hosts::parse("postgres://amplog:secret@db.internal:5433/amplog?sslmode=disable").unwrap();
        assert_eq!(one.names(), ["db.internal:5433"]);
        let several = Hosts::parse(
            "postgres://amplog:p%40ss@10.0.0.1:5432,10.0.0.2,[::1]:6000/amplog?target_session_attrs=read-write&sslmode=disable",
        )
        .unwrap();
        assert_eq!(several.names(), ["10.0.0.1:5432", "10.0.0.2", "[::1]:6000"]);
        for (_, options) in &several.candidates {
            assert_eq!(options.get_username(), "amplog");
            assert_eq!(options.get_database(), Some("amplog"));
        }
        let ports: Vec<u16> = several.candidates.iter().map(|(_, o)| o.get_port()).collect();
        assert_eq!(ports, [5432, 5432, 6000]);
        for bad in ["no-scheme", "postgres://a@h1,,h2/db", "postgres://a@h1:notaport/db"] {
            assert!(Hosts::parse(bad).is_err(), "{bad}");
        }
    }
}
