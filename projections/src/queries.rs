//! Every read-model query the other crates run: typed functions over the documents of
//! `docs.rs`. The API's take the project (tenancy's first line) and run on the caller's
//! connection (the request's tenant transaction: its second line); the scheduler's and the
//! worker's run on the service's pool. No other crate names a read-model table or a
//! document's field in SQL.

use crate::docs::*;
use crate::ProjectionError;
use serde::de::DeserializeOwned;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// A document type and the table that stores it by key.
pub trait Document: DeserializeOwned {
    const TABLE: &'static str;
}

impl Document for IntegrationDoc {
    const TABLE: &'static str = "integrations";
}
impl Document for InstallationDoc {
    const TABLE: &'static str = "installations";
}
impl Document for ConnectionDoc {
    const TABLE: &'static str = "connections";
}
impl Document for OperationDoc {
    const TABLE: &'static str = "operations";
}

fn decode<D: DeserializeOwned>(row: &PgRow) -> Result<D, ProjectionError> {
    let doc: &str = row.try_get("doc")?;
    serde_json::from_str(doc).map_err(|e| ProjectionError::Corrupt(e.to_string()))
}

/// The project's documents of one table by key.
pub async fn by_key<D: Document>(
    conn: &mut PgConnection,
    project: Uuid,
    keys: &[String],
) -> Result<HashMap<String, D>, ProjectionError> {
    let sql = format!("SELECT key, doc::text AS doc FROM {} WHERE project_id = $1 AND key = ANY($2)", D::TABLE);
    let rows = sqlx::query(&sql).bind(project).bind(keys).fetch_all(conn).await?;
    rows.iter().map(|r| Ok((r.try_get::<String, _>("key")?, decode(r)?))).collect()
}

/// One document by id.
pub async fn by_id<D: Document>(
    conn: &mut PgConnection,
    project: Uuid,
    id: Uuid,
) -> Result<Option<D>, ProjectionError> {
    Ok(by_key(conn, project, &[id.to_string()]).await?.into_values().next())
}

/// The project's integrations, by name.
pub async fn integrations(conn: &mut PgConnection, project: Uuid) -> Result<Vec<IntegrationDoc>, ProjectionError> {
    let rows = sqlx::query("SELECT doc::text AS doc FROM integrations WHERE project_id = $1 ORDER BY name, key")
        .bind(project)
        .fetch_all(conn)
        .await?;
    rows.iter().map(decode).collect()
}

/// A page of installations by key, after or before a key, filtered.
#[derive(Clone, Debug, Default)]
pub struct InstallationQuery<'a> {
    pub after: Option<Uuid>,
    pub before: Option<Uuid>,
    pub integration_id: Option<Uuid>,
    pub group_ref: Option<&'a str>,
    pub health: Option<&'a str>,
    pub paused: Option<bool>,
    pub include_deleted: bool,
    /// Newest keys first (a page read backwards).
    pub backwards: bool,
    pub limit: i64,
}

/// The installations a query selects, with their keys, in key order (descending when
/// `backwards`).
pub async fn installations(
    conn: &mut PgConnection,
    project: Uuid,
    q: &InstallationQuery<'_>,
) -> Result<Vec<(String, InstallationDoc)>, ProjectionError> {
    let sql = format!(
        "SELECT key, doc::text AS doc FROM installations
         WHERE project_id = $1
           AND ($2::text IS NULL OR key > $2) AND ($3::text IS NULL OR key < $3)
           AND ($4::text IS NULL OR integration_id = $4) AND ($5::text IS NULL OR group_ref = $5)
           AND ($6::text IS NULL OR health = $6) AND ($7::boolean IS NULL OR paused = $7)
           AND ($8 OR (doc->>'deleted')::boolean IS NOT TRUE)
         ORDER BY key {} LIMIT $9",
        if q.backwards { "DESC" } else { "ASC" }
    );
    let rows = sqlx::query(&sql)
        .bind(project)
        .bind(q.after.map(|a| a.to_string()))
        .bind(q.before.map(|b| b.to_string()))
        .bind(q.integration_id.map(|i| i.to_string()))
        .bind(q.group_ref)
        .bind(q.health)
        .bind(q.paused)
        .bind(q.include_deleted)
        .bind(q.limit)
        .fetch_all(conn)
        .await?;
    rows.iter().map(|r| Ok((r.try_get::<String, _>("key")?, decode(r)?))).collect()
}

/// A page of operations, newest first, filtered.
#[derive(Clone, Debug, Default)]
pub struct OperationQuery<'a> {
    pub installation: Option<Uuid>,
    pub status: Option<&'a str>,
    pub op_type: Option<&'a str>,
    /// Operations older than this one.
    pub after: Option<Uuid>,
    pub limit: i64,
}

pub async fn operations(
    conn: &mut PgConnection,
    project: Uuid,
    q: &OperationQuery<'_>,
) -> Result<Vec<OperationDoc>, ProjectionError> {
    let rows = sqlx::query(
        "SELECT key, doc::text AS doc FROM operations
         WHERE project_id = $1 AND ($2::text IS NULL OR installation_id = $2)
           AND ($3::text IS NULL OR status = $3) AND ($4::text IS NULL OR op_type = $4)
           AND ($5::text IS NULL OR key < $5)
         ORDER BY key DESC LIMIT $6",
    )
    .bind(project)
    .bind(q.installation.map(|i| i.to_string()))
    .bind(q.status)
    .bind(q.op_type)
    .bind(q.after.map(|a| a.to_string()))
    .bind(q.limit)
    .fetch_all(conn)
    .await?;
    rows.iter().map(decode).collect()
}

