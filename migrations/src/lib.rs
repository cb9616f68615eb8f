//! The SQL schema of amplog: append-only migration files under `sql/`, embedded in the
//! binary, and the runner that applies them once, in order, under an advisory lock.

use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, Row};

/// One embedded migration file.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The first line of a migration that cannot run in a transaction (`CREATE INDEX
/// CONCURRENTLY`, which does not block appends). Its statements, one per `;` at a line's
/// end, run one by one; each must be safe to run again, as an interrupted migration is run
/// again from its start. It is recorded applied only once all have run.
pub const NO_TRANSACTION: &str = "-- amplog:no-transaction";

impl Migration {
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }

    pub fn in_transaction(&self) -> bool {
        !self.sql.starts_with(NO_TRANSACTION)
    }

    /// The statements of a migration run outside a transaction.
    fn statements(&self) -> impl Iterator<Item = String> + '_ {
        let mut statement = String::new();
        self.sql.lines().filter_map(move |line| {
            if line.trim_start().starts_with("--") {
                return None;
            }
            statement.push_str(line);
            statement.push('\n');
            line.trim_end().ends_with(';').then(|| std::mem::take(&mut statement))
        })
    }
}

/// Migrations rewritten after release to the same schema by a path that does not block
/// (`CONCURRENTLY`): a database that applied the first text (its checksum here) is current.
/// Any other change to a released file is refused.
pub const REWRITTEN: &[(i32, &str)] = &[
    (4, "f9f1c18784b5b33528ef5435a525ba078e88b5e2061e12a8c54491e9b6bcc2e5"),
    (7, "639d7c5045c6278ad2608fb0af205532a81b377c71d3af5c4f1009a8fb21e654"),
];

/// Every migration, in order. Files are append-only: never edit one that was released.
pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "event_log", sql: include_str!("../sql/0001_event_log.sql") },
    Migration { version: 2, name: "read_models", sql: include_str!("../sql/0002_read_models.sql") },
    Migration { version: 3, name: "api", sql: include_str!("../sql/0003_api.sql") },
    Migration {
        version: 4,
        name: "operations_by_installation",
        sql: include_str!("../sql/0004_operations_by_installation.sql"),
    },
    Migration { version: 5, name: "dead_letters", sql: include_str!("../sql/0005_dead_letters.sql") },
    Migration { version: 6, name: "destinations", sql: include_str!("../sql/0006_destinations.sql") },
    Migration { version: 7, name: "events_by_position", sql: include_str!("../sql/0007_events_by_position.sql") },
    Migration { version: 8, name: "destinations_disabled", sql: include_str!("../sql/0008_destinations_disabled.sql") },
    Migration {
        version: 9,
        name: "events_by_stream_log_order",
        sql: include_str!("../sql/0009_events_by_stream_log_order.sql"),
    },
    Migration { version: 10, name: "events_configuration", sql: include_str!("../sql/0010_events_configuration.sql") },
    Migration { version: 11, name: "jwt_keys", sql: include_str!("../sql/0011_jwt_keys.sql") },
    Migration { version: 12, name: "admin_keys", sql: include_str!("../sql/0012_admin_keys.sql") },
    Migration {
        version: 13,
        name: "operations_dead_lettered",
        sql: include_str!("../sql/0013_operations_dead_lettered.sql"),
    },
    Migration { version: 14, name: "notifications", sql: include_str!("../sql/0014_notifications.sql") },
    Migration { version: 15, name: "changes", sql: include_str!("../sql/0015_changes.sql") },
];

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("database error while migrating: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration {version} ({name}) was changed after it was applied (checksum {applied} in the database, {embedded} embedded)")]
    Changed { version: i32, name: String, applied: String, embedded: String },
}

/// A digest of all embedded migrations: names a template database in tests.
pub fn schema_digest() -> String {
    let mut hasher = Sha256::new();
    for m in MIGRATIONS {
        hasher.update(m.checksum().as_bytes());
    }
    hex::encode(hasher.finalize())
}

const LOCK_KEY: i64 = 0x616d_706c_6f67_0001; // "amplog" + 1

