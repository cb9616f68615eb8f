//! Queries: the read models (integrations, installations with their connection,
//! operations, read states and usage; billing) and the auditor's views of the log.

use super::loaders::*;
use super::types::*;
use super::{app, db, loader, parse_cursor, principal, Page};
use crate::error::ApiError;
use amplog_log::audit::{self, AsOf, HistoryRange};
use amplog_log::LogCursor;
use amplog_projections::docs::*;
use amplog_projections::queries;
use async_graphql::connection::{query, Connection as Relay, Edge};
use async_graphql::{ComplexObject, Context, InputObject, Json, Object, SimpleObject};

type Result<T, E = ApiError> = std::result::Result<T, E>;
use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

pub(crate) const DEFAULT_PAGE: usize = 20;
pub(crate) const MAX_PAGE: usize = 100;
/// The largest history page.
const MAX_HISTORY_PAGE: i32 = 1000;
/// What a replay of a whole installation (`installationAsOf`, `verifyInstallation`) costs
/// in the complexity budget (10,000): a request holds at most four.
const REPLAY_COMPLEXITY: usize = 2_500;

/// A history page costs 4 per event asked for: two 1,000-event pages fit in a request,
/// thirty aliased ones do not.
fn history_complexity(first: i32) -> usize {
    first.clamp(1, MAX_HISTORY_PAGE) as usize * 4
}

#[derive(InputObject, Default)]
pub struct InstallationFilter {
    pub integration_id: Option<Uuid>,
    pub group_ref: Option<String>,
    pub health: Option<Health>,
    pub paused: Option<bool>,
    /// Deleted installations are left out unless this is true.
    #[graphql(default = false)]
    pub include_deleted: bool,
}

#[derive(InputObject, Default)]
pub struct OperationFilter {
    pub installation_id: Option<Uuid>,
    /// `pending`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: Option<String>,
    /// `read`, `write` or `proxy`.
    pub op_type: Option<String>,
}

pub struct Query;

#[Object]
impl Query {
    /// The project's integrations, by name.
    async fn integrations(&self, ctx: &Context<'_>) -> Result<Vec<Integration>> {
        let db = db(ctx);
        let docs = queries::integrations(&mut *db.conn().await?, db.project.0).await?;
        Ok(docs.into_iter().map(Into::into).collect())
    }

    async fn integration(&self, ctx: &Context<'_>, id: Uuid) -> Result<Integration> {
        let doc = loader(ctx).load_one(IntegrationKey(id)).await?;
        Ok(doc.ok_or(ApiError::NotFound("integration"))?.into())
    }

    /// Installations, oldest first, with Relay cursor pagination.
    #[graphql(complexity = "page_complexity(first, last, child_complexity)")]
    async fn installations(
        &self,
        ctx: &Context<'_>,
        filter: Option<InstallationFilter>,
        after: Option<String>,
        before: Option<String>,
        first: Option<i32>,
        last: Option<i32>,
    ) -> Result<Relay<String, Installation>, async_graphql::Error> {
        let filter = filter.unwrap_or_default();
        let db = db(ctx);
        query(after, before, first, last, |after: Option<String>, before: Option<String>, first, last| async move {
            let after = after.as_deref().map(parse_cursor).transpose()?;
            let before = before.as_deref().map(parse_cursor).transpose()?;
            let backwards = last.is_some() && first.is_none();
            let limit = first.or(last).unwrap_or(DEFAULT_PAGE).min(MAX_PAGE);
            let q = queries::InstallationQuery {
                after,
                before,
                integration_id: filter.integration_id,
                group_ref: filter.group_ref.as_deref(),
                health: filter.health.map(Health::as_str),
                paused: filter.paused,
                include_deleted: filter.include_deleted,
                backwards,
                limit: limit as i64 + 1,
            };
            let mut nodes = queries::installations(&mut *db.conn().await?, db.project.0, &q).await?;
            let more = nodes.len() > limit;
            nodes.truncate(limit);
            if backwards {
                nodes.reverse();
            }
            let (mut has_previous, has_next) =
                if backwards { (more, before.is_some()) } else { (after.is_some(), more) };
            // Relay's algorithm with both: the first `first` edges, then the last `last` of them.
            if let (Some(_), Some(last)) = (first, last) {
                let cut = nodes.len().saturating_sub(last);
                has_previous |= cut > 0;
                nodes.drain(..cut);
            }
            let mut page = Relay::new(has_previous, has_next);
            page.edges.extend(nodes.into_iter().map(|(key, doc)| Edge::new(key, Installation::from(doc))));
            Ok::<_, ApiError>(page)
        })
        .await
    }

