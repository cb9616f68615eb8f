//! The embedded default: with no DATABASE_URL, amplog initialises (once) and starts its own
//! PostgreSQL from the binaries on PATH in `<data dir>/pg`, listening on a Unix socket only.
//! Several amplog processes may share it (`serve` beside `worker`, two `migrate`s started
//! together): starting and stopping happen under an exclusive lock file, each process holds
//! a shared lock on another for as long as it uses the server, and the last one to exit
//! stops it, whoever started it (a crashed process's locks go with it, so a server it left
//! behind is stopped by the next last user). PostgreSQL refuses to run as root, so as root
//! the server runs as the `postgres` user.

use anyhow::{bail, Context, Result};
use sqlx::postgres::PgConnectOptions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const PORT: u16 = 5432;
const USER: &str = "amplog";

pub struct EmbeddedPostgres {
    pgdata: PathBuf,
    socket_dir: PathBuf,
    bin: PathBuf,
    run_as: Option<String>,
    /// Where the lock files are.
    home: PathBuf,
    /// This process's shared lock on `users.lock`, held while it uses the server.
    using: Option<std::fs::File>,
}

/// Starting and stopping happen under this exclusive lock; users hold `USERS_LOCK` shared.
const START_LOCK: &str = "amplog-start.lock";
const USERS_LOCK: &str = "amplog-users.lock";

fn lock_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))
}

impl EmbeddedPostgres {
    /// Initialises the cluster if needed and starts it unless it already runs.
    pub fn start(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir).with_context(|| format!("creating data folder {}", data_dir.display()))?;
        let data_dir = data_dir.canonicalize()?;
        let bin = find_bin_dir()?;
        let run_as = is_root()?.then(|| "postgres".to_string());
        let mut home = data_dir.clone();
        if let Some(user) = &run_as {
            // The data folder is ours: let the server's user traverse it. If a parent folder
            // stops it (a home folder of mode 0700, say), the cluster lives under /var/lib.
            let mode = std::fs::metadata(&data_dir)?.permissions().mode();
            set_mode(&data_dir, mode | 0o011)?;
            if !can_traverse(user, &data_dir)? {
                let digest = sha_hex(data_dir.to_string_lossy().as_bytes());
                home = PathBuf::from("/var/lib/amplog").join(&digest[..16]);
                std::fs::create_dir_all(&home)?;
                set_mode(&home, 0o711)?;
                tracing::warn!(
                    data_dir = %data_dir.display(), cluster = %home.display(),
                    "the `{user}` user cannot reach the data folder; the PostgreSQL cluster lives elsewhere"
                );
            }
        }
        let pgdata = home.join("pg");
        let mut socket_dir = home.join("run");
        // A Unix socket path must fit in 107 bytes; fall back to a short private folder.
        if socket_dir.as_os_str().len() + 20 > 107 {
            let digest = sha_hex(home.to_string_lossy().as_bytes());
            socket_dir = std::env::temp_dir().join(format!("amplog-{}", &digest[..12]));
        }
        for dir in [&pgdata, &socket_dir] {
            std::fs::create_dir_all(dir)?;
            set_mode(dir, 0o700)?;
            if let Some(user) = &run_as {
                run(Command::new("chown").arg("-R").arg(format!("{user}:")).arg(dir))?;
            }
        }
        let starting = lock_file(&home.join(START_LOCK))?;
        starting.lock().context("waiting for another amplog process starting or stopping PostgreSQL")?;
        let mut pg = Self { pgdata, socket_dir, bin, run_as, home, using: None };
        pg.init_once()?;
        pg.start_server()?;
        let users = lock_file(&pg.home.join(USERS_LOCK))?;
        users.lock_shared()?;
        pg.using = Some(users);
        drop(starting);
        Ok(pg)
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn init_once(&self) -> Result<()> {
        if self.pgdata.join("PG_VERSION").exists() {
            return Ok(());
        }
        tracing::info!(pgdata = %self.pgdata.display(), "initialising the embedded PostgreSQL cluster (once)");
        run(self.command("initdb").arg("-D").arg(&self.pgdata).args([
            "-U",
            USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]))
        .context("initdb")
    }

