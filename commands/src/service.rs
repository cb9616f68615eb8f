//! The command service: one method per command users can send. Each is atomic —
//! idempotency check, loads (tenant-scoped), pure decision, credential writes, one append
//! statement — in one transaction when it needs more than that one statement; then a
//! coalesced NOTIFY wakes log readers.

use crate::credentials::{CredentialStore, Secret};
use crate::error::CommandError;
use crate::store::{CommandOutcome, EventStore, Loaded, PendingStream};
use amplog_domain::connection::{Connection, ConnectionCommand};
use amplog_domain::installation::{ConnectionFacts, Installation, InstallationCommand, IntegrationFacts, ObjectConfig};
use amplog_domain::integration::{Integration, IntegrationCommand, Manifest};
use amplog_domain::operation::{
    Cursor, DeliveryAttempt, ErrorClass, Operation, OperationCommand, OperationType, PageRecord, Trigger,
};
use amplog_domain::project::{Project, ProjectCommand};
use amplog_domain::*;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::Notify;
use uuid::Uuid;

fn manifest_digest(manifest: &Manifest) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(serde_json::to_vec(manifest).expect("manifests serialise"))))
}

/// The NOTIFY channel that wakes log readers after appends commit.
pub const EVENTS_CHANNEL: &str = "amplog_events";

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
    #[cfg(feature = "testing")]
    gate: Option<Arc<CommitGate>>,
}

/// Tests only: holds transactional commands just before COMMIT, their events inserted, so a
/// test can keep an append open while others commit.
#[cfg(feature = "testing")]
pub struct CommitGate {
    /// Signalled when a command reaches the gate.
    pub reached: Notify,
    /// One permit lets one command commit.
    pub release: tokio::sync::Semaphore,
}

