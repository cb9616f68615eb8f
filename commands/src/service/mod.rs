//! The command service: one method per command users can send. Each is atomic —
//! idempotency check, loads (tenant-scoped), pure decision, credential writes, one append
//! statement — in one transaction when it needs more than that one statement; then a
//! coalesced NOTIFY wakes log readers.

use crate::credentials::{CredentialStore, Secret};
use crate::error::CommandError;
use amplog_domain::connect_session::{ConnectSession, ConnectSessionCommand};
use amplog_domain::connection::{Connection, ConnectionCommand};
use amplog_domain::installation::{ConnectionFacts, Installation, InstallationCommand, IntegrationFacts, ObjectConfig};
use amplog_domain::integration::{Integration, IntegrationCommand, Manifest};
use amplog_domain::operation::{
    Cursor, DeliveryAttempt, ErrorClass, Operation, OperationCommand, OperationType, PageRecord, Trigger,
};
use amplog_domain::project::{Project, ProjectCommand};
use amplog_domain::provider_app::{ProviderApp, ProviderAppCommand};
use amplog_domain::*;
use amplog_log::store::{CommandOutcome, EventStore, Loaded, PendingStream};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::Notify;
use uuid::Uuid;

mod changes;
pub use changes::change_id;
mod connect;
pub use connect::{default_objects, AppSettings, ProviderClient};
mod connections;
mod installations;
mod integrations;
mod operations;
mod operators;
mod projects;
mod proxy;

fn manifest_digest(manifest: &Manifest) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(serde_json::to_vec(manifest).expect("manifests serialise"))))
}

/// The NOTIFY channel that wakes log readers after appends commit.
pub use amplog_log::EVENTS_CHANNEL;

/// Who sends a command, for which project, and how a retry is recognised.
#[derive(Clone, Debug)]
pub struct CommandContext {
    pub project_id: ProjectId,
    pub actor: String,
    pub idempotency_key: Option<String>,
    pub correlation_id: Option<Uuid>,
}

impl CommandContext {
    pub fn new(project_id: ProjectId, actor: impl Into<String>) -> Self {
        Self { project_id, actor: actor.into(), idempotency_key: None, correlation_id: None }
    }

    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// The write side. Cheap to clone.
#[derive(Clone)]
pub struct CommandService {
    pool: PgPool,
    store: EventStore,
    credentials: CredentialStore,
    wake: Arc<Notify>,
    before_commit: Option<Arc<dyn BeforeCommit>>,
    proxy: Arc<proxy::ProxyRecorder>,
}

/// Runs in a transactional command after its events are inserted and before COMMIT (the
/// tests' `CommitGate` holds commands there to keep an append open while others commit).
pub trait BeforeCommit: Send + Sync {
    fn before_commit(&self) -> futures::future::BoxFuture<'_, ()>;
}

/// Options of a new installation; unset objects default to every object of the revision.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NewInstallation {
    pub integration_id: IntegrationId,
    /// Defaults to the latest revision.
    pub revision: Option<u32>,
    pub group_ref: String,
    pub consumer_ref: String,
    pub connection_id: ConnectionId,
    pub objects: Option<BTreeMap<String, ObjectConfig>>,
}

/// A read, write or proxy request on an installation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewOperation {
    pub op_type: OperationType,
    pub object: String,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub trigger: Trigger,
}

/// The schedule an object gets when neither the installation nor the manifest sets one.
pub const DEFAULT_SCHEDULE: &str = "@every 1h";

/// A connection that becomes a transaction only when a command needs more than one
/// statement to be atomic (an idempotency key, a stored credential). Otherwise the append
/// is one statement, atomic on its own, and saves BEGIN and COMMIT.
enum Conn {
    Plain(PoolConnection<Postgres>),
    Tx(Transaction<'static, Postgres>),
    /// Only while turning `Plain` into `Tx`.
    Gone,
}

impl Conn {
    fn get(&mut self) -> &mut PgConnection {
        match self {
            Conn::Plain(conn) => conn,
            Conn::Tx(tx) => tx,
            Conn::Gone => unreachable!("a unit of work is not used after its BEGIN failed"),
        }
    }
}

struct UnitOfWork {
    conn: Conn,
    ctx: CommandContext,
    command: &'static str,
    streams: Vec<PendingStream>,
}

enum Begun {
    Fresh(UnitOfWork),
    Replayed(CommandOutcome),
}

impl CommandService {
    /// Builds the service and starts the task that turns commits into NOTIFYs.
    pub fn new(pool: PgPool, store: EventStore, credentials: CredentialStore) -> Self {
        let wake = Arc::new(Notify::new());
        tokio::spawn(notifier(pool.clone(), wake.clone()));
        Self { pool, store, credentials, wake, before_commit: None, proxy: Arc::default() }
    }

