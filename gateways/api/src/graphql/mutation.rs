//! Mutations: each is one command of the command service, scoped to the key's project, made
//! safe to retry by the `Idempotency-Key` header, and able to wait until its effects are
//! visible in the read models (`waitForVisibility`).

use super::loaders::*;
use super::query::{notification_subscriptions, JwtKey, NotificationSubscription};
use super::types::*;
use super::{app, db, loader, principal, IdempotencyKey};
use crate::auth::Scope;
use crate::error::ApiError;
use crate::manifest;
use amplog_commands::credentials::Secret;
use amplog_commands::service::{AppSettings, NewInstallation, NewOperation};
use amplog_commands::{CommandContext, CommandOutcome};
use amplog_domain::installation::ObjectConfig;
use amplog_domain::integration::Backfill;
use amplog_domain::operation::{OperationType, Trigger};
use amplog_domain::*;
use amplog_projections::docs::*;
use async_graphql::{ComplexObject, Context, InputObject, Json, Object, SimpleObject};

type Result<T, E = ApiError> = std::result::Result<T, E>;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::time::Duration;
use uuid::Uuid;

/// How long `waitForVisibility` waits for the projector at most.
const VISIBILITY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(InputObject)]
pub struct ObjectConfigInput {
    pub name: String,
    #[graphql(default = true)]
    pub enabled: bool,
    /// `@every 15m` or a five-field cron expression.
    pub schedule: String,
    /// Days of history the first read fetches; with `fullBackfill`, all of it.
    pub backfill_days: Option<u32>,
    #[graphql(default = false)]
    pub full_backfill: bool,
}

fn objects_of(inputs: Vec<ObjectConfigInput>) -> Result<BTreeMap<String, ObjectConfig>, ApiError> {
    let mut objects = BTreeMap::new();
    for o in inputs {
        let backfill = match (o.backfill_days, o.full_backfill) {
            (None, false) => Backfill::None,
            (Some(days), false) => Backfill::Days(days),
            (None, true) => Backfill::Full,
            (Some(_), true) => {
                return Err(ApiError::bad_request("invalid_input", "give `backfillDays` or `fullBackfill`, not both"))
            }
        };
        if objects.insert(o.name.clone(), ObjectConfig { enabled: o.enabled, schedule: o.schedule, backfill }).is_some()
        {
            return Err(ApiError::bad_request("invalid_input", format!("object `{}` is given twice", o.name)));
        }
    }
    Ok(objects)
}

#[derive(InputObject)]
pub struct CreateConnectionInput {
    pub integration_id: Uuid,
    pub group_ref: String,
    /// The provider's token set (`access_token`, `refresh_token`, `expires_at`, ...). Stored
    /// encrypted; events and read models only carry a fingerprint.
    pub credentials: Json<serde_json::Value>,
}

#[derive(InputObject)]
pub struct ProviderAppInput {
    /// A provider of the connector catalog.
    pub provider: String,
    pub client_id: String,
    /// Stored encrypted, never readable back; on an update, absent keeps the stored one.
    pub client_secret: Option<String>,
    #[graphql(default)]
    pub scopes: Vec<String>,
    /// Where connect sessions may send the user back (`https`, or `http` on loopback).
    #[graphql(default)]
    pub return_urls: Vec<String>,
}

#[derive(InputObject)]
pub struct ConnectSessionInput {
    pub integration_id: Uuid,
    pub group_ref: String,
    pub consumer_ref: String,
    /// One of the provider app's return URLs (any query); absent: the page tells its
    /// opener (`postMessage`) instead.
    pub return_url: Option<String>,
    /// A connection of this integration and group to reconnect instead of creating one.
    pub connection_id: Option<Uuid>,
    /// How long the link is valid: 1 to 1440 minutes.
    #[graphql(default = 30)]
    pub expires_in_minutes: i64,
}

/// The longest client secret accepted, in bytes.
const MAX_CLIENT_SECRET: usize = 4096;