#[cfg(feature = "testing")]
impl Default for CommitGate {
    fn default() -> Self {
        Self { reached: Notify::new(), release: tokio::sync::Semaphore::new(0) }
    }
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
        Self {
            pool,
            store,
            credentials,
            wake,
            #[cfg(feature = "testing")]
            gate: None,
        }
    }

    /// Tests only: commands in a transaction wait at `gate` before they commit.
    #[cfg(feature = "testing")]
    pub fn with_commit_gate(mut self, gate: Arc<CommitGate>) -> Self {
        self.gate = Some(gate);
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
        let mut conn = self.pool.acquire().await?;
        let loaded = self.store.load::<A>(&mut conn, &id.to_string()).await?;
        Ok(scoped(ctx, loaded))
    }

    async fn begin(
        &self,
        ctx: &CommandContext,
        command: &'static str,
        request: &impl Serialize,
    ) -> Result<Begun, CommandError> {
        let Some(key) = &ctx.idempotency_key else {
            let conn = Conn::Plain(self.pool.acquire().await?);
            return Ok(Begun::Fresh(UnitOfWork { conn, ctx: ctx.clone(), command, streams: Vec::new() }));
        };
        if key.is_empty() || key.len() > 255 {
            return Err(CommandError::Invalid("an idempotency key must be 1 to 255 characters".into()));
        }
        let mut conn = Conn::Tx(self.pool.begin().await?);
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
            uow.conn = Conn::Tx(Transaction::begin(plain, None).await?);
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

    async fn commit(&self, mut uow: UnitOfWork) -> Result<CommandOutcome, CommandError> {
        let metadata = serde_json::json!({
            "actor": uow.ctx.actor,
            "command": uow.command,
            "correlation_id": uow.ctx.correlation_id,
        })
        .to_string();
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
            #[cfg(feature = "testing")]
            if let Some(gate) = &self.gate {
                gate.reached.notify_one();
                gate.release.acquire().await.expect("the gate is never closed").forget();
            }
            tx.commit().await?;
        }
        self.store.committed(&uow.streams, &outcome.events);
        self.wake.notify_one();
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

    // ---- projects -------------------------------------------------------------------

    /// Creates the project `ctx.project_id`.
    pub async fn create_project(&self, ctx: &CommandContext, name: &str) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Project>(ctx, "project.create", ctx.project_id.0, &name, |_| ProjectCommand::Create {
            name: name.into(),
            at,
        })
        .await
    }

    pub async fn rename_project(&self, ctx: &CommandContext, name: &str) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Project>(ctx, "project.rename", ctx.project_id.0, &name, |_| ProjectCommand::Rename {
            name: name.into(),
            at,
        })
        .await
    }

    // ---- integrations ---------------------------------------------------------------

    pub async fn declare_integration(
        &self,
        ctx: &CommandContext,
        name: &str,
        provider: &str,
    ) -> Result<CommandOutcome, CommandError> {
        self.declare_integration_with(ctx, name, provider, None).await
    }

    /// Declares an integration and, when a manifest is given, deploys it as revision 1 in
    /// the same append: both events or neither.
    pub async fn declare_integration_with(
        &self,
        ctx: &CommandContext,
        name: &str,
        provider: &str,
        manifest: Option<&Manifest>,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let mut uow = match self.begin(ctx, "integration.declare", &(name, provider, manifest)).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let loaded = self.load_in::<Integration>(&mut uow, Uuid::now_v7()).await?;
        let mut commands = vec![IntegrationCommand::Declare {
            project_id: ctx.project_id,
            name: name.into(),
            provider: provider.into(),
            at,
        }];
        if let Some(manifest) = manifest {
            commands.push(IntegrationCommand::DeployRevision {
                manifest: manifest.clone(),
                manifest_digest: manifest_digest(manifest),
                at,
            });
        }
        uow.streams.push(self.store.decide(&loaded, &commands)?);
        self.commit(uow).await
    }

    pub async fn deploy_revision(
        &self,
        ctx: &CommandContext,
        integration_id: IntegrationId,
        manifest: &Manifest,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let digest = manifest_digest(manifest);
        self.single::<Integration>(
            ctx,
            "integration.deploy_revision",
            integration_id.0,
            &(integration_id, manifest),
            |_| IntegrationCommand::DeployRevision { manifest: manifest.clone(), manifest_digest: digest.clone(), at },
        )
        .await
    }

    // ---- connections ----------------------------------------------------------------

    /// Creates a connection; the secret goes to the encrypted store in the same transaction.
    pub async fn create_connection(
        &self,
        ctx: &CommandContext,
        integration_id: IntegrationId,
        group_ref: &str,
        secret: &Secret,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let request = (integration_id, group_ref, self.credentials.key().fingerprint(secret));
        let mut uow = match self.begin(ctx, "connection.create", &request).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let integration = self.load_in::<Integration>(&mut uow, integration_id.0).await?;
        if !integration.state.exists {
            return Err(DomainError::from(integration::IntegrationError::NotFound).into());
        }
        let id = ConnectionId(Uuid::now_v7());
        let credential = self
            .credentials
            .put(self.in_tx(&mut uow).await?, CredentialId(Uuid::now_v7()), ctx.project_id, id, secret)
            .await?;
        let loaded = self.load_in::<Connection>(&mut uow, id.0).await?;
        let command = ConnectionCommand::Create {
            project_id: ctx.project_id,
            integration_id,
            provider: integration.state.provider.clone(),
            group_ref: group_ref.into(),
            credential,
            at,
        };
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await
    }

    async fn connection_with_secret(
        &self,
        ctx: &CommandContext,
        name: &'static str,
        id: ConnectionId,
        secret: &Secret,
        command: impl FnOnce(connection::CredentialRef) -> ConnectionCommand,
    ) -> Result<CommandOutcome, CommandError> {
        let request = (id, self.credentials.key().fingerprint(secret));
        let mut uow = match self.begin(ctx, name, &request).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let loaded = self.load_in::<Connection>(&mut uow, id.0).await?;
        // Decide before storing, so a refused command leaves no orphan ciphertext behind.
        let probe = command(connection::CredentialRef {
            id: CredentialId(Uuid::nil()),
            fingerprint: self.credentials.key().fingerprint(secret),
        });
        loaded.state.decide(&probe).map_err(DomainError::from)?;
        let credential = self
            .credentials
            .put(self.in_tx(&mut uow).await?, CredentialId(Uuid::now_v7()), ctx.project_id, id, secret)
            .await?;
        let command = match probe {
            ConnectionCommand::RefreshToken { expires_at, at, .. } => {
                ConnectionCommand::RefreshToken { credential, expires_at, at }
            }
            ConnectionCommand::Reconnect { at, .. } => ConnectionCommand::Reconnect { credential, at },
            other => other,
        };
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await
    }

    /// Records a successful token refresh; the new token set is stored encrypted.
    pub async fn refresh_token(
        &self,
        ctx: &CommandContext,
        id: ConnectionId,
        secret: &Secret,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.connection_with_secret(ctx, "connection.refresh_token", id, secret, |credential| {
            ConnectionCommand::RefreshToken { credential, expires_at, at }
        })
        .await
    }

    /// Re-authorises a connection with new credentials.
    pub async fn reconnect(
        &self,
        ctx: &CommandContext,
        id: ConnectionId,
        secret: &Secret,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.connection_with_secret(ctx, "connection.reconnect", id, secret, |credential| {
            ConnectionCommand::Reconnect { credential, at }
        })
        .await
    }

    pub async fn record_refresh_failure(
        &self,
        ctx: &CommandContext,
        id: ConnectionId,
        reason: &str,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Connection>(ctx, "connection.record_refresh_failure", id.0, &(id, reason), |_| {
            ConnectionCommand::RecordRefreshFailure { reason: reason.into(), at }
        })
        .await
    }

    pub async fn revoke_connection(
        &self,
        ctx: &CommandContext,
        id: ConnectionId,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Connection>(ctx, "connection.revoke", id.0, &id, |_| ConnectionCommand::Revoke { at }).await
    }

    // ---- installations --------------------------------------------------------------

    pub async fn create_installation(
        &self,
        ctx: &CommandContext,
        new: &NewInstallation,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let mut uow = match self.begin(ctx, "installation.create", new).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let integration = self.load_in::<Integration>(&mut uow, new.integration_id.0).await?;
        let connection = self.load_in::<Connection>(&mut uow, new.connection_id.0).await?;
        let revision = new.revision.unwrap_or(integration.state.revisions.len() as u32);
        let objects = match &new.objects {
            Some(objects) => objects.clone(),
            None => integration
                .state
                .revision(revision)
                .map(|r| {
                    r.objects
                        .values()
                        .map(|o| {
                            let schedule = o.schedule.clone().unwrap_or_else(|| DEFAULT_SCHEDULE.into());
                            (o.name.clone(), ObjectConfig { enabled: true, schedule, backfill: o.backfill })
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        let id = Uuid::now_v7();
        let loaded = self.load_in::<Installation>(&mut uow, id).await?;
        let command = InstallationCommand::Create {
            project_id: ctx.project_id,
            integration: IntegrationFacts { id: new.integration_id, state: integration.state },
            revision,
            group_ref: new.group_ref.clone(),
            consumer_ref: new.consumer_ref.clone(),
            connection: ConnectionFacts { id: new.connection_id, state: connection.state },
            objects,
            at,
        };
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await
    }

    pub async fn update_installation_config(
        &self,
        ctx: &CommandContext,
        id: InstallationId,
        revision: u32,
        objects: &BTreeMap<String, ObjectConfig>,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let mut uow = match self.begin(ctx, "installation.update_config", &(id, revision, objects)).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let loaded = self.load_in::<Installation>(&mut uow, id.0).await?;
        let integration_id = loaded.state.integration_id;
        let integration = self.load_in::<Integration>(&mut uow, integration_id.0).await?;
        let command = InstallationCommand::UpdateConfig {
            integration: IntegrationFacts { id: integration_id, state: integration.state },
            revision,
            objects: objects.clone(),
            at,
        };
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await
    }

    pub async fn pause_installation(
        &self,
        ctx: &CommandContext,
        id: InstallationId,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Installation>(ctx, "installation.pause", id.0, &id, |_| InstallationCommand::Pause { at }).await
    }

    pub async fn unpause_installation(
        &self,
        ctx: &CommandContext,
        id: InstallationId,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Installation>(ctx, "installation.unpause", id.0, &id, |_| InstallationCommand::Unpause { at })
            .await
    }

    pub async fn delete_installation(
        &self,
        ctx: &CommandContext,
        id: InstallationId,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Installation>(ctx, "installation.delete", id.0, &id, |_| InstallationCommand::Delete { at }).await
    }

    // ---- operations -----------------------------------------------------------------

    /// Requests an operation: one event on the installation's stream (which orders it with
    /// pauses and deletes) and the operation's first event, in one transaction.
    pub async fn request_operation(
        &self,
        ctx: &CommandContext,
        installation_id: InstallationId,
        new: &NewOperation,
    ) -> Result<CommandOutcome, CommandError> {
        self.request_operation_with(ctx, installation_id, new, None).await
    }

    /// Requests a write of `records` (objects of fields, `id` to update one) to the
    /// provider. The records are kept beside the log (customer data), in the same
    /// transaction as the request.
    pub async fn request_write(
        &self,
        ctx: &CommandContext,
        installation_id: InstallationId,
        object: &str,
        records: &[serde_json::Value],
    ) -> Result<CommandOutcome, CommandError> {
        if records.is_empty() || records.len() > 10_000 || records.iter().any(|r| !r.is_object()) {
            return Err(CommandError::Invalid("a write takes 1 to 10,000 records, each an object of fields".into()));
        }
        let new = NewOperation {
            op_type: OperationType::Write,
            object: object.into(),
            since: None,
            until: None,
            trigger: Trigger::Triggered,
        };
        self.request_operation_with(ctx, installation_id, &new, Some(records)).await
    }

    async fn request_operation_with(
        &self,
        ctx: &CommandContext,
        installation_id: InstallationId,
        new: &NewOperation,
        records: Option<&[serde_json::Value]>,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        // Without records, the digest an idempotency key was stored with before writes existed.
        let request = match records {
            None => serde_json::to_value((installation_id, new)),
            Some(records) => serde_json::to_value((installation_id, new, records)),
        }
        .map_err(|e| CommandError::Invalid(e.to_string()))?;
        let mut uow = match self.begin(ctx, "operation.request", &request).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let installation = self.load_in::<Installation>(&mut uow, installation_id.0).await?;
        let connection_id = installation.state.connection_id;
        let connection = self.load_in::<Connection>(&mut uow, connection_id.0).await?;
        let operation_id = OperationId(Uuid::now_v7());
        let operation = self.load_in::<Operation>(&mut uow, operation_id.0).await?;
        // The operation's own checks first: a bad window is the caller's first problem.
        let request = OperationCommand::Request {
            project_id: ctx.project_id,
            installation_id,
            connection_id,
            op_type: new.op_type,
            object: new.object.clone(),
            since: new.since,
            until: new.until,
            trigger: new.trigger,
            at,
        };
        operation.state.decide(&request).map_err(DomainError::from)?;
        self.decide(
            &mut uow,
            &installation,
            &InstallationCommand::RequestOperation {
                operation_id,
                op_type: new.op_type,
                object: new.object.clone(),
                trigger: new.trigger,
                connection: ConnectionFacts { id: connection_id, state: connection.state },
                at,
            },
        )?;
        self.decide(&mut uow, &operation, &request)?;
        if let Some(records) = records {
            sqlx::query("INSERT INTO write_batches (operation_id, project_id, records) VALUES ($1, $2, $3)")
                .bind(operation_id.0)
                .bind(ctx.project_id.0)
                .bind(sqlx::types::Json(records))
                .execute(self.in_tx(&mut uow).await?)
                .await?;
        }
        self.commit(uow).await
    }

    /// Starts (or takes over an expired lease on) an operation, holding it for `lease_for`.
    pub async fn start_operation(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
        lease_for: Duration,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.start", id.0, &(id, lease_id), |_| OperationCommand::Start {
            lease_id,
            lease_until: at + lease_for,
            at,
        })
        .await
    }

    pub async fn record_page(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
        records: u64,
        bytes: u64,
        cursor: &Cursor,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.record_page", id.0, &(id, lease_id, records, bytes, cursor), |_| {
            OperationCommand::RecordPage { lease_id, records, bytes, cursor: cursor.clone(), at }
        })
        .await
    }

    /// Records a batch of pages in one command (one event each).
    pub async fn record_pages(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
        pages: &[PageRecord],
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.record_pages", id.0, &(id, lease_id, pages), |_| {
            OperationCommand::RecordPages { lease_id, pages: pages.to_vec(), at }
        })
        .await
    }

    /// Extends the holder's lease to `lease_for` from now.
    pub async fn renew_lease(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
        lease_for: Duration,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.renew_lease", id.0, &(id, lease_id, at), |_| {
            OperationCommand::RenewLease { lease_id, lease_until: at + lease_for, at }
        })
        .await
    }

    /// Gives the holder's lease up: the operation is left running for another worker to
    /// start at once (a worker stopping cleanly).
    pub async fn release_lease(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.release_lease", id.0, &(id, lease_id), |_| {
            OperationCommand::ReleaseLease { lease_id, at }
        })
        .await
    }

    /// Records a failed delivery attempt of the operation's next page.
    pub async fn record_delivery_failure(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
        delivery: &DeliveryAttempt,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.record_delivery_failure", id.0, &(id, lease_id, delivery), |_| {
            OperationCommand::RecordDeliveryFailure { lease_id, delivery: delivery.clone(), at }
        })
        .await
    }

    /// Records a page delivered to its destination, with its new cursor, in one append.
    pub async fn record_delivered_page(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
        delivery: &DeliveryAttempt,
        page: &PageRecord,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.record_delivered_page", id.0, &(id, lease_id, delivery, page), |_| {
            OperationCommand::RecordDeliveredPage { lease_id, delivery: delivery.clone(), page: page.clone(), at }
        })
        .await
    }

    pub async fn succeed_operation(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.succeed", id.0, &(id, lease_id), |_| OperationCommand::Succeed {
            lease_id,
            at,
        })
        .await
    }

    pub async fn fail_operation(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
        error_class: ErrorClass,
        message: &str,
        retryable: bool,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.fail", id.0, &(id, lease_id, error_class, message, retryable), |_| {
            OperationCommand::Fail { lease_id, error_class, message: message.into(), retryable, at }
        })
        .await
    }

    pub async fn retry_operation(&self, ctx: &CommandContext, id: OperationId) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.retry", id.0, &id, |_| OperationCommand::Retry { at }).await
    }

    pub async fn cancel_operation(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        reason: &str,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.cancel", id.0, &(id, reason), |_| OperationCommand::Cancel {
            reason: reason.into(),
            at,
        })
        .await
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
owned!(Integration, Connection, Installation, Operation);

impl Owned for Project {
    fn owner(&self) -> Option<ProjectId> {
        None
    }
}

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