    /// Commands in a transaction run `hook` before they commit.
    pub fn with_before_commit(mut self, hook: Arc<dyn BeforeCommit>) -> Self {
        self.before_commit = Some(hook);
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    pub fn credentials(&self) -> &CredentialStore {
        &self.credentials
    }

    /// Loads a stream as the context's project sees it: another project's aggregate looks
    /// like one that does not exist.
    pub async fn load<A: Aggregate + Owned>(&self, ctx: &CommandContext, id: Uuid) -> Result<Loaded<A>, CommandError> {
        let mut conn = amplog_log::telemetry::metrics().waiting_for(self.pool.acquire()).await?;
        let loaded = self.store.load::<A>(&mut conn, &id.to_string()).await?;
        Ok(scoped(ctx, loaded))
    }

    /// Begins a command that an idempotency key cannot make safe to retry (what it returns
    /// holds a secret or an id made for it, which a replay could not give back): the key
    /// is ignored, and a retry is a new command.
    async fn begin_unkeyed(&self, ctx: &CommandContext, command: &'static str) -> Result<UnitOfWork, CommandError> {
        let ctx = CommandContext { idempotency_key: None, ..ctx.clone() };
        match self.begin(&ctx, command, &()).await? {
            Begun::Fresh(uow) => Ok(uow),
            Begun::Replayed(_) => unreachable!("no idempotency key, no replay"),
        }
    }

    async fn begin(
        &self,
        ctx: &CommandContext,
        command: &'static str,
        request: &impl Serialize,
    ) -> Result<Begun, CommandError> {
        let Some(key) = &ctx.idempotency_key else {
            let conn = Conn::Plain(amplog_log::telemetry::metrics().waiting_for(self.pool.acquire()).await?);
            return Ok(Begun::Fresh(UnitOfWork { conn, ctx: ctx.clone(), command, streams: Vec::new() }));
        };
        if key.is_empty() || key.len() > 255 {
            return Err(CommandError::Invalid("an idempotency key must be 1 to 255 characters".into()));
        }
        let mut conn = Conn::Tx(amplog_log::telemetry::metrics().waiting_for(amplog_log::tx::begin(&self.pool)).await?);
        {
            let tx = conn.get();
            let digest = request_digest(command, request);
            let inserted = sqlx::query_scalar::<_, i32>(
                "INSERT INTO idempotency_keys (project_id, key, request_digest, response)
                 VALUES ($1, $2, $3, 'null') ON CONFLICT DO NOTHING RETURNING 1",
            )
            .bind(ctx.project_id.0)
            .bind(key)
            .bind(&digest[..])
            .fetch_optional(&mut *tx)
            .await?;
            if inserted.is_none() {
                let (stored, response): (Vec<u8>, serde_json::Value) = sqlx::query_as(
                    "SELECT request_digest, response FROM idempotency_keys WHERE project_id = $1 AND key = $2",
                )
                .bind(ctx.project_id.0)
                .bind(key)
                .fetch_one(&mut *tx)
                .await?;
                if stored != digest {
                    return Err(CommandError::IdempotencyKeyReused(key.clone()));
                }
                let mut outcome: CommandOutcome =
                    serde_json::from_value(response).map_err(|e| CommandError::corrupt("idempotency response", e))?;
                outcome.replayed = true;
                return Ok(Begun::Replayed(outcome));
            }
        }
        Ok(Begun::Fresh(UnitOfWork { conn, ctx: ctx.clone(), command, streams: Vec::new() }))
    }

    /// Turns the unit of work into a transaction (if it is not one yet).
    async fn in_tx<'u>(&self, uow: &'u mut UnitOfWork) -> Result<&'u mut PgConnection, CommandError> {
        if let Conn::Plain(_) = uow.conn {
            let Conn::Plain(plain) = std::mem::replace(&mut uow.conn, Conn::Gone) else { unreachable!() };
            // BEGIN on the connection already held (sqlx's own `Pool::begin` does the same),
            // so a command never holds two pool connections at once.
            uow.conn = Conn::Tx(amplog_log::tx::begin_on(plain).await?);
        }
        Ok(uow.conn.get())
    }

    async fn load_in<A: Aggregate + Owned>(&self, uow: &mut UnitOfWork, id: Uuid) -> Result<Loaded<A>, CommandError> {
        let loaded = self.store.load::<A>(uow.conn.get(), &id.to_string()).await?;
        Ok(scoped(&uow.ctx, loaded))
    }

    fn decide<A: Aggregate>(
        &self,
        uow: &mut UnitOfWork,
        loaded: &Loaded<A>,
        command: &A::Command,
    ) -> Result<(), CommandError> {
        uow.streams.push(self.store.decide(loaded, std::slice::from_ref(command))?);
        Ok(())
    }