fn app_settings(input: &ProviderAppInput) -> Result<AppSettings> {
    if !amplog_providers::connector::is_known_provider(&input.provider) {
        return Err(ApiError::bad_request(
            "invalid_input",
            format!("`{}` is not in the connector catalog", input.provider),
        ));
    }
    if let Some(secret) = &input.client_secret {
        if secret.is_empty() || secret.len() > MAX_CLIENT_SECRET || secret.chars().any(char::is_control) {
            return Err(ApiError::bad_request("invalid_input", "a client secret is 1 to 4096 printable bytes"));
        }
    }
    if let Some(url) = input.return_urls.iter().find(|u| url::Url::parse(u).is_err()) {
        return Err(ApiError::bad_request("provider_app.invalid_return_url", format!("`{url}` is not a URL")));
    }
    Ok(AppSettings {
        client_id: input.client_id.clone(),
        secret: input.client_secret.clone().map(Secret),
        scopes: input.scopes.clone(),
        return_urls: input.return_urls.clone(),
    })
}

async fn provider_app(ctx: &Context<'_>, project: ProjectId, provider: &str) -> Result<ProviderApp> {
    let command = CommandContext::new(project, "api");
    let id = provider_app::ProviderApp::id_for(project, provider);
    let state = app(ctx).service.load::<provider_app::ProviderApp>(&command, id).await?.state;
    ProviderApp::of(state).ok_or(ApiError::NotFound("provider app"))
}

#[derive(InputObject)]
pub struct CreateInstallationInput {
    pub integration_id: Uuid,
    pub connection_id: Uuid,
    pub group_ref: String,
    pub consumer_ref: String,
    /// Pinned revision; the latest when absent.
    pub revision: Option<u32>,
    /// Per-object configuration; the revision's defaults when absent.
    pub objects: Option<Vec<ObjectConfigInput>>,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct AppendedEventRef {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: Int64,
    pub event_type: String,
    pub position: Int64,
    pub hash: String,
}

/// What a mutation did: the id it acted on, the events it appended (or, `replayed`, the
/// first result of an identical earlier request with the same idempotency key), and
/// whether its effects were visible in the read models when it returned.
#[derive(SimpleObject, Clone, Debug)]
#[graphql(complex)]
pub struct MutationPayload {
    pub id: Uuid,
    pub replayed: bool,
    pub visible: bool,
    pub events: Vec<AppendedEventRef>,
}

#[ComplexObject]
impl MutationPayload {
    async fn integration(&self, ctx: &Context<'_>) -> Result<Option<Integration>> {
        Ok(loader(ctx).load_one(IntegrationKey(self.id)).await?.map(Into::into))
    }

    async fn connection(&self, ctx: &Context<'_>) -> Result<Option<Connection>> {
        Ok(loader(ctx).load_one(ConnectionKey(self.id)).await?.map(Into::into))
    }

    async fn installation(&self, ctx: &Context<'_>) -> Result<Option<Installation>> {
        let doc: Option<InstallationDoc> = doc_by_id(db(ctx), self.id).await?;
        Ok(doc.map(Into::into))
    }

