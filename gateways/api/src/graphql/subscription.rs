//! `operationUpdates(installationId)`: every change of the installation's operations as the
//! read models show it. One feed per installation re-reads its operations when a projector
//! batch commits (`NOTIFY`; a one-second poll covers a lost notification), in a short
//! tenant-scoped transaction, and every subscriber to that installation shares it: a
//! thousand subscribers cost one read per change, not a thousand.

use super::principal;
use super::query::require_installation;
use super::types::Operation;
use crate::error::ApiError;
use crate::state::{stopped, AppState, FeedMap, Feeds, Snapshot};
use crate::tenant::TenantDb;
use amplog_domain::ProjectId;
use amplog_projections::docs::OperationDoc;
use async_graphql::{Context, Result, Subscription};
use futures::{Stream, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

pub struct Subscription;

impl Feeds {
    /// A receiver of the installation's feed, starting the feed (with a first read) when
    /// none runs.
    async fn subscribe(
        &self,
        app: &Arc<AppState>,
        project: ProjectId,
        installation: Uuid,
    ) -> Result<watch::Receiver<Snapshot>, ApiError> {
        if let Some(feed) = self.lock().get(&(project, installation)) {
            return Ok(feed.subscribe());
        }
        let db = TenantDb::new(app.service.pool().clone(), project, app.config.statement_timeout_ms);
        let first = read(&db, installation).await?;
        let mut feeds = self.lock();
        if let Some(feed) = feeds.get(&(project, installation)) {
            return Ok(feed.subscribe()); // another subscriber started it meanwhile
        }
        let (feed, receiver) = watch::channel(Arc::new(first));
        let feed = Arc::new(feed);
        feeds.insert((project, installation), feed.clone());
        tokio::spawn(run_feed(app.clone(), db, installation, feed));
        Ok(receiver)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FeedMap> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn read(db: &TenantDb, installation: Uuid) -> Result<Vec<OperationDoc>, ApiError> {
    let docs = amplog_projections::queries::operations_of(&mut *db.conn().await?, db.project.0, installation).await;
    db.release().await;
    Ok(docs?)
}

/// Re-reads on each projector batch (or every second) and publishes what changed, until
/// the last subscriber has gone (checked under the feeds' lock, so none joins a feed that
/// is ending) or the server stops.
async fn run_feed(app: Arc<AppState>, db: TenantDb, installation: Uuid, feed: Arc<watch::Sender<Snapshot>>) {
    let key = (db.project, installation);
    let mut wake = app.projected.subscribe();
    let mut shutdown = app.shutdown.clone();
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => break,
            _ = wake.recv() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        {
            let mut feeds = app.feeds.lock();
            if feed.receiver_count() == 0 {
                feeds.remove(&key);
                return;
            }
        }
        match read(&db, installation).await {
            Ok(docs) => {
                let versions =
                    |docs: &[OperationDoc]| docs.iter().map(|d| (d.operation_id, d.version)).collect::<Vec<_>>();
                feed.send_if_modified(|current| {
                    let changed = versions(current) != versions(&docs);
                    if changed {
                        *current = Arc::new(docs);
                    }
                    changed
                });
            }
            Err(error) => tracing::warn!(%error, "operationUpdates: reading the operations failed; retrying"),
        }
    }
    app.feeds.lock().remove(&key);
}

/// One subscriber: the versions it has seen, the changes since.
struct Watch {
    feed: watch::Receiver<Snapshot>,
    seen: HashMap<Uuid, i64>,
}

impl Watch {
    /// Waits for the feed to change and returns the operations changed since last seen.
    async fn next_changes(&mut self) -> Option<Vec<Operation>> {
        loop {
            self.feed.changed().await.ok()?;
            let snapshot = self.feed.borrow_and_update().clone();
            let changed: Vec<Operation> = snapshot
                .iter()
                .filter(|d| self.seen.insert(d.operation_id, d.version) != Some(d.version))
                .cloned()
                .map(Into::into)
                .collect();
            if !changed.is_empty() {
                return Some(changed);
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
        let project = principal(ctx).project_id;
        let db = TenantDb::new(app.service.pool().clone(), project, app.config.statement_timeout_ms)
            .with_group(principal(ctx).group.clone());
        require_installation(&db, installation_id).await?;
        db.release().await;
        let mut feed = app.feeds.subscribe(&app, project, installation_id).await?;
        let seen = feed.borrow_and_update().iter().map(|d| (d.operation_id, d.version)).collect();
        let watch = Watch { feed, seen };
        Ok(futures::stream::unfold(watch, |mut watch| async move {
            let changed = watch.next_changes().await?;
            Some((futures::stream::iter(changed), watch))
        })
        .flatten())
    }
}
