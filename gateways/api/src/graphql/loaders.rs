//! Read-model access for resolvers: one DataLoader per request batches what nested fields
//! ask for (an installation list's connections, operations, read states, ...) into one
//! query per kind, so a page of N installations costs a fixed number of queries, not N.
//! Every query names the project (first line of tenancy) and runs in the request's
//! `TenantDb` (second line).

use crate::error::ApiError;
use crate::tenant::TenantDb;
use amplog_projections::docs::*;
use async_graphql::dataloader::Loader;
use serde::de::DeserializeOwned;
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

pub fn decode<D: DeserializeOwned>(row: &PgRow) -> Result<D, ApiError> {
    let doc: String = row.get("doc");
    serde_json::from_str(&doc).map_err(|e| ApiError::from(amplog_projections::ProjectionError::Corrupt(e.to_string())))
}

/// Documents of `table` by key, for the request's project.
pub async fn docs_by_key<D: DeserializeOwned>(
    db: &TenantDb,
    table: &'static str,
    keys: &[String],
) -> Result<HashMap<String, D>, ApiError> {
    let sql = format!("SELECT key, doc::text AS doc FROM {table} WHERE project_id = $1 AND key = ANY($2)");
    let rows = sqlx::query(&sql).bind(db.project.0).bind(keys).fetch_all(&mut *db.conn().await?).await?;
    rows.iter().map(|r| Ok((r.get::<String, _>("key"), decode(r)?))).collect()
}

pub async fn doc_by_id<D: DeserializeOwned>(
    db: &TenantDb,
    table: &'static str,
    id: Uuid,
) -> Result<Option<D>, ApiError> {
    Ok(docs_by_key(db, table, &[id.to_string()]).await?.into_values().next())
}

pub struct Loaders {
    pub db: Arc<TenantDb>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionKey(pub Uuid);
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IntegrationKey(pub Uuid);
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReadStatesKey(pub Uuid);

/// One page of an installation's operations, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OperationsKey {
    pub installation: Uuid,
    pub after: Option<Uuid>,
    pub first: i64,
    pub status: Option<String>,
    pub op_type: Option<String>,
}

/// An installation's usage days in `[from, to]` (ISO dates).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UsageKey {
    pub installation: Uuid,
    pub from: Option<String>,
    pub to: Option<String>,
}

impl Loader<ConnectionKey> for Loaders {
    type Value = ConnectionDoc;
    type Error = ApiError;

    async fn load(&self, keys: &[ConnectionKey]) -> Result<HashMap<ConnectionKey, ConnectionDoc>, Self::Error> {
        let ids: Vec<String> = keys.iter().map(|k| k.0.to_string()).collect();
        let docs: HashMap<String, ConnectionDoc> = docs_by_key(&self.db, "connections", &ids).await?;
        Ok(docs.into_values().map(|d| (ConnectionKey(d.connection_id), d)).collect())
    }
}

impl Loader<IntegrationKey> for Loaders {
    type Value = IntegrationDoc;
    type Error = ApiError;

    async fn load(&self, keys: &[IntegrationKey]) -> Result<HashMap<IntegrationKey, IntegrationDoc>, Self::Error> {
        let ids: Vec<String> = keys.iter().map(|k| k.0.to_string()).collect();
        let docs: HashMap<String, IntegrationDoc> = docs_by_key(&self.db, "integrations", &ids).await?;
        Ok(docs.into_values().map(|d| (IntegrationKey(d.integration_id), d)).collect())
    }
}

impl Loader<ReadStatesKey> for Loaders {
    type Value = Vec<ReadStateDoc>;
    type Error = ApiError;

