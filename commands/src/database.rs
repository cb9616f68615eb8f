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
        if !hostlist.contains(',') {
            // One host (or none: a Unix socket in `?host=`): sqlx reads the URL as it is.
            let options =
                PgConnectOptions::from_str(url).map_err(|e| invalid(&format!("is not a PostgreSQL URL: {e}")))?;
            return Ok(Self::single(options));
        }
        let mut candidates = Vec::new();
        for host in hostlist.split(',') {
            if host.is_empty() {
                return Err(invalid("names an empty host"));
            }
            let options = PgConnectOptions::from_str(&format!("{scheme}://{userinfo}{host}{tail}"))
                .map_err(|e| invalid(&format!("is not a PostgreSQL URL: {e}")))?;
            candidates.push((host.to_string(), options));
        }
        Ok(Self { candidates })
    }

    /// One host's options (the embedded PostgreSQL's).
    pub fn single(options: PgConnectOptions) -> Self {
        let host = format!("{}:{}", options.get_host(), options.get_port());
        Self { candidates: vec![(host, options)] }
    }

    /// Each host's name (`host:port`), in the URL's order.
    pub fn names(&self) -> Vec<&str> {
        self.candidates.iter().map(|(h, _)| h.as_str()).collect()
    }

    /// The first host, in the URL's order, that answers and is not in recovery; else what
    /// each host said.
    pub async fn primary(&self) -> Result<(String, PgConnectOptions), Vec<String>> {
        let mut why = Vec::new();
        for (host, options) in &self.candidates {
            let probe = async {
                let mut conn = options.connect().await?;
                let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()").fetch_one(&mut conn).await?;
                conn.close().await.ok();
                Ok::<bool, sqlx::Error>(standby)
            };
            match tokio::time::timeout(Duration::from_secs(2), probe).await {
                Ok(Ok(false)) => return Ok((host.clone(), options.clone())),
                Ok(Ok(true)) => why.push(format!("{host}: a standby (in recovery)")),
                Ok(Err(error)) => why.push(format!("{host}: {error}")),
                Err(_) => why.push(format!("{host}: no answer within 2 s")),
            }
        }
        Err(why)
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
        let several = hosts.candidates.len() > 1;
        // One host: connected to as it is (its own error, at once, when it refuses).
        let (host, options) = match several {
            false => hosts.candidates[0].clone(),
            true => {
                let deadline = Instant::now() + FIND_PRIMARY;
                loop {
                    match hosts.primary().await {
                        Ok(found) => break found,
                        Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(500)).await,
                        Err(why) => {
                            return Err(CommandError::Invalid(format!(
                                "no primary among the database hosts: {}",
                                why.join("; ")
                            )))
                        }
                    }
                }
            }
        };
        // Every connection asks the server to probe it: a client cut off by the network (a
        // partitioned leader) loses its session, its advisory locks and its open
        // transaction within about 11 s, not the operating system's two hours. (Set after
        // connecting, not as startup options, which a session pooler may refuse.) With
        // several hosts, a connection that lands on a standby is refused.
        let pool_options = PgPoolOptions::new().max_connections(max_connections).after_connect(move |conn, _| {
            Box::pin(async move {
                sqlx::query(
                    "SELECT set_config('tcp_keepalives_idle', '5', false), set_config('tcp_keepalives_interval', '2', false),
                            set_config('tcp_keepalives_count', '3', false), set_config('tcp_user_timeout', '11000', false)",
                )
                .execute(&mut *conn)
                .await?;
                if several {
                    let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()").fetch_one(&mut *conn).await?;
                    if standby {
                        return Err(sqlx::Error::Protocol("connected to a standby: the primary moved".into()));
                    }
                }
                Ok(())
            })
        });
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
        // On an idle pooled connection, or (the pool busy) on one of its own: a busy pool
        // is no reason to move.
        let check = async {
            match pool.try_acquire() {
                Some(mut conn) => {
                    sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()").fetch_one(&mut *conn).await
                }
                None => {
                    let options = hosts.candidates.iter().find(|(h, _)| *h == current).map(|(_, o)| o.clone());
                    let mut conn = options.expect("the current host is a candidate").connect().await?;
                    let standby =
                        sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()").fetch_one(&mut conn).await;
                    conn.close().await.ok();
                    standby
                }
            }
        };
        if let Ok(Ok(false)) = tokio::time::timeout(Duration::from_secs(2), check).await {
            continue;
        }
        match hosts.primary().await {
            Ok((host, options)) if host != current => {
                tracing::warn!(from = %current, to = %host, "the database primary moved");
                pool.set_connect_options(options);
                current = host;
            }
            Ok(_) => {}
            Err(why) => tracing::warn!(hosts = %why.join("; "), "no database host is the primary"),
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
        let socket = Hosts::parse("postgres:///amplog?host=/run/postgresql").unwrap();
        assert_eq!(socket.candidates.len(), 1);
        for bad in ["no-scheme", "postgres://a@h1,,h2/db", "postgres://a@h1:notaport,h2/db"] {
            assert!(Hosts::parse(bad).is_err(), "{bad}");
        }
    }
}