    fn running(&self) -> bool {
        self.command("pg_ctl").arg("status").arg("-D").arg(&self.pgdata).output().is_ok_and(|o| o.status.success())
    }

    fn start_server(&mut self) -> Result<()> {
        if self.running() {
            tracing::info!("the embedded PostgreSQL is already running; using it");
            return Ok(());
        }
        let options = format!("-c listen_addresses='' -k {} -p {PORT}", self.socket_dir.display());
        let log = self.socket_dir.join("postgres.log");
        run(self
            .command("pg_ctl")
            .arg("start")
            .arg("-w")
            .arg("-D")
            .arg(&self.pgdata)
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(options))
        .with_context(|| format!("starting the embedded PostgreSQL (its log: {})", log.display()))?;
        tracing::info!(socket = %self.socket_dir.display(), "embedded PostgreSQL started");
        Ok(())
    }

    /// Options for a database on this server.
    pub fn options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new().socket(&self.socket_dir).port(PORT).username(USER).database(database)
    }

    /// Creates the amplog database if missing and returns its options.
    pub async fn database(&self) -> Result<PgConnectOptions> {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect_with(&self.options("postgres")).await?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'amplog')")
            .fetch_one(&mut admin)
            .await?;
        if !exists {
            // Another amplog process starting beside this one may create it first.
            if let Err(error) = sqlx::raw_sql("CREATE DATABASE amplog").execute(&mut admin).await {
                let created: bool =
                    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'amplog')")
                        .fetch_one(&mut admin)
                        .await?;
                if !created {
                    return Err(error.into());
                }
            }
        }
        admin.close().await?;
        Ok(self.options("amplog"))
    }

    /// Stops using the server, and stops the server if no other amplog process uses it;
    /// the data stays for the next run.
    pub fn stop(&mut self) {
        let Some(using) = self.using.take() else { return };
        let stopping = match lock_file(&self.home.join(START_LOCK)).and_then(|f| Ok(f.lock().map(|()| f)?)) {
            Ok(lock) => lock,
            Err(error) => return tracing::warn!(%error, "cannot take the start lock; leaving PostgreSQL running"),
        };
        drop(using);
        let last = lock_file(&self.home.join(USERS_LOCK)).map(|users| users.try_lock().is_ok());
        if !matches!(last, Ok(true)) {
            tracing::info!("another amplog process uses the embedded PostgreSQL; leaving it running");
            return;
        }
        match run(self.command("pg_ctl").arg("stop").arg("-w").args(["-m", "fast"]).arg("-D").arg(&self.pgdata)) {
            Ok(()) => tracing::info!("embedded PostgreSQL stopped"),
            Err(error) => tracing::warn!(%error, "stopping the embedded PostgreSQL failed"),
        }
        drop(stopping);
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(command: &mut Command) -> Result<()> {
    let output = command.output().with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            command.get_program(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// `initdb`/`pg_ctl` from PATH, else the newest Debian-style /usr/lib/postgresql/N/bin.
fn find_bin_dir() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or in /usr/lib/postgresql: \
         install PostgreSQL 13 or newer, or set DATABASE_URL",
    )
}

fn can_traverse(user: &str, dir: &Path) -> Result<bool> {
    let status =
        Command::new("runuser").args(["-u", user, "--", "test", "-x"]).arg(dir).status().context("running runuser")?;
    Ok(status.success())
}

fn is_root() -> Result<bool> {
    let output = Command::new("id").arg("-u").output().context("running `id -u`")?;
    Ok(String::from_utf8_lossy(&output.stdout).trim() == "0")
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

pub fn sha_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}