    async fn operation(&self, ctx: &Context<'_>) -> Result<Option<Operation>> {
        let doc: Option<OperationDoc> = doc_by_id(db(ctx), self.id).await?;
        Ok(doc.map(Into::into))
    }
}

/// The command context of this mutation field. One request may hold several mutations, so
/// the idempotency key is the header's, qualified by the field's response key (and `part`).
fn command_ctx(ctx: &Context<'_>, need: Scope, part: Option<&str>) -> Result<CommandContext, ApiError> {
    let who = principal(ctx);
    who.require(need)?;
    let mut command = CommandContext::new(who.project_id, who.actor());
    if let IdempotencyKey(Some(key)) = ctx.data_unchecked::<IdempotencyKey>() {
        let field = ctx.item.node.response_key().node.as_str();
        command = command.with_idempotency_key(match part {
            Some(part) => format!("{key}:{field}:{part}"),
            None => format!("{key}:{field}"),
        });
    }
    Ok(command)
}

/// An end user's token acts on its own group: a create names that group.
fn own_group(ctx: &Context<'_>, group_ref: &str) -> Result<()> {
    match principal(ctx).sees_group(group_ref) {
        true => Ok(()),
        false => Err(ApiError::EndUser),
    }
}

/// An end user's token acts on its own group: another group's installation answers like a
/// missing one (loaded from the log, so a just-made installation is found).
async fn own_installation(ctx: &Context<'_>, command: &CommandContext, id: Uuid) -> Result<()> {
    if principal(ctx).group.is_none() {
        return Ok(());
    }
    let state = app(ctx).service.load::<installation::Installation>(command, id).await?.state;
    match state.exists && principal(ctx).sees_group(&state.group_ref) {
        true => Ok(()),
        false => Err(ApiError::NotFound("installation")),
    }
}

async fn own_operation(ctx: &Context<'_>, command: &CommandContext, id: Uuid) -> Result<()> {
    if principal(ctx).group.is_none() {
        return Ok(());
    }
    let state = app(ctx).service.load::<operation::Operation>(command, id).await?.state;
    if !state.exists {
        return Err(ApiError::NotFound("operation"));
    }
    own_installation(ctx, command, state.installation_id.0).await.map_err(|_| ApiError::NotFound("operation"))
}

async fn own_connection(ctx: &Context<'_>, command: &CommandContext, id: Uuid) -> Result<()> {
    if principal(ctx).group.is_none() {
        return Ok(());
    }
    let state = app(ctx).service.load::<connection::Connection>(command, id).await?.state;
    match state.exists && principal(ctx).sees_group(&state.group_ref) {
        true => Ok(()),
        false => Err(ApiError::NotFound("connection")),
    }
}

/// What is done to one operation of the caller's (its group's, for an end user).
enum OnOperation<'a> {
    Retry,
    Replay,
    Cancel(&'a str),
}

async fn on_operation(ctx: &Context<'_>, id: Uuid, action: OnOperation<'_>, wait: bool) -> Result<MutationPayload> {
    let command = command_ctx(ctx, Scope::Write, None)?;
    own_operation(ctx, &command, id).await?;
    let (service, op) = (&app(ctx).service, OperationId(id));
    let outcome = match action {
        OnOperation::Retry => service.retry_operation(&command, op).await?,
        OnOperation::Replay => service.replay_dead_letter(&command, op).await?,
        OnOperation::Cancel(reason) => service.cancel_operation(&command, op, reason).await?,
    };
    finish(ctx, outcome, Some(id), wait).await
}

/// Revokes a connection's grant at the provider (RFC 7009), best effort: a failure is
/// logged, the revocation in the log stands.
async fn revoke_at_provider(
    state: &crate::state::AppState,
    command: &CommandContext,
    credential: CredentialId,
    connector: &amplog_providers::connector::Connector,
) {
    let revoke = async {
        let mut conn = state.service.pool().acquire().await.map_err(|e| e.to_string())?;
        let secret = state.service.credentials().get(&mut conn, command.project_id, credential).await;
        drop(conn);
        let tokens = secret
            .map_err(|e| e.to_string())?
            .and_then(|s| serde_json::from_str::<amplog_providers::connector::TokenSet>(&s.0).ok());
        let Some(tokens) = tokens else { return Ok(false) };
        let client =
            amplog_providers::tokens::client_app(&state.service, command, connector).await.map_err(|e| e.message)?;
        connector.revoke(&client, &tokens).await.map_err(|e| e.message)
    };
    if let Err(error) = revoke.await {
        tracing::warn!(%credential, %error, "revoking the grant at the provider failed; it is revoked in the log");
    }
}

/// Pausing, unpausing and deleting an installation: the same shape, one command each.
enum Lifecycle {
    Pause,
    Unpause,
    Delete,
}

async fn lifecycle(ctx: &Context<'_>, action: Lifecycle, id: Uuid, wait: bool) -> Result<MutationPayload> {
    let command = command_ctx(ctx, Scope::Write, None)?;
    own_installation(ctx, &command, id).await?;
    let (service, installation) = (&app(ctx).service, InstallationId(id));
    let outcome = match action {
        Lifecycle::Pause => service.pause_installation(&command, installation).await?,
        Lifecycle::Unpause => service.unpause_installation(&command, installation).await?,
        Lifecycle::Delete => service.delete_installation(&command, installation).await?,
    };
    finish(ctx, outcome, Some(id), wait).await
}

async fn finish(
    ctx: &Context<'_>,
    outcome: CommandOutcome,
    id: Option<Uuid>,
    wait: bool,
) -> Result<MutationPayload, ApiError> {
    let id = id.ok_or_else(|| ApiError::bad_request("invalid_input", "the command appended no event"))?;
    let visible = match (wait, outcome.last_cursor()) {
        (true, Some(cursor)) => {
            let pool = app(ctx).service.pool();
            amplog_projections::wait_for(pool, amplog_projections::READ_MODELS, cursor, VISIBILITY_TIMEOUT).await?
        }
        _ => false,
    };
    Ok(MutationPayload {
        id,
        replayed: outcome.replayed,
        visible,
        events: outcome
            .events
            .into_iter()
            .map(|e| AppendedEventRef {
                event_id: e.event_id,
                aggregate_type: e.aggregate_type,
                aggregate_id: e.aggregate_id,
                sequence: Int64::from(e.sequence),
                event_type: e.event_type,
                position: Int64::from(e.position),
                hash: e.hash,
            })
            .collect(),
    })
}

/// A destination just created, with its signing secret (shown once).
#[derive(SimpleObject)]
pub struct DestinationCreated {
    pub name: String,
    pub url: String,
    pub signing_secret: String,
}

pub struct Mutation;

#[Object]
impl Mutation {
    /// Declares the integrations of a manifest (YAML, amp.yaml-shaped) and deploys each as
    /// its revision 1, atomically per integration. Needs an admin key.
    async fn declare_integrations(
        &self,
        ctx: &Context<'_>,
        manifest: String,
        #[graphql(default = false)] wait_for_visibility: bool,
    ) -> Result<Vec<MutationPayload>> {
        principal(ctx).require(Scope::Admin)?; // before parsing: a read key learns nothing
        let declared = manifest::parse_off_runtime(manifest).await?;
        let mut out = Vec::with_capacity(declared.len());
        for integration in &declared {
            let command = command_ctx(ctx, Scope::Admin, Some(&integration.name))?;
            let outcome = app(ctx)
                .service
                .declare_integration_with(
                    &command,
                    &integration.name,
                    &integration.provider,
                    Some(&integration.manifest),
                )
                .await?;
            let id = outcome.id_of("integration");
            out.push(finish(ctx, outcome, id, wait_for_visibility).await?);
        }
        Ok(out)
    }