    async fn load(&self, keys: &[ReadStatesKey]) -> Result<HashMap<ReadStatesKey, Vec<ReadStateDoc>>, Self::Error> {
        let ids: Vec<String> = keys.iter().map(|k| k.0.to_string()).collect();
        let rows = sqlx::query(
            "SELECT doc::text AS doc FROM read_states WHERE project_id = $1 AND installation_id = ANY($2) ORDER BY key",
        )
        .bind(self.db.project.0)
        .bind(&ids)
        .fetch_all(&mut *self.db.conn().await?)
        .await?;
        let mut out: HashMap<ReadStatesKey, Vec<ReadStateDoc>> = keys.iter().map(|k| (*k, Vec::new())).collect();
        for row in &rows {
            let doc: ReadStateDoc = decode(row)?;
            out.entry(ReadStatesKey(doc.installation_id)).or_default().push(doc);
        }
        Ok(out)
    }
}

impl Loader<OperationsKey> for Loaders {
    /// The page (at most `first`) and whether more follow.
    type Value = (Vec<OperationDoc>, bool);
    type Error = ApiError;

    async fn load(&self, keys: &[OperationsKey]) -> Result<HashMap<OperationsKey, Self::Value>, Self::Error> {
        // One query per distinct (first, status, type); each key's page by a LATERAL join.
        type Filter = (i64, Option<String>, Option<String>);
        let mut groups: HashMap<Filter, Vec<&OperationsKey>> = HashMap::new();
        for key in keys {
            groups.entry((key.first, key.status.clone(), key.op_type.clone())).or_default().push(key);
        }
        let mut out = HashMap::new();
        for ((first, status, op_type), group) in groups {
            let installations: Vec<String> = group.iter().map(|k| k.installation.to_string()).collect();
            let afters: Vec<Option<String>> = group.iter().map(|k| k.after.map(|a| a.to_string())).collect();
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
            .bind(self.db.project.0)
            .bind(&installations)
            .bind(&afters)
            .bind(&status)
            .bind(&op_type)
            .bind(first + 1)
            .fetch_all(&mut *self.db.conn().await?)
            .await?;
            let mut pages: HashMap<String, Vec<OperationDoc>> = HashMap::new();
            for row in &rows {
                pages.entry(row.get("installation")).or_default().push(decode(row)?);
            }
            for key in group {
                let mut page = pages.remove(&key.installation.to_string()).unwrap_or_default();
                let more = page.len() as i64 > first;
                page.truncate(first as usize);
                out.insert(key.clone(), (page, more));
            }
        }
        Ok(out)
    }
}

impl Loader<UsageKey> for Loaders {
    type Value = Vec<UsageDoc>;
    type Error = ApiError;

    async fn load(&self, keys: &[UsageKey]) -> Result<HashMap<UsageKey, Vec<UsageDoc>>, Self::Error> {
        let mut groups: HashMap<(Option<String>, Option<String>), Vec<&UsageKey>> = HashMap::new();
        for key in keys {
            groups.entry((key.from.clone(), key.to.clone())).or_default().push(key);
        }
        let mut out = HashMap::new();
        for ((from, to), group) in groups {
            let ids: Vec<String> = group.iter().map(|k| k.installation.to_string()).collect();
            let rows = sqlx::query(
                "SELECT doc::text AS doc FROM usage_daily
                 WHERE project_id = $1 AND installation_id = ANY($2)
                   AND ($3::text IS NULL OR day >= $3) AND ($4::text IS NULL OR day <= $4)
                 ORDER BY day, key",
            )
            .bind(self.db.project.0)
            .bind(&ids)
            .bind(&from)
            .bind(&to)
            .fetch_all(&mut *self.db.conn().await?)
            .await?;
            let mut by_installation: HashMap<Uuid, Vec<UsageDoc>> = HashMap::new();
            for row in &rows {
                let doc: UsageDoc = decode(row)?;
                by_installation.entry(doc.installation_id).or_default().push(doc);
            }
            for key in group {
                out.insert(key.clone(), by_installation.remove(&key.installation).unwrap_or_default());
            }
        }
        Ok(out)
    }
}
