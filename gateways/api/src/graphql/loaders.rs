//! Read-model access for resolvers (the queries are `amplog_projections::queries`): one DataLoader per request batches what nested fields
//! ask for (an installation list's connections, operations, read states, ...) into one
//! query per kind, so a page of N installations costs a fixed number of queries, not N.
//! Every query names the project (first line of tenancy) and runs in the request's
//! `TenantDb` (second line).

use crate::error::ApiError;
use crate::tenant::TenantDb;
use amplog_projections::docs::*;
use amplog_projections::queries;
use async_graphql::dataloader::Loader;
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

/// One document by id, in the request's project.
pub async fn doc_by_id<D: queries::Document>(db: &TenantDb, id: Uuid) -> Result<Option<D>, ApiError> {
    Ok(queries::by_id(&mut *db.conn().await?, db.project.0, id).await?)
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
        let docs: HashMap<String, ConnectionDoc> =
            queries::by_key(&mut *self.db.conn().await?, self.db.project.0, &ids).await?;
        Ok(docs.into_values().map(|d| (ConnectionKey(d.connection_id), d)).collect())
    }
}

impl Loader<IntegrationKey> for Loaders {
    type Value = IntegrationDoc;
    type Error = ApiError;

    async fn load(&self, keys: &[IntegrationKey]) -> Result<HashMap<IntegrationKey, IntegrationDoc>, Self::Error> {
        let ids: Vec<String> = keys.iter().map(|k| k.0.to_string()).collect();
        let docs: HashMap<String, IntegrationDoc> =
            queries::by_key(&mut *self.db.conn().await?, self.db.project.0, &ids).await?;
        Ok(docs.into_values().map(|d| (IntegrationKey(d.integration_id), d)).collect())
    }
}

impl Loader<ReadStatesKey> for Loaders {
    type Value = Vec<ReadStateDoc>;
    type Error = ApiError;

    async fn load(&self, keys: &[ReadStatesKey]) -> Result<HashMap<ReadStatesKey, Vec<ReadStateDoc>>, Self::Error> {
        let ids: Vec<String> = keys.iter().map(|k| k.0.to_string()).collect();
        let docs = queries::read_states_of(&mut *self.db.conn().await?, self.db.project.0, &ids).await?;
        let mut out: HashMap<ReadStatesKey, Vec<ReadStateDoc>> = keys.iter().map(|k| (*k, Vec::new())).collect();
        for doc in docs {
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
            let wanted: Vec<(Uuid, Option<Uuid>)> = group.iter().map(|k| (k.installation, k.after)).collect();
            let rows = queries::operations_per_installation(
                &mut *self.db.conn().await?,
                self.db.project.0,
                &wanted,
                status.as_deref(),
                op_type.as_deref(),
                first + 1,
            )
            .await?;
            let mut pages: HashMap<String, Vec<OperationDoc>> = HashMap::new();
            for (installation, doc) in rows {
                pages.entry(installation).or_default().push(doc);
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
            let docs = queries::usage_days(
                &mut *self.db.conn().await?,
                self.db.project.0,
                Some(&ids),
                from.as_deref(),
                to.as_deref(),
                i64::MAX,
            )
            .await?;
            let mut by_installation: HashMap<Uuid, Vec<UsageDoc>> = HashMap::new();
            for doc in docs {
                by_installation.entry(doc.installation_id).or_default().push(doc);
            }
            for key in group {
                out.insert(key.clone(), by_installation.remove(&key.installation).unwrap_or_default());
            }
        }
        Ok(out)
    }
}
