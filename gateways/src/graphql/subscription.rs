//! `operationUpdates(installationId)`: every change of the installation's operations as the
//! read models show it. Woken by the projector's NOTIFY after each batch (a one-second poll
//! covers a lost notification); each poll is a short tenant-scoped transaction.

use super::loaders::decode;
use super::principal;
use super::query::require_installation;
use super::types::Operation;
use crate::server::AppState;
use crate::tenant::TenantDb;
use amplog_projections::docs::OperationDoc;
use async_graphql::{Context, Result, Subscription};
use futures::{Stream, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub struct Subscription;

struct Watch {
    app: Arc<AppState>,
    db: TenantDb,
    installation: Uuid,
    seen: HashMap<Uuid, i64>,
    wake: tokio::sync::broadcast::Receiver<()>,
}

impl Watch {
    async fn operations(&self) -> Result<Vec<OperationDoc>, crate::error::ApiError> {
        let rows = sqlx::query(
            "SELECT doc::text AS doc FROM operations WHERE project_id = $1 AND installation_id = $2 ORDER BY key",
        )
        .bind(self.db.project.0)
        .bind(self.installation.to_string())
        .fetch_all(&mut *self.db.conn().await?)
        .await?;
        let docs = rows.iter().map(decode::<OperationDoc>).collect();
        self.db.release().await;
        docs
    }

    /// Waits for the next change and returns the operations that changed.
    async fn next_changes(&mut self) -> Option<Vec<Operation>> {
        loop {
            let mut shutdown = self.app.shutdown.clone();
            tokio::select! {
                _ = crate::server::stopped(&mut shutdown) => return None,
                _ = self.wake.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match self.operations().await {
                Ok(docs) => {
                    let changed: Vec<Operation> = docs
                        .into_iter()
                        .filter(|d| self.seen.insert(d.operation_id, d.version) != Some(d.version))
                        .map(Into::into)
                        .collect();
                    if !changed.is_empty() {
                        return Some(changed);
                    }
                }
                Err(error) => tracing::warn!(%error, "operationUpdates: poll failed; retrying"),
            }
        }
    }
}

#[Subscription]
impl Subscription {
    /// Each operation of the installation whenever it changes (requested, started, a page
    /// recorded, finished, ...), from the moment of subscribing.
    async fn operation_updates(
        &self,
        ctx: &Context<'_>,
        installation_id: Uuid,
    ) -> Result<impl Stream<Item = Operation> + use<>> {
        let app: Arc<AppState> = ctx.data_unchecked::<Arc<AppState>>().clone();
        let db = TenantDb::new(app.service.pool().clone(), principal(ctx).project_id, app.config.statement_timeout_ms);
        require_installation(&db, installation_id).await?;
        let wake = app.projected.subscribe();
        let mut watch = Watch { app, db, installation: installation_id, seen: HashMap::new(), wake };
        for doc in watch.operations().await? {
            watch.seen.insert(doc.operation_id, doc.version);
        }
        Ok(futures::stream::unfold(watch, |mut watch| async move {
            let changed = watch.next_changes().await?;
            Some((futures::stream::iter(changed), watch))
        })
        .flatten())
    }
}