    /// Deploys a new revision of an integration from a manifest holding that one integration.
    async fn deploy_revision(
        &self,
        ctx: &Context<'_>,
        integration_id: Uuid,
        manifest: String,
        #[graphql(default = false)] wait_for_visibility: bool,
    ) -> Result<MutationPayload> {
        let command = command_ctx(ctx, Scope::Admin, None)?;
        let mut declared = manifest::parse_off_runtime(manifest).await?;
        if declared.len() != 1 {
            return Err(ApiError::bad_request("manifest.invalid", "a revision's manifest must hold one integration"));
        }
        let declared = declared.remove(0);
        let outcome =
            app(ctx).service.deploy_revision(&command, IntegrationId(integration_id), &declared.manifest).await?;
        finish(ctx, outcome, Some(integration_id), wait_for_visibility).await
    }

    /// Creates a connection; the credentials go to the encrypted store, never to the log.
    async fn create_connection(
        &self,
        ctx: &Context<'_>,
        input: CreateConnectionInput,
        #[graphql(default = false)] wait_for_visibility: bool,
    ) -> Result<MutationPayload> {
        let command = command_ctx(ctx, Scope::Write, None)?;
        own_group(ctx, &input.group_ref)?;
        if input.credentials.0.as_object().is_none_or(serde_json::Map::is_empty) {
            return Err(ApiError::bad_request("invalid_input", "`credentials` must be a non-empty object"));
        }
        let secret = Secret(input.credentials.0.to_string());
        let outcome = app(ctx)
            .service
            .create_connection(&command, IntegrationId(input.integration_id), &input.group_ref, &secret)
            .await?;
        let id = outcome.id_of("connection");
        finish(ctx, outcome, id, wait_for_visibility).await
    }

