//! Configuration and connection: DATABASE_URL or the embedded PostgreSQL, and the credential
//! key (AMPLOG_CREDENTIALS_KEY, base64 of 32 bytes; on the embedded default a key generated
//! once into the data folder).

use crate::embedded::EmbeddedPostgres;
use amplog_commands::credentials::{CredentialKey, CredentialStore};
use amplog_commands::database::{Database, Hosts};
use amplog_commands::CommandService;
use amplog_log::EventStore;
use anyhow::{bail, Context, Result};
use base64::Engine;
use sqlx::PgPool;
use std::path::{Path, PathBuf};

pub struct App {
    pub pool: PgPool,
    /// Follows the primary when DATABASE_URL names several hosts.
    _database: Database,
    embedded: Option<EmbeddedPostgres>,
    data_dir: PathBuf,
}

impl App {
    pub async fn open(database_url: Option<&str>, data_dir: &Path) -> Result<Self> {
        let (hosts, embedded) = match database_url {
            Some(url) => (Hosts::parse(url).context("DATABASE_URL")?, None),
            None => {
                let pg = EmbeddedPostgres::start(data_dir)?;
                (Hosts::single(pg.database().await?), Some(pg))
            }
        };
        let pool_size = match std::env::var("AMPLOG_DB_POOL") {
            Ok(n) => n.parse().context("AMPLOG_DB_POOL is not a number")?,
            Err(_) => 16,
        };
        let database = Database::connect(hosts, pool_size).await.context("connecting to PostgreSQL and migrating")?;
        let pool = database.pool.clone();
        amplog_log::telemetry::metrics().watch_pool(&pool);
        Ok(Self { pool, _database: database, embedded, data_dir: data_dir.to_path_buf() })
    }

    /// Whether amplog runs its own PostgreSQL (then it also runs the projectors in `serve`).
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    pub fn service(&self) -> Result<CommandService> {
        let key = self.credential_key()?;
        Ok(CommandService::new(self.pool.clone(), EventStore::default(), CredentialStore::new(key)))
    }

    fn credential_key(&self) -> Result<CredentialKey> {
        let b64 = base64::engine::general_purpose::STANDARD;
        if let Ok(encoded) = std::env::var("AMPLOG_CREDENTIALS_KEY") {
            let bytes = b64.decode(encoded.trim()).context("AMPLOG_CREDENTIALS_KEY is not base64")?;
            return Ok(CredentialKey::from_bytes(&bytes)?);
        }
        if self.embedded.is_none() {
            bail!("AMPLOG_CREDENTIALS_KEY (base64 of 32 random bytes) must be set when DATABASE_URL is");
        }
        let path = self.data_dir.join("credentials.key");
        if !path.exists() {
            // Written whole, then linked into place: a process starting beside this one
            // either links first (and both use its key) or finds the complete file.
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let staged = self.data_dir.join(format!("credentials.key.{}", std::process::id()));
            let mut file =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&staged)?;
            writeln!(file, "{}", b64.encode(CredentialKey::generate()))?;
            file.sync_all()?;
            match std::fs::hard_link(&staged, &path) {
                Ok(()) => tracing::info!(path = %path.display(), "generated the credential encryption key"),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e.into()),
            }
            std::fs::remove_file(&staged)?;
        }
        let encoded = std::fs::read_to_string(&path)?;
        let bytes = b64.decode(encoded.trim()).with_context(|| format!("{} is not base64", path.display()))?;
        Ok(CredentialKey::from_bytes(&bytes)?)
    }

    pub async fn close(&mut self) {
        self.pool.close().await;
        if let Some(mut pg) = self.embedded.take() {
            pg.stop();
        }
    }
}
