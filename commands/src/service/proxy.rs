//! Proxy calls' records, group-committed: the records of concurrent calls share one
//! transaction (one append statement per project and actor), so the log costs the proxy one
//! commit per batch, not one per call. A caller waits for its record's commit.

use super::*;
use amplog_domain::operation::ProxyCall;
use tokio::sync::{mpsc, oneshot};

/// Records taken into one transaction at most.
const BATCH_MAX: usize = 256;

/// One finished call to record, and who waits for its commit.
struct Pending {
    project_id: ProjectId,
    actor: String,
    stream: PendingStream,
    done: oneshot::Sender<Result<(), CommandError>>,
}

/// The batcher's queue (started on first use; it ends with the last `CommandService`).
#[derive(Default)]
pub(super) struct ProxyRecorder(std::sync::OnceLock<mpsc::Sender<Pending>>);

impl CommandService {
    /// Records a proxy call that is over as operation `operation_id` (new), committed with
    /// the calls recorded at the same time. Returns once it is committed.
    pub async fn record_proxy_call(
        &self,
        ctx: &CommandContext,
        operation_id: OperationId,
        installation_id: InstallationId,
        connection_id: ConnectionId,
        call: &ProxyCall,
    ) -> Result<(), CommandError> {
        let fresh =
            Loaded::<Operation> { id: operation_id.to_string(), state: Operation::default(), sequence: 0, hash: None };
        let command = OperationCommand::RecordProxyCall {
            project_id: ctx.project_id,
            installation_id,
            connection_id,
            call: call.clone(),
            at: Utc::now(),
        };
        let stream = self.store.decide(&fresh, std::slice::from_ref(&command))?;
        let queue = self.proxy.0.get_or_init(|| {
            let (send, receive) = mpsc::channel(4 * BATCH_MAX);
            tokio::spawn(record_batches(self.pool.clone(), self.store.clone(), self.wake.clone(), receive));
            send
        });
        let (done, committed) = oneshot::channel();
        let pending = Pending { project_id: ctx.project_id, actor: ctx.actor.clone(), stream, done };
        queue.send(pending).await.map_err(|_| CommandError::Invalid("the command service is stopping".into()))?;
        committed.await.map_err(|_| CommandError::Invalid("the proxy recorder stopped".into()))?
    }
}

/// Takes what is queued (at most `BATCH_MAX`) and commits it in one transaction; when that
/// fails, each record alone, so one bad record fails only its own call.
async fn record_batches(pool: PgPool, store: EventStore, wake: Arc<Notify>, mut queue: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    while queue.recv_many(&mut batch, BATCH_MAX).await > 0 {
        let all: Vec<&Pending> = batch.iter().collect();
        let result = commit_batch(&pool, &store, &all).await;
        let failed = result.is_err();
        if failed && batch.len() > 1 {
            tracing::warn!(records = batch.len(), "a batch of proxy records failed; recording them one by one");
            for pending in batch.drain(..) {
                let result = commit_batch(&pool, &store, &[&pending]).await;
                let _ = pending.done.send(result);
            }
        } else {
            for pending in batch.drain(..) {
                let result = match &result {
                    Ok(()) => Ok(()),
                    Err(error) => Err(CommandError::Invalid(format!("recording the proxy call failed: {error}"))),
                };
                let _ = pending.done.send(result);
            }
        }
        if !failed {
            wake.notify_one();
        }
    }
}

async fn commit_batch(pool: &PgPool, store: &EventStore, batch: &[&Pending]) -> Result<(), CommandError> {
    let mut groups: BTreeMap<(ProjectId, &str), Vec<PendingStream>> = BTreeMap::new();
    for pending in batch {
        groups.entry((pending.project_id, pending.actor.as_str())).or_default().push(pending.stream.clone());
    }
    let mut tx = amplog_log::tx::begin(pool).await?;
    let mut appended = Vec::new();
    for ((project, actor), streams) in &groups {
        let metadata = serde_json::json!({ "actor": actor, "command": "operation.record_proxy_call" }).to_string();
        let events = store.append(&mut tx, project.0, &metadata, streams).await?;
        appended.push((streams, events));
    }
    tx.commit().await?;
    for (streams, events) in &appended {
        store.committed(streams, events);
    }
    Ok(())
}