    async fn create_installation(
        &self,
        ctx: &Context<'_>,
        input: CreateInstallationInput,
        #[graphql(default = false)] wait_for_visibility: bool,
    ) -> Result<MutationPayload> {
        let command = command_ctx(ctx, Scope::Write, None)?;
        own_group(ctx, &input.group_ref)?;
        own_connection(ctx, &command, input.connection_id).await?;
        let new = NewInstallation {
            integration_id: IntegrationId(input.integration_id),
            revision: input.revision,
            group_ref: input.group_ref,
            consumer_ref: input.consumer_ref,
            connection_id: ConnectionId(input.connection_id),
            objects: input.objects.map(objects_of).transpose()?,
        };
        let outcome = app(ctx).service.create_installation(&command, &new).await?;
        let id = outcome.id_of("installation");
        finish(ctx, outcome, id, wait_for_visibility).await
    }

    /// Replaces the installation's per-object configuration (and, given, its revision).
    async fn update_installation(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        objects: Vec<ObjectConfigInput>,
        revision: Option<u32>,
        #[graphql(default = false)] wait_for_visibility: bool,
    ) -> Result<MutationPayload> {
        let command = command_ctx(ctx, Scope::Write, None)?;
        own_installation(ctx, &command, id).await?;
        let service = &app(ctx).service;
        let revision = match revision {
            Some(r) => r,
            None => {
                let loaded = service.load::<installation::Installation>(&command, id).await?;
                if !loaded.state.exists {
                    return Err(ApiError::NotFound("installation"));
                }
                loaded.state.revision
            }
        };
        let outcome =
            service.update_installation_config(&command, InstallationId(id), revision, &objects_of(objects)?).await?;
        finish(ctx, outcome, Some(id), wait_for_visibility).await
    }

    async fn pause_installation(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        #[graphql(default = false)] wait_for_visibility: bool,
    ) -> Result<MutationPayload> {
        lifecycle(ctx, Lifecycle::Pause, id, wait_for_visibility).await
    }

    async fn unpause_installation(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        #[graphql(default = false)] wait_for_visibility: bool,
    ) -> Result<MutationPayload> {
        lifecycle(ctx, Lifecycle::Unpause, id, wait_for_visibility).await
    }

    async fn delete_installation(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        #[graphql(default = false)] wait_for_visibility: bool,
    ) -> Result<MutationPayload> {
        lifecycle(ctx, Lifecycle::Delete, id, wait_for_visibility).await
    }