/// Applies the migrations not yet applied; returns how many were. Safe to call from several
/// processes at once.
pub async fn migrate(conn: &mut PgConnection) -> Result<usize, MigrationError> {
    // Waited for between statements, not inside one: a session blocked in
    // `pg_advisory_lock` holds a snapshot, which `CREATE INDEX CONCURRENTLY` in the lock
    // holder's migration waits for (PostgreSQL reports the cycle as a deadlock).
    while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)").bind(LOCK_KEY).fetch_one(&mut *conn).await?
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let result = migrate_locked(conn).await;
    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)").bind(LOCK_KEY).execute(&mut *conn).await;
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn migrate_locked(conn: &mut PgConnection) -> Result<usize, MigrationError> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS amplog_migrations (
            version    integer PRIMARY KEY,
            name       text NOT NULL,
            checksum   text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut *conn)
    .await?;
    let rows =
        sqlx::query("SELECT version, checksum FROM amplog_migrations ORDER BY version").fetch_all(&mut *conn).await?;
    let mut applied = std::collections::BTreeMap::new();
    for row in rows {
        applied.insert(row.get::<i32, _>("version"), row.get::<String, _>("checksum"));
    }
    // A newer binary migrated first (a rolling upgrade, or a rollback of the code): its
    // migrations only add what this binary ignores (the rule every migration follows), so
    // this one runs on them.
    let newer: Vec<i32> = applied.keys().copied().filter(|v| !MIGRATIONS.iter().any(|m| m.version == *v)).collect();
    if !newer.is_empty() {
        tracing::warn!(?newer, "the database has migrations this binary does not know: a newer release applied them");
    }
    let mut count = 0;
    for migration in MIGRATIONS {
        if let Some(checksum) = applied.get(&migration.version) {
            if *checksum != migration.checksum() && !REWRITTEN.contains(&(migration.version, checksum.as_str())) {
                return Err(MigrationError::Changed {
                    version: migration.version,
                    name: migration.name.to_string(),
                    applied: checksum.clone(),
                    embedded: migration.checksum(),
                });
            }
            continue;
        }
        if !migration.in_transaction() {
            for statement in migration.statements() {
                sqlx::raw_sql(&statement).execute(&mut *conn).await?;
            }
        }
        let mut tx = conn.begin().await?;
        if migration.in_transaction() {
            sqlx::raw_sql(migration.sql).execute(&mut *tx).await?;
        }
        // A rewritten migration is recorded under its first text's checksum, which the
        // releases before the rewrite know: rolling the code back to one of them works.
        let recorded = REWRITTEN
            .iter()
            .find(|(version, _)| *version == migration.version)
            .map(|(_, first)| first.to_string())
            .unwrap_or_else(|| migration.checksum());
        sqlx::query("INSERT INTO amplog_migrations (version, name, checksum) VALUES ($1, $2, $3)")
            .bind(migration.version)
            .bind(migration.name)
            .bind(recorded)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version = migration.version, name = migration.name, "migration applied");
        count += 1;
    }
    Ok(count)
}

/// Whether every embedded migration is applied (for readiness checks), whatever newer
/// release's migrations are applied too.
pub async fn is_current(conn: &mut PgConnection) -> Result<bool, MigrationError> {
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass('amplog_migrations') IS NOT NULL").fetch_one(&mut *conn).await?;
    if !exists {
        return Ok(false);
    }
    // Every embedded one applied; a newer release's on top do not make this process unready.
    let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM amplog_migrations WHERE version = ANY($1)")
        .bind(&versions)
        .fetch_one(&mut *conn)
        .await?;
    Ok(count as usize == MIGRATIONS.len())
}

#[cfg(test)]
mod tests {
    /// Every file under `sql/` is embedded, in order, under its own number and name.
    #[test]
    fn every_sql_file_is_a_migration() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let embedded: Vec<String> =
            super::MIGRATIONS.iter().map(|m| format!("{:04}_{}.sql", m.version, m.name)).collect();
        assert_eq!(files, embedded);
    }

    /// An index on a table that already exists is built (and dropped) `CONCURRENTLY`, in a
    /// migration run outside a transaction: a plain `CREATE INDEX` holds a lock that stops
    /// every append (or projector write) for as long as the build takes on a large table.
    #[test]
    fn indexes_on_existing_tables_never_block_writes() {
        let mut offences = Vec::new();
        for m in super::MIGRATIONS {
            let sql: String = m
                .sql
                .lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
                .to_lowercase();
            let created: Vec<&str> = sql
                .split("create table ")
                .skip(1)
                .filter_map(|rest| rest.trim_start_matches("if not exists ").split([' ', '(']).next())
                .collect();
            for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                let words: Vec<&str> = statement.split_whitespace().collect();
                let is_index = matches!(words.as_slice(), ["create", "index", ..] | ["create", "unique", "index", ..]);
                let is_drop = matches!(words.as_slice(), ["drop", "index", ..]);
                if !is_index && !is_drop {
                    continue;
                }
                let table = words.iter().position(|w| *w == "on").and_then(|i| words.get(i + 1)).copied();
                let new_table = table.is_some_and(|t| created.contains(&t));
                let concurrent = words.contains(&"concurrently") && !m.in_transaction();
                if !new_table && !concurrent {
                    offences.push(format!("{:04}_{}: {statement}", m.version, m.name));
                }
            }
        }
        assert!(offences.is_empty(), "indexes built or dropped while blocking writes:\n{}", offences.join("\n"));
    }
}