    async fn installation(&self, ctx: &Context<'_>, id: Uuid) -> Result<Installation> {
        let doc: Option<InstallationDoc> = doc_by_id(db(ctx), id).await?;
        Ok(doc.ok_or(ApiError::NotFound("installation"))?.into())
    }

    async fn connection(&self, ctx: &Context<'_>, id: Uuid) -> Result<Connection> {
        let doc = loader(ctx).load_one(ConnectionKey(id)).await?;
        Ok(doc.ok_or(ApiError::NotFound("connection"))?.into())
    }

    /// The project's OAuth clients, one per provider.
    async fn provider_apps(&self, ctx: &Context<'_>) -> Result<Vec<ProviderApp>> {
        let who = principal(ctx);
        who.require_key()?;
        let command = amplog_commands::CommandContext::new(who.project_id, who.actor());
        let mut apps = Vec::new();
        for provider in amplog_providers::connector::known_providers() {
            let id = amplog_domain::provider_app::ProviderApp::id_for(who.project_id, provider);
            let state = app(ctx).service.load::<amplog_domain::provider_app::ProviderApp>(&command, id).await?.state;
            apps.extend(ProviderApp::of(state));
        }
        Ok(apps)
    }

    /// The organization the project belongs to, if any.
    async fn organization(&self, ctx: &Context<'_>) -> Result<Option<Organization>> {
        let who = principal(ctx);
        let command = amplog_commands::CommandContext::new(who.project_id, who.actor());
        let service = &app(ctx).service;
        let project = service.load::<amplog_domain::project::Project>(&command, who.project_id.0).await?.state;
        let Some(id) = project.organization_id else { return Ok(None) };
        let org = service.load::<amplog_domain::organization::Organization>(&command, id).await?.state;
        Ok(Some(Organization { id, name: org.name, projects: None }))
    }

    /// Every organization with its projects: a deployment operator's view. Needs an admin
    /// key (`X-Admin-Key`).
    async fn organizations(&self, ctx: &Context<'_>) -> Result<Vec<Organization>> {
        let who = principal(ctx);
        if !who.admin {
            return Err(ApiError::Forbidden { need: "an admin key", have: who.scope.as_str() });
        }
        let command = amplog_commands::CommandContext::new(who.project_id, who.actor());
        let service = &app(ctx).service;
        let mut conn = service.pool().acquire().await.map_err(|e| ApiError::Database(e.into()))?;
        let ids = audit::stream_ids(&mut conn, "organization").await?;
        drop(conn);
        let mut out = Vec::with_capacity(ids.len());
        for id in ids.iter().filter_map(|id| Uuid::try_parse(id).ok()) {
            let org = service.load::<amplog_domain::organization::Organization>(&command, id).await?.state;
            let mut projects = Vec::with_capacity(org.projects.len());
            for project in &org.projects {
                let state = service.load::<amplog_domain::project::Project>(&command, project.0).await?.state;
                projects.push(ProjectRef { id: project.0, name: state.name });
            }
            out.push(Organization { id, name: org.name, projects: Some(projects) });
        }
        Ok(out)
    }

    /// The project's JWT keys (revoked ones too). Needs an admin key.
    async fn jwt_keys(&self, ctx: &Context<'_>) -> Result<Vec<JwtKey>> {
        let who = principal(ctx);
        who.require(crate::auth::Scope::Admin)?;
        let keys = app(ctx).keys.jwt_keys(who.project_id).await?;
        Ok(keys
            .into_iter()
            .map(|k| JwtKey { kid: k.kid, algorithm: k.algorithm, created_at: k.created_at, revoked_at: k.revoked_at })
            .collect())
    }