    /// Requests a read of each object (all enabled objects when none are named), optionally
    /// bounded by `since`/`until`. Returns one payload per operation; `id` is its id.
    async fn trigger_read(
        &self,
        ctx: &Context<'_>,
        installation_id: Uuid,
        objects: Option<Vec<String>>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        #[graphql(default = false)] wait_for_visibility: bool,
    ) -> Result<Vec<MutationPayload>> {
        let check = command_ctx(ctx, Scope::Write, None)?;
        super::check_times(&[("since", since), ("until", until)])?;
        own_installation(ctx, &check, installation_id).await?;
        let service = &app(ctx).service;
        let loaded = service.load::<installation::Installation>(&check, installation_id).await?;
        if !loaded.state.exists {
            return Err(ApiError::NotFound("installation"));
        }
        let configured = &loaded.state.objects;
        let objects: Vec<String> = match objects {
            Some(named) if !named.is_empty() => {
                if named.len() > configured.len().max(1) * 2 {
                    return Err(ApiError::bad_request(
                        "too_many_objects",
                        format!("the installation has {} objects; {} were named", configured.len(), named.len()),
                    ));
                }
                let mut unique = Vec::with_capacity(named.len());
                for object in named {
                    if !configured.contains_key(&object) {
                        // Refused before any read is requested: all of them or none.
                        let unknown = installation::InstallationError::UnknownObject(object);
                        return Err(amplog_commands::CommandError::Domain(unknown.into()).into());
                    }
                    if !unique.contains(&object) {
                        unique.push(object);
                    }
                }
                unique
            }
            _ => configured.iter().filter(|(_, c)| c.enabled).map(|(name, _)| name.clone()).collect(),
        };
        let mut out = Vec::with_capacity(objects.len());
        for object in objects {
            let command = command_ctx(ctx, Scope::Write, Some(&object))?;
            let new = NewOperation { op_type: OperationType::Read, object, since, until, trigger: Trigger::Triggered };
            let outcome = service.request_operation(&command, InstallationId(installation_id), &new).await?;
            let id = outcome.id_of("operation");
            out.push(finish(ctx, outcome, id, wait_for_visibility).await?);
        }
        Ok(out)
    }

    /// Creates (or re-points) one of the project's destinations, the webhook endpoints reads
    /// are delivered to; a new signing secret comes back this once (Standard Webhooks
    /// `whsec_…`) and is stored encrypted. An object's manifest `destination` names one; the
    /// others go to `default`.
    async fn create_destination(&self, ctx: &Context<'_>, name: String, url: String) -> Result<DestinationCreated> {
        let command = command_ctx(ctx, Scope::Admin, None)?;
        amplog_providers::egress::check_destination(&url, app(ctx).config.egress)
            .map_err(|e| ApiError::bad_request("invalid_input", e))?;
        let secret = app(ctx).service.put_destination(&command, &name, &url, None).await?;
        Ok(DestinationCreated { name, url, signing_secret: secret.0 })
    }

    /// Subscribes one of the project's destinations to lifecycle notifications: topics from
    /// `notificationTopics`, `group.*` patterns or `*`. Each notification of an event after
    /// this one in the log is delivered at least once. Needs an admin key.
    async fn create_notification_subscription(
        &self,
        ctx: &Context<'_>,
        destination: String,
        topics: Vec<String>,
    ) -> Result<NotificationSubscription> {
        let command = command_ctx(ctx, Scope::Admin, None)?;
        let (id, _) = app(ctx).service.subscribe_notifications(&command, &destination, &topics).await?;
        let made = notification_subscriptions(ctx).await?.into_iter().find(|s| s.id == id);
        made.ok_or_else(|| ApiError::Internal("the subscription just made is not listed".into()))
    }

    /// Deletes a notification subscription: nothing more is queued for it, and what it had
    /// queued and not delivered is not sent. Needs an admin key.
    async fn delete_notification_subscription(&self, ctx: &Context<'_>, id: Uuid) -> Result<MutationPayload> {
        let command = command_ctx(ctx, Scope::Admin, None)?;
        let outcome = app(ctx).service.delete_notification_subscription(&command, id).await?;
        finish(ctx, outcome, Some(id), false).await
    }