/// A page of dead letters (operations that failed after all their attempts), newest first.
pub async fn dead_letters(
    conn: &mut PgConnection,
    project: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<OperationDoc>, ProjectionError> {
    let rows = sqlx::query(
        "SELECT key, doc::text AS doc FROM operations
         WHERE project_id = $1 AND status = 'failed' AND (doc->>'dead_lettered')::boolean
           AND ($2::text IS NULL OR key < $2)
         ORDER BY key DESC LIMIT $3",
    )
    .bind(project)
    .bind(after.map(|a| a.to_string()))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter().map(decode).collect()
}

/// One page of operations per installation (each `(installation, after)`), newest first,
/// in one query: `(installation, operation)` pairs.
pub async fn operations_per_installation(
    conn: &mut PgConnection,
    project: Uuid,
    pages: &[(Uuid, Option<Uuid>)],
    status: Option<&str>,
    op_type: Option<&str>,
    limit: i64,
) -> Result<Vec<(String, OperationDoc)>, ProjectionError> {
    let installations: Vec<String> = pages.iter().map(|(i, _)| i.to_string()).collect();
    let afters: Vec<Option<String>> = pages.iter().map(|(_, a)| a.map(|a| a.to_string())).collect();
    let rows = sqlx::query(
        "SELECT k.i AS installation, o.doc::text AS doc
         FROM UNNEST($2::text[], $3::text[]) AS k(i, after)
         CROSS JOIN LATERAL (
             SELECT key, doc FROM operations
             WHERE project_id = $1 AND installation_id = k.i AND (k.after IS NULL OR key < k.after)
               AND ($4::text IS NULL OR status = $4) AND ($5::text IS NULL OR op_type = $5)
             ORDER BY key DESC LIMIT $6) AS o
         ORDER BY k.i, o.key DESC",
    )
    .bind(project)
    .bind(&installations)
    .bind(&afters)
    .bind(status)
    .bind(op_type)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter().map(|r| Ok((r.try_get::<String, _>("installation")?, decode(r)?))).collect()
}

/// Every operation of an installation, oldest first.
pub async fn operations_of(
    conn: &mut PgConnection,
    project: Uuid,
    installation: Uuid,
) -> Result<Vec<OperationDoc>, ProjectionError> {
    let rows = sqlx::query(
        "SELECT doc::text AS doc FROM operations WHERE project_id = $1 AND installation_id = $2 ORDER BY key",
    )
    .bind(project)
    .bind(installation.to_string())
    .fetch_all(conn)
    .await?;
    rows.iter().map(decode).collect()
}

/// The read states of some installations, by key.
pub async fn read_states_of(
    conn: &mut PgConnection,
    project: Uuid,
    installations: &[String],
) -> Result<Vec<ReadStateDoc>, ProjectionError> {
    let rows = sqlx::query(
        "SELECT doc::text AS doc FROM read_states WHERE project_id = $1 AND installation_id = ANY($2) ORDER BY key",
    )
    .bind(project)
    .bind(installations)
    .fetch_all(conn)
    .await?;
    rows.iter().map(decode).collect()
}

/// Usage days in `[from, to]` (ISO dates), of some installations or of the whole project,
/// by day, at most `limit`.
pub async fn usage_days(
    conn: &mut PgConnection,
    project: Uuid,
    installations: Option<&[String]>,
    from: Option<&str>,
    to: Option<&str>,
    limit: i64,
) -> Result<Vec<UsageDoc>, ProjectionError> {
    let rows = sqlx::query(
        "SELECT doc::text AS doc FROM usage_daily
         WHERE project_id = $1 AND ($2::text[] IS NULL OR installation_id = ANY($2))
           AND ($3::text IS NULL OR day >= $3) AND ($4::text IS NULL OR day <= $4)
         ORDER BY day, key LIMIT $5",
    )
    .bind(project)
    .bind(installations)
    .bind(from)
    .bind(to)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter().map(decode).collect()
}

/// The watermark of an installation's object: where its next incremental read starts.
pub async fn read_watermark(
    pool: &PgPool,
    project: Uuid,
    installation: Uuid,
    object: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ProjectionError> {
    let doc: Option<sqlx::types::Json<ReadStateDoc>> =
        sqlx::query_scalar("SELECT doc FROM read_states WHERE key = $1 AND project_id = $2")
            .bind(format!("{installation}/{object}"))
            .bind(project)
            .fetch_optional(pool)
            .await?;
    Ok(doc.and_then(|d| d.0.watermark))
}

/// What the scheduler decides from, across every project: the installations it may read
/// (not paused, not deleted, not waiting for re-authentication), the read states that
/// exist (`{installation}/{object}`), and the reads still open (installation, object).
pub struct Schedulable {
    pub installations: Vec<InstallationDoc>,
    pub read_states: HashSet<String>,
    pub open_reads: HashSet<(Uuid, String)>,
}

pub async fn schedulable(pool: &PgPool) -> Result<Schedulable, ProjectionError> {
    let installations: Vec<sqlx::types::Json<InstallationDoc>> = sqlx::query_scalar(
        "SELECT doc FROM installations
         WHERE NOT paused AND NOT (doc->>'deleted')::boolean AND health <> 'needs_reauth'",
    )
    .fetch_all(pool)
    .await?;
    let read_states = sqlx::query_scalar("SELECT key FROM read_states").fetch_all(pool).await?.into_iter().collect();
    let open: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT installation_id, doc->>'object' FROM operations
         WHERE op_type = 'read' AND status IN ('pending', 'running')",
    )
    .fetch_all(pool)
    .await?;
    let open_reads =
        open.into_iter().filter_map(|(i, o)| Some((i.parse().ok()?, o?))).collect::<HashSet<(Uuid, String)>>();
    Ok(Schedulable { installations: installations.into_iter().map(|d| d.0).collect(), read_states, open_reads })
}