    /// Appends a command's events and commits, in an `append` span (its operation's and
    /// installation's ids as attributes) whose `traceparent` the events' metadata keeps, so
    /// the work they dispatch joins the trace.
    async fn commit(&self, uow: UnitOfWork) -> Result<CommandOutcome, CommandError> {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "append",
            command = uow.command,
            project.id = %uow.ctx.project_id.0,
            operation.id = tracing::field::Empty,
            installation.id = tracing::field::Empty,
            events = tracing::field::Empty,
        );
        for stream in &uow.streams {
            match stream.aggregate_type {
                "operation" => span.record("operation.id", stream.aggregate_id.as_str()),
                "installation" => span.record("installation.id", stream.aggregate_id.as_str()),
                _ => &span,
            };
        }
        self.commit_in_span(uow).instrument(span).await
    }

    async fn commit_in_span(&self, mut uow: UnitOfWork) -> Result<CommandOutcome, CommandError> {
        let mut metadata = serde_json::json!({
            "actor": uow.ctx.actor,
            "command": uow.command,
            "correlation_id": uow.ctx.correlation_id,
        });
        if let Some(traceparent) = amplog_log::telemetry::current_traceparent() {
            metadata["traceparent"] = traceparent.into();
        }
        let metadata = metadata.to_string();
        let events = self.store.append(uow.conn.get(), uow.ctx.project_id.0, &metadata, &uow.streams).await?;
        let outcome = CommandOutcome { events, replayed: false };
        if let Some(key) = &uow.ctx.idempotency_key {
            sqlx::query("UPDATE idempotency_keys SET response = $3 WHERE project_id = $1 AND key = $2")
                .bind(uow.ctx.project_id.0)
                .bind(key)
                .bind(serde_json::to_value(&outcome).expect("outcomes serialise"))
                .execute(uow.conn.get())
                .await?;
        }
        if let Conn::Tx(tx) = uow.conn {
            if let Some(hook) = &self.before_commit {
                hook.before_commit().await;
            }
            tx.commit().await?;
        }
        self.store.committed(&uow.streams, &outcome.events);
        self.wake.notify_one();
        tracing::Span::current().record("events", outcome.events.len());
        tracing::debug!(command = uow.command, events = outcome.events.len(), "command committed");
        Ok(outcome)
    }

    /// Runs a single-stream command: begin, load, decide, commit.
    async fn single<A: Aggregate + Owned>(
        &self,
        ctx: &CommandContext,
        name: &'static str,
        id: Uuid,
        request: &impl Serialize,
        command: impl FnOnce(&A) -> A::Command,
    ) -> Result<CommandOutcome, CommandError> {
        let mut uow = match self.begin(ctx, name, request).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let loaded = self.load_in::<A>(&mut uow, id).await?;
        let command = command(&loaded.state);
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await
    }
}

/// Aggregates that belong to a project; used to scope loads to the caller's tenant.
pub trait Owned {
    fn owner(&self) -> Option<ProjectId>;
}

macro_rules! owned {
    ($($t:ty),*) => {$(
        impl Owned for $t {
            fn owner(&self) -> Option<ProjectId> {
                self.exists.then_some(self.project_id)
            }
        }
    )*};
}
owned!(Integration, Connection, Installation, Operation, ConnectSession, change::Change);

impl Owned for ProviderApp {
    /// A deleted app stays its project's (its stream id is derived from the project).
    fn owner(&self) -> Option<ProjectId> {
        (!self.project_id.0.is_nil()).then_some(self.project_id)
    }
}

/// A project's stream is the project itself; organizations and admin keys stand above
/// projects: none is scoped to the caller's project.
macro_rules! unowned {
    ($($t:ty),*) => {$(
        impl Owned for $t {
            fn owner(&self) -> Option<ProjectId> {
                None
            }
        }
    )*};
}
unowned!(Project, organization::Organization, admin_key::AdminKey);

fn scoped<A: Aggregate + Owned>(ctx: &CommandContext, mut loaded: Loaded<A>) -> Loaded<A> {
    if loaded.state.owner().is_some_and(|owner| owner != ctx.project_id) {
        // Another tenant's stream: it does not exist for this caller. Seen from sequence 0,
        // any append (a create is the only command an empty state accepts) collides with
        // the stream's first event and fails as a conflict, revealing nothing.
        loaded.state = A::default();
        loaded.sequence = 0;
        loaded.hash = None;
    }
    loaded
}

fn request_digest(command: &str, request: &impl Serialize) -> [u8; 32] {
    let body = serde_json::to_vec(request).expect("requests serialise");
    Sha256::new().chain_update(command.as_bytes()).chain_update([0]).chain_update(body).finalize().into()
}

/// Turns commit wake-ups into NOTIFYs, one at a time: several commits coalesce into one
/// notification, and no append transaction takes PostgreSQL's global notify lock. Its own
/// connection does not wait for the WAL flush (a NOTIFY is a wake-up, not data), so it adds
/// no fsync to the writers'.
async fn notifier(pool: PgPool, wake: Arc<Notify>) {
    // Detached from the pool: its session setting must never reach a command's connection.
    let mut conn: Option<PgConnection> = None;
    loop {
        wake.notified().await;
        if pool.is_closed() {
            return;
        }
        let result = async {
            if conn.is_none() {
                let mut fresh = pool.acquire().await?.detach();
                sqlx::query("SET synchronous_commit = off").execute(&mut fresh).await?;
                conn = Some(fresh);
            }
            let c = conn.as_mut().expect("connected above");
            sqlx::query("SELECT pg_notify($1, '')").bind(EVENTS_CHANNEL).execute(c).await
        }
        .await;
        if let Err(error) = result {
            conn = None;
            if pool.is_closed() {
                return;
            }
            tracing::warn!(%error, "NOTIFY failed; readers fall back to polling");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}