    /// Registers a public key (PEM, `-----BEGIN PUBLIC KEY-----`) the project's backend signs
    /// its end users' tokens with: `algorithm` is `EdDSA`, `ES256` or `RS256`. Tokens name
    /// it by the returned `kid`. Needs an admin key.
    async fn create_jwt_key(&self, ctx: &Context<'_>, algorithm: String, public_key: String) -> Result<JwtKey> {
        let command = command_ctx(ctx, Scope::Admin, None)?;
        let keys = &app(ctx).keys;
        let kid = keys.create_jwt_key(&command, &algorithm, &public_key).await?;
        let created = keys.jwt_keys(command.project_id).await?.into_iter().find(|k| k.kid == kid);
        let key = created.ok_or_else(|| ApiError::Internal("the key just made is not listed".into()))?;
        Ok(JwtKey { kid, algorithm: key.algorithm, created_at: key.created_at, revoked_at: key.revoked_at })
    }

    /// Revokes a JWT key: tokens it signed are refused (within a second on every replica).
    async fn revoke_jwt_key(&self, ctx: &Context<'_>, kid: Uuid) -> Result<MutationPayload> {
        let command = command_ctx(ctx, Scope::Admin, None)?;
        let outcome = app(ctx).keys.revoke_jwt_key(&command, kid).await?;
        finish(ctx, outcome, Some(kid), false).await
    }

    /// Configures the project's OAuth client at a provider; connect sessions of its
    /// integrations send users to it, and its connections refresh through it. Needs an
    /// admin key.
    async fn create_provider_app(&self, ctx: &Context<'_>, input: ProviderAppInput) -> Result<ProviderApp> {
        let command = command_ctx(ctx, Scope::Admin, None)?;
        let settings = app_settings(&input)?;
        app(ctx).service.create_provider_app(&command, &input.provider, &settings).await?;
        provider_app(ctx, command.project_id, &input.provider).await
    }

    /// Replaces a provider app's configuration (its secret only when one is given).
    async fn update_provider_app(&self, ctx: &Context<'_>, input: ProviderAppInput) -> Result<ProviderApp> {
        let command = command_ctx(ctx, Scope::Admin, None)?;
        let settings = app_settings(&input)?;
        app(ctx).service.update_provider_app(&command, &input.provider, &settings).await?;
        provider_app(ctx, command.project_id, &input.provider).await
    }

    /// Deletes a provider app: new connect sessions for the provider are refused until one
    /// is configured again.
    async fn delete_provider_app(&self, ctx: &Context<'_>, provider: String) -> Result<MutationPayload> {
        let command = command_ctx(ctx, Scope::Admin, None)?;
        let outcome = app(ctx).service.delete_provider_app(&command, &provider).await?;
        let id = provider_app::ProviderApp::id_for(command.project_id, &provider);
        finish(ctx, outcome, Some(id), false).await
    }

    /// A short-lived link (`url`) an end user opens to connect their account through the
    /// provider's consent and install the integration (or reconnect `connectionId`).
    async fn create_connect_session(
        &self,
        ctx: &Context<'_>,
        input: ConnectSessionInput,
    ) -> Result<ConnectSessionCreated> {
        let command = command_ctx(ctx, Scope::Write, None)?;
        own_group(ctx, &input.group_ref)?;
        let state = app(ctx);
        let minutes = input.expires_in_minutes;
        if !(1..=connect_session::MAX_LIFETIME_MINUTES).contains(&minutes) {
            return Err(ApiError::bad_request("invalid_input", "`expiresInMinutes` must be 1 to 1440"));
        }
        let integration = state.service.load::<integration::Integration>(&command, input.integration_id).await?.state;
        if !integration.exists {
            return Err(ApiError::NotFound("integration"));
        }
        let client = state.service.provider_client(&command, &integration.provider).await?.ok_or_else(|| {
            ApiError::bad_request(
                "provider_app.not_found",
                format!("configure the project's {} app first (createProviderApp)", integration.provider),
            )
        })?;
        if let Some(url) = &input.return_url {
            // Its query is the builder's, but it goes into the session's event: bounded.
            if url.len() > provider_app::MAX_TEXT {
                return Err(ApiError::bad_request("invalid_input", "`returnUrl` is at most 2000 bytes"));
            }
            if !crate::connect::return_url_allowed(url, &client.config.return_urls) {
                return Err(ApiError::bad_request(
                    "connect_session.return_url_not_allowed",
                    "`returnUrl` is not one of the provider app's return URLs",
                ));
            }
        }
        let id = Uuid::now_v7();
        let (token, digest) = crate::connect::new_link_token(command.project_id, id);
        let request = connect_session::SessionRequest {
            integration_id: IntegrationId(input.integration_id),
            provider: integration.provider.clone(),
            group_ref: input.group_ref,
            consumer_ref: input.consumer_ref,
            return_url: input.return_url,
            reconnect: input.connection_id.map(ConnectionId),
        };
        let expires_at = Utc::now() + chrono::Duration::minutes(minutes);
        state.service.create_connect_session(&command, id, &request, &digest, expires_at).await?;
        Ok(ConnectSessionCreated { id, url: format!("{}/connect/{token}", state.public_url), expires_at })
    }