    /// A connect session this project made.
    async fn connect_session(&self, ctx: &Context<'_>, id: Uuid) -> Result<ConnectSession> {
        let who = principal(ctx);
        let command = amplog_commands::CommandContext::new(who.project_id, who.actor());
        let state = app(ctx).service.load::<amplog_domain::connect_session::ConnectSession>(&command, id).await?.state;
        let own = state.request.as_ref().is_some_and(|r| who.sees_group(&r.group_ref));
        ConnectSession::of(id, &state).filter(|_| own).ok_or(ApiError::NotFound("connect session"))
    }

    async fn operation(&self, ctx: &Context<'_>, id: Uuid) -> Result<Operation> {
        let doc: Option<OperationDoc> = doc_by_id(db(ctx), id).await?;
        Ok(doc.ok_or(ApiError::NotFound("operation"))?.into())
    }

    /// Operations, newest first.
    #[graphql(complexity = "page_complexity(first, None, child_complexity)")]
    async fn operations(
        &self,
        ctx: &Context<'_>,
        filter: Option<OperationFilter>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Page<Operation>> {
        let filter = filter.unwrap_or_default();
        let db = db(ctx);
        let first = page_size(first)?;
        let after = after.as_deref().map(parse_cursor).transpose()?;
        let q = queries::OperationQuery {
            installation: filter.installation_id,
            status: filter.status.as_deref(),
            op_type: filter.op_type.as_deref(),
            after,
            limit: first + 1,
        };
        let docs = queries::operations(&mut *db.conn().await?, db.project.0, &q).await?;
        Ok(Page::of(docs, first, |d| d.operation_id))
    }

    /// Dead letters: operations that failed after all their attempts, newest first.
    /// `replayDeadLetter` runs one again from its last recorded page.
    #[graphql(complexity = "page_complexity(first, None, child_complexity)")]
    async fn dead_letters(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Page<Operation>> {
        let db = db(ctx);
        let first = page_size(first)?;
        let after = after.as_deref().map(parse_cursor).transpose()?;
        let docs = queries::dead_letters(&mut *db.conn().await?, db.project.0, after, first + 1).await?;
        Ok(Page::of(docs, first, |d| d.operation_id))
    }

    /// Daily usage in `[from, to]` (UTC days), all installations of the project.
    async fn usage(&self, ctx: &Context<'_>, from: Option<NaiveDate>, to: Option<NaiveDate>) -> Result<Vec<UsageDay>> {
        let db = db(ctx);
        let (from, to) = (from.map(|d| d.to_string()), to.map(|d| d.to_string()));
        let days =
            queries::usage_days(&mut *db.conn().await?, db.project.0, None, from.as_deref(), to.as_deref(), 10_000)
                .await?;
        Ok(days.into_iter().map(Into::into).collect())
    }

    /// The monthly billing summary, oldest month first.
    async fn billing(&self, ctx: &Context<'_>) -> Result<Vec<BillingMonth>> {
        let db = db(ctx);
        let months = amplog_projections::usage::monthly(&mut *db.conn().await?, db.project.0).await?;
        Ok(months.into_iter().map(Into::into).collect())
    }

    // ---- auditors -------------------------------------------------------------------

    /// Every event of the installation, its connection and its operations, in log order,
    /// with hashes and actors. Page with `after` (a previous page's `endCursor`).
    #[graphql(complexity = "history_complexity(first)")]
    async fn installation_history(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        after: Option<String>,
        #[graphql(default = 1000)] first: i32,
    ) -> Result<HistoryPage> {
        let range = history_range(after, from, to, first)?;
        let db = db(ctx);
        require_installation(db, id).await?;
        let events = audit::installation_history_in(&mut *db.conn().await?, &id.to_string(), range).await?;
        Ok(history_page(events, first))
    }

    /// The project's configuration history in log order, with actors: API keys made and
    /// revoked, destinations, JWT keys, provider apps, connect sessions, its organization's
    /// record of it, admin keys' uses in it (digests and fingerprints, never secrets). Page
    /// with `after`. Needs an admin key.
    #[graphql(complexity = "history_complexity(first)")]
    async fn project_history(
        &self,
        ctx: &Context<'_>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        after: Option<String>,
        #[graphql(default = 1000)] first: i32,
    ) -> Result<HistoryPage> {
        // Configuration (URLs, scopes, key ids): an admin key's to read.
        principal(ctx).require(crate::auth::Scope::Admin)?;
        principal(ctx).require_key()?;
        let project = principal(ctx).project_id;
        let range = history_range(after, from, to, first)?;
        let events = audit::project_history_in(&mut *db(ctx).conn().await?, project.0, range).await?;
        Ok(history_page(events, first))
    }

    /// The installation, its connection and its operations as they stood at `at` (a time)
    /// or `position` (a log position), replayed from the log.
    #[graphql(complexity = "REPLAY_COMPLEXITY")]
    async fn installation_as_of(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        at: Option<DateTime<Utc>>,
        position: Option<Int64>,
    ) -> Result<InstallationAsOf> {
        super::check_times(&[("at", at)])?;
        let bound = match (at, position) {
            (Some(t), None) => AsOf::Time(t),
            (None, Some(p)) => AsOf::Position(p.0),
            _ => return Err(ApiError::bad_request("invalid_input", "give exactly one of `at` or `position`")),
        };
        let db = db(ctx);
        require_installation(db, id).await?;
        let store = app(ctx).service.store().clone();
        let state = audit::installation_as_of(&mut *db.conn().await?, &store, &id.to_string(), bound)
            .await?
            .ok_or(ApiError::NotFound("installation"))?;
        Ok(InstallationAsOf {
            installation: Json(serde_json::to_value(&state.installation)?),
            connection: state.connection.map(|c| serde_json::to_value(&c)).transpose()?.map(Json),
            operations: state
                .operations
                .iter()
                .map(|(id, op)| {
                    let mut value = serde_json::to_value(op)?;
                    value["id"] = serde_json::Value::String(id.clone());
                    Ok(Json(value))
                })
                .collect::<Result<_, serde_json::Error>>()?,
            events: Int64::from(state.events),
            last_position: (state.last_position).map(Int64::from),
            last_recorded_at: state.last_recorded_at,
        })
    }

    /// Recomputes the hash chains of the installation's streams.
    #[graphql(complexity = "REPLAY_COMPLEXITY")]
    async fn verify_installation(&self, ctx: &Context<'_>, id: Uuid) -> Result<Verification> {
        let db = db(ctx);
        require_installation(db, id).await?;
        let mut conn = db.conn().await?;
        let streams = audit::installation_streams(&mut conn, &id.to_string()).await?;
        let report = audit::verify(&mut conn, Some(&streams), |_| {}).await?;
        Ok(Verification {
            intact: report.is_intact(),
            streams: Int64::from(report.streams),
            events: Int64::from(report.events),
            heads: report
                .heads
                .into_iter()
                .map(|(aggregate_type, aggregate_id, sequence, hash)| StreamHead {
                    aggregate_type,
                    aggregate_id,
                    sequence: Int64::from(sequence),
                    hash,
                })
                .collect(),
            breaks: report.breaks.iter().map(|b| Json(serde_json::to_value(b).unwrap_or_default())).collect(),
        })
    }

    /// The project's destinations (names and URLs; secrets are never shown again).
    async fn destinations(&self, ctx: &Context<'_>) -> Result<Vec<Destination>> {
        principal(ctx).require_key()?;
        let project = principal(ctx).project_id;
        let listed = amplog_commands::destinations::list(app(ctx).service.pool(), project).await?;
        Ok(listed.into_iter().map(|(name, url, disabled)| Destination { name, url, disabled }).collect())
    }

    /// Every notification topic a subscription can name (or match with `group.*`, `*`).
    async fn notification_topics(&self) -> Vec<NotificationTopic> {
        amplog_domain::notification::TOPICS
            .iter()
            .map(|(name, description)| NotificationTopic { name: (*name).into(), description: (*description).into() })
            .collect()
    }

    /// The project's notification subscriptions (an API key's view: project-wide).
    async fn notification_subscriptions(&self, ctx: &Context<'_>) -> Result<Vec<NotificationSubscription>> {
        principal(ctx).require_key()?;
        notification_subscriptions(ctx).await
    }

    /// Notifications queued for the project's subscriptions (or one of them) and what
    /// became of each, newest first; `beforeSeq` pages on.
    async fn notification_deliveries(
        &self,
        ctx: &Context<'_>,
        subscription_id: Option<Uuid>,
        #[graphql(default = 50)] first: i32,
        before_seq: Option<Int64>,
    ) -> Result<Vec<NotificationDelivery>> {
        principal(ctx).require_key()?;
        let db = db(ctx);
        let first = page_size(Some(first))?;
        let before = before_seq.map(|s| s.0);
        let rows =
            amplog_providers::notify::deliveries(&mut *db.conn().await?, db.project, subscription_id, before, first)
                .await?;
        Ok(rows.into_iter().map(NotificationDelivery::from).collect())
    }

    /// Who is asking: the key's project and scope.
    async fn viewer(&self, ctx: &Context<'_>) -> Viewer {
        let p = principal(ctx);
        Viewer {
            project_id: p.project_id.0,
            key_id: p.key_id,
            scope: p.scope.as_str().into(),
            group_ref: p.group.clone(),
            consumer_ref: p.consumer.clone(),
        }
    }
}

#[derive(SimpleObject)]
pub struct NotificationTopic {
    pub name: String,
    /// What happened when it is sent.
    pub description: String,
}

/// A destination subscribed to lifecycle notifications, sent per Standard Webhooks with a
/// `webhook-id` that stays the same on every retry and restart.
#[derive(SimpleObject, Clone, Debug)]
pub struct NotificationSubscription {
    pub id: Uuid,
    pub destination: String,
    /// Topics or patterns (`installation.*`, `*`).
    pub topics: Vec<String>,
    pub created_at: DateTime<Utc>,
}

/// A queued notification and what became of it.
#[derive(SimpleObject, Clone, Debug)]
pub struct NotificationDelivery {
    /// Its place in the queue (newest first; `beforeSeq` pages on).
    pub seq: Int64,
    /// The Standard Webhooks `webhook-id`, the same on every attempt.
    pub webhook_id: String,
    pub subscription_id: Uuid,
    pub destination: String,
    pub topic: String,
    pub installation_id: Option<String>,
    /// The body as signed and sent.
    pub body: Json<serde_json::Value>,
    /// `pending`, `delivered` or `given_up`.
    pub status: String,
    pub attempts: i32,
    /// The endpoint's last HTTP status, and why the last attempt failed.
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub queued_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

impl From<amplog_providers::notify::Delivery> for NotificationDelivery {
    fn from(d: amplog_providers::notify::Delivery) -> Self {
        NotificationDelivery {
            seq: Int64::from(d.seq),
            webhook_id: d.webhook_id,
            subscription_id: d.subscription_id,
            destination: d.destination,
            topic: d.topic,
            installation_id: d.installation_id,
            body: Json(serde_json::from_str(&d.body).unwrap_or(serde_json::Value::Null)),
            status: d.status.into(),
            attempts: d.attempts,
            last_status: d.last_status,
            last_error: d.last_error,
            queued_at: d.queued_at,
            delivered_at: d.delivered_at,
            next_attempt_at: d.next_attempt_at,
        }
    }
}

/// The project's subscriptions, as its stream stands.
pub(super) async fn notification_subscriptions(ctx: &Context<'_>) -> Result<Vec<NotificationSubscription>> {
    let who = principal(ctx);
    let command = amplog_commands::CommandContext::new(who.project_id, who.actor());
    let project = app(ctx).service.load::<amplog_domain::project::Project>(&command, who.project_id.0).await?.state;
    Ok(project
        .notification_subscriptions
        .into_iter()
        .map(|(id, s)| NotificationSubscription {
            id,
            destination: s.destination,
            topics: s.topics,
            created_at: s.created_at,
        })
        .collect())
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Destination {
    pub name: String,
    pub url: String,
    /// Why deliveries to it stopped (it answered 410 Gone); `createDestination` enables it again.
    pub disabled: Option<String>,
}

#[derive(SimpleObject)]
pub struct Viewer {
    pub project_id: Uuid,
    /// The API key's id, or the JWT key's for an end user's token.
    pub key_id: Uuid,
    pub scope: String,
    /// An end user's group and consumer (from the token); none for an API key.
    pub group_ref: Option<String>,
    pub consumer_ref: Option<String>,
}

/// An organization: above projects.
#[derive(SimpleObject)]
pub struct Organization {
    pub id: Uuid,
    pub name: String,
    /// Its projects (for an admin key only).
    pub projects: Option<Vec<ProjectRef>>,
}

#[derive(SimpleObject)]
pub struct ProjectRef {
    pub id: Uuid,
    pub name: String,
}

/// A public key end users' tokens are verified with.
#[derive(SimpleObject)]
pub struct JwtKey {
    /// The `kid` tokens name in their header.
    pub kid: Uuid,
    /// `EdDSA`, `ES256` or `RS256`.
    pub algorithm: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Complexity of a paginated field: its page size times what each item costs.
pub(crate) fn page_complexity(first: Option<i32>, last: Option<i32>, child: usize) -> usize {
    let n = first.or(last).unwrap_or(DEFAULT_PAGE as i32).clamp(0, MAX_PAGE as i32) as usize;
    n.max(1) * child + 1
}

fn page_size(first: Option<i32>) -> Result<i64, ApiError> {
    match first {
        None => Ok(DEFAULT_PAGE as i64),
        Some(n) if (0..=MAX_PAGE as i32).contains(&n) => Ok(n as i64),
        Some(n) => Err(ApiError::bad_request("invalid_input", format!("`first` must be 0 to {MAX_PAGE}, not {n}"))),
    }
}

fn parse_log_cursor(s: &str) -> Result<LogCursor, ApiError> {
    let bad = || ApiError::bad_request("invalid_cursor", format!("`{s}` is not a history cursor"));
    let (xid, position) = s.split_once(':').ok_or_else(bad)?;
    Ok(LogCursor { transaction_id: xid.parse().map_err(|_| bad())?, position: position.parse().map_err(|_| bad())? })
}

/// The installation exists and is the caller's — its project's (from the log: a just-made
/// one too) and, for an end user's token, its group's; otherwise: not found, as any id.
pub async fn require_installation(db: &crate::tenant::TenantDb, id: Uuid) -> Result<(), ApiError> {
    let found: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM events WHERE aggregate_type = 'installation' AND aggregate_id = $1 AND project_id = $2
           AND (amplog_current_group() IS NULL OR (event_type = 'Created' AND payload->>'group_ref' = amplog_current_group()))
         LIMIT 1",
    )
    .bind(id.to_string())
    .bind(db.project.0)
    .fetch_optional(&mut *db.conn().await?)
    .await?;
    found.map(|_| ()).ok_or(ApiError::NotFound("installation"))
}

#[ComplexObject]
impl Operation {
    /// A write's result per record, once a worker wrote them (null for reads).
    async fn write_results(&self, ctx: &Context<'_>) -> Result<Option<Vec<WriteResult>>> {
        if self.op_type != "write" {
            return Ok(None);
        }
        let results: Option<Option<sqlx::types::Json<Vec<WriteResult>>>> =
            sqlx::query_scalar("SELECT results FROM write_batches WHERE operation_id = $1")
                .bind(self.id)
                .fetch_optional(&mut *db(ctx).conn().await?)
                .await?;
        Ok(results.flatten().map(|r| r.0))
    }
}

#[ComplexObject]
impl Installation {
    async fn connection(&self, ctx: &Context<'_>) -> Result<Option<Connection>> {
        Ok(loader(ctx).load_one(ConnectionKey(self.connection_id)).await?.map(Into::into))
    }

    async fn integration(&self, ctx: &Context<'_>) -> Result<Option<Integration>> {
        Ok(loader(ctx).load_one(IntegrationKey(self.integration_id)).await?.map(Into::into))
    }

    /// The installation's operations, newest first.
    #[graphql(complexity = "page_complexity(first, None, child_complexity)")]
    async fn operations(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
        status: Option<String>,
        op_type: Option<String>,
    ) -> Result<Page<Operation>> {
        let first = page_size(first)?;
        let after = after.as_deref().map(parse_cursor).transpose()?;
        let key = OperationsKey { installation: self.id, after, first, status, op_type };
        let (docs, more) = loader(ctx).load_one(key).await?.unwrap_or_default();
        let mut page = Page::of(docs, first, |d| d.operation_id);
        page.page_info.has_next_page = more;
        Ok(page)
    }

    async fn read_states(&self, ctx: &Context<'_>) -> Result<Vec<ReadState>> {
        let docs = loader(ctx).load_one(ReadStatesKey(self.id)).await?.unwrap_or_default();
        Ok(docs.into_iter().map(Into::into).collect())
    }

    async fn usage(&self, ctx: &Context<'_>, from: Option<NaiveDate>, to: Option<NaiveDate>) -> Result<Vec<UsageDay>> {
        let key = UsageKey { installation: self.id, from: from.map(|d| d.to_string()), to: to.map(|d| d.to_string()) };
        let docs = loader(ctx).load_one(key).await?.unwrap_or_default();
        Ok(docs.into_iter().map(Into::into).collect())
    }
}

/// A history page's range: after the cursor, one more than `first` (to know whether a next
/// page exists).
fn history_range(
    after: Option<String>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    first: i32,
) -> Result<HistoryRange> {
    super::check_times(&[("from", from), ("to", to)])?;
    if !(1..=MAX_HISTORY_PAGE).contains(&first) {
        return Err(ApiError::bad_request(
            "invalid_input",
            format!("`first` must be 1 to {MAX_HISTORY_PAGE}; page with `after`"),
        ));
    }
    let after = after.as_deref().map(parse_log_cursor).transpose()?.unwrap_or_default();
    Ok(HistoryRange { after, from, to, limit: first as i64 + 1 })
}

fn history_page(mut events: Vec<amplog_log::RecordedEvent>, first: i32) -> HistoryPage {
    let has_next_page = events.len() > first as usize;
    events.truncate(first as usize);
    let end_cursor = events.last().map(|e| format!("{}:{}", e.transaction_id, e.position));
    HistoryPage { events: events.into_iter().map(AuditEvent::from).collect(), end_cursor, has_next_page }
}

#[derive(SimpleObject)]
pub struct HistoryPage {
    pub events: Vec<AuditEvent>,
    pub end_cursor: Option<String>,
    pub has_next_page: bool,
}

#[derive(SimpleObject)]
pub struct InstallationAsOf {
    /// The aggregates' states, as the domain folds them.
    pub installation: Json<serde_json::Value>,
    pub connection: Option<Json<serde_json::Value>>,
    pub operations: Vec<Json<serde_json::Value>>,
    /// How many events were replayed, and the last one's position and time.
    pub events: Int64,
    pub last_position: Option<Int64>,
    pub last_recorded_at: Option<DateTime<Utc>>,
}

#[derive(SimpleObject)]
pub struct StreamHead {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: Int64,
    pub hash: String,
}

#[derive(SimpleObject)]
pub struct Verification {
    pub intact: bool,
    pub streams: Int64,
    pub events: Int64,
    pub heads: Vec<StreamHead>,
    pub breaks: Vec<Json<serde_json::Value>>,
}