    /// Revokes a connection: its grant at the provider (where the catalog has a revoke
    /// endpoint), then in the log; its installations stop reading (health `needs_reauth`).
    async fn revoke_connection(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        #[graphql(default = false)] wait_for_visibility: bool,
    ) -> Result<MutationPayload> {
        let command = command_ctx(ctx, Scope::Write, None)?;
        own_connection(ctx, &command, id).await?;
        let state = app(ctx);
        let connection = state.service.load::<connection::Connection>(&command, id).await?.state;
        // The log first: the grant ends there whatever the provider says (a refused
        // revocation — unknown, already revoked — calls no provider).
        let outcome = state.service.revoke_connection(&command, ConnectionId(id)).await?;
        state.tokens.forget(ConnectionId(id));
        if let (Some(credential), Some(connector)) =
            (&connection.credential, state.config.connectors.get(&connection.provider))
        {
            revoke_at_provider(state, &command, credential.id, &connector).await;
        }
        finish(ctx, outcome, Some(id), wait_for_visibility).await
    }

    /// Writes records to the provider: a write operation whose records a worker upserts,
    /// with a result per record (`operation { writeResults }`). Each record is an object of
    /// fields; `id` updates that record.
    async fn write_records(
        &self,
        ctx: &Context<'_>,
        installation_id: Uuid,
        object: String,
        records: Vec<Json<serde_json::Value>>,
        #[graphql(default = false)] wait_for_visibility: bool,
    ) -> Result<MutationPayload> {
        let command = command_ctx(ctx, Scope::Write, None)?;
        own_installation(ctx, &command, installation_id).await?;
        let records: Vec<serde_json::Value> = records.into_iter().map(|r| r.0).collect();
        let outcome =
            app(ctx).service.request_write(&command, InstallationId(installation_id), &object, &records).await?;
        let id = outcome.id_of("operation");
        finish(ctx, outcome, id, wait_for_visibility).await
    }

    /// Retries a failed operation (a proxy call is sent again instead): it is dispatched
    /// again, and a read resumes from its last recorded page.
    async fn retry_operation(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        #[graphql(default = false)] wait_for_visibility: bool,
    ) -> Result<MutationPayload> {
        on_operation(ctx, id, OnOperation::Retry, wait_for_visibility).await
    }

    /// Replays a dead letter (an operation that failed after all its attempts): it is
    /// dispatched again and resumes from its last recorded page.
    async fn replay_dead_letter(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        #[graphql(default = false)] wait_for_visibility: bool,
    ) -> Result<MutationPayload> {
        on_operation(ctx, id, OnOperation::Replay, wait_for_visibility).await
    }

    async fn cancel_operation(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        #[graphql(default = "cancelled by the builder")] reason: String,
        #[graphql(default = false)] wait_for_visibility: bool,
    ) -> Result<MutationPayload> {
        on_operation(ctx, id, OnOperation::Cancel(&reason), wait_for_visibility).await
    }
}
