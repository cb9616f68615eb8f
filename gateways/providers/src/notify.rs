//! Lifecycle notifications to destinations, as the `notifier` leader: a consumer of the log
//! with its own checkpoint. Each batch of events, in one transaction with the checkpoint,
//! keeps the subscriptions (from the project's `NotificationSubscription*` events, so a
//! subscription sees exactly the events after it in the log) and queues one delivery per
//! matching subscription and derived notification (`amplog_streams::notifications`),
//! under a `webhook-id` made from the subscription, the event and the topic: a restart
//! or a rebuild queues nothing twice. Queued deliveries go out signed per Standard
//! Webhooks, in order per subscription (each subscription on its own task, so a slow
//! endpoint holds back only itself), retried with backoff until delivered (at least once)
//! or given up after `max_attempts`; a 410 disables the destination, and a destination that
//! is gone or disabled has its queue given up. Delivered and given-up rows are kept 30 days.

use crate::webhook;
use crate::SyncError;
use amplog_commands::{destinations, CommandContext, CommandService};
use amplog_domain::notification::matches;
use amplog_domain::project::{Project, ProjectEvent};
use amplog_domain::ProjectId;
use amplog_log::leader::{run_as_leader, Leadership};
use amplog_log::LogReader;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;
use uuid::Uuid;

/// The notifier's singleton and checkpoint name.
pub const NOTIFIER: &str = "notifier";

/// How deliveries are retried.
#[derive(Clone, Debug)]
pub struct NotifyPolicy {
    pub max_attempts: i32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// How long the notifier waits for new events before it looks at due retries.
    pub poll: Duration,
}

impl Default for NotifyPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 20,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(3600),
            poll: Duration::from_millis(500),
        }
    }
}

#[derive(Clone)]
pub struct Notifier {
    service: CommandService,
    /// For the records of pushed changes: fetched when their notification goes out.
    connectors: crate::connector::Connectors,
    tokens: crate::tokens::Tokens,
    http: reqwest::Client,
    holder: String,
    pub policy: NotifyPolicy,
}

/// One queued delivery.
struct Due {
    webhook_id: String,
    project_id: Uuid,
    destination: String,
    topic: String,
    body: String,
    attempts: i32,
}

/// The topic of a pushed change's delivery (to the object's destination, queued per
/// installation).
pub const RECORD_CHANGED: &str = "record.changed";

/// Subscriptions sending at once, each on its own task (a slow endpoint holds only its own).
const SENDERS: usize = 32;
/// Deliveries one sending task takes, in queue order.
const RUN: i64 = 50;
/// Delivered and given-up notifications are kept this long.
const RETENTION_DAYS: i32 = 30;

impl Notifier {
    pub fn new(service: CommandService, connectors: crate::connector::Connectors, holder: impl Into<String>) -> Self {
        let http = connectors.egress().client().build().expect("the HTTP client builds");
        let tokens = crate::tokens::Tokens::new(service.clone());
        Self { service, connectors, tokens, http, holder: holder.into(), policy: NotifyPolicy::default() }
    }

    /// Runs until `stop` resolves, leading whenever it can.
    pub async fn run(&self, stop: impl Future<Output = ()>) {
        let pool = self.service.pool().clone();
        let pause = |_: &SyncError| Duration::from_secs(1);
        run_as_leader(&pool, NOTIFIER, &self.holder, stop, pause, |l| self.lead(l)).await;
    }

    async fn lead(&self, mut leadership: Leadership) -> Result<(), SyncError> {
        let pool = self.service.pool().clone();
        let start = LogReader::checkpoint(&mut *pool.acquire().await?, NOTIFIER).await?;
        let mut subscription = LogReader::new(pool.clone()).subscribe(start).await?;
        // Sending tasks by subscription; dropped (aborted) with the leadership: an attempt cut
        // off is made again by the next leader, under the same id.
        let mut sending: tokio::task::JoinSet<(Uuid, Result<(), SyncError>)> = Default::default();
        let mut busy: std::collections::HashSet<Uuid> = Default::default();
        let mut pruned = std::time::Instant::now();
        loop {
            let batch = subscription.next_batch_within(self.policy.poll).await?;
            leadership.alive().await?;
            if let Some(last) = batch.last() {
                let mut tx = amplog_log::tx::begin(&pool).await?;
                if !leadership.fence(&mut tx).await? {
                    return Err(SyncError::Fenced(NOTIFIER.into()));
                }
                let mut queued = 0;
                for event in &batch {
                    queued += self.queue(&mut tx, event).await?;
                }
                LogReader::save_checkpoint(&mut tx, NOTIFIER, last.cursor()).await?;
                tx.commit().await?;
                if queued > 0 {
                    tracing::debug!(queued, "notifications queued");
                }
            }
            while let Some(done) = sending.try_join_next() {
                let (subscription, result) = done.map_err(|e| SyncError::JobTask(e.to_string()))?;
                busy.remove(&subscription);
                if let Err(error) = result {
                    tracing::warn!(%subscription, %error, "sending notifications failed; retrying");
                }
            }
            if busy.len() < SENDERS {
                for (subscription, rows) in self.due(&busy, SENDERS - busy.len()).await? {
                    busy.insert(subscription);
                    let notifier = self.clone();
                    sending.spawn(async move { (subscription, notifier.deliver_in_order(rows).await) });
                }
            }
            if pruned.elapsed() > Duration::from_secs(3600) {
                pruned = std::time::Instant::now();
                sqlx::query(
                    "DELETE FROM notification_deliveries
                     WHERE delivered_at < now() - make_interval(days => $1) OR given_up_at < now() - make_interval(days => $1)",
                )
                .bind(RETENTION_DAYS)
                .execute(&pool)
                .await?;
            }
        }
    }

    /// Keeps the subscriptions an event changes, and queues the deliveries it makes.
    async fn queue(&self, tx: &mut sqlx::PgConnection, event: &amplog_log::RecordedEvent) -> Result<usize, SyncError> {
        let store = self.service.store();
        if event.aggregate_type == "project" && event.event_type.starts_with("NotificationSubscription") {
            let Some(project) = event.project_id.or_else(|| event.aggregate_id.parse().ok()) else { return Ok(0) };
            match store.decode::<Project>(&event.event_type, &event.event_version, event.payload.clone())? {
                ProjectEvent::NotificationSubscriptionCreated { subscription_id, destination, topics, .. } => {
                    sqlx::query(
                        "INSERT INTO notification_subscriptions (subscription_id, project_id, destination, topics)
                         VALUES ($1, $2, $3, $4) ON CONFLICT (subscription_id) DO NOTHING",
                    )
                    .bind(subscription_id)
                    .bind(project)
                    .bind(&destination)
                    .bind(&topics)
                    .execute(&mut *tx)
                    .await?;
                }
                ProjectEvent::NotificationSubscriptionDeleted { subscription_id, .. } => {
                    sqlx::query("DELETE FROM notification_subscriptions WHERE subscription_id = $1")
                        .bind(subscription_id)
                        .execute(&mut *tx)
                        .await?;
                    // What it had queued and not delivered is not sent.
                    sqlx::query(
                        "UPDATE notification_deliveries SET given_up_at = now(), last_error = 'the subscription was deleted'
                         WHERE subscription_id = $1 AND delivered_at IS NULL AND given_up_at IS NULL",
                    )
                    .bind(subscription_id)
                    .execute(&mut *tx)
                    .await?;
                }
                _ => {}
            }
            return Ok(0);
        }
        self.route(tx, event).await?;
        if event.aggregate_type == "change" {
            return self.queue_change(tx, event).await;
        }
        if !amplog_streams::notifications::notifies(event) {
            return Ok(0);
        }
        let derived = amplog_streams::notifications::derive(&mut *tx, store, event).await?;
        let Some(first) = derived.first() else { return Ok(0) };
        let subscriptions: Vec<(Uuid, String, Vec<String>)> = sqlx::query_as(
            "SELECT subscription_id, destination, topics FROM notification_subscriptions
             WHERE project_id = $1 ORDER BY subscription_id",
        )
        .bind(first.project_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut queued = 0;
        for notification in &derived {
            let topic = &notification.notification.topic;
            for (subscription, destination, topics) in &subscriptions {
                if !topics.iter().any(|pattern| matches(pattern, topic)) {
                    continue;
                }
                let webhook_id = format!("ntf_{}", Uuid::new_v5(subscription, notification.id().as_bytes()).simple());
                let body = serde_json::to_string(&notification.notification).expect("notifications serialise");
                queued += sqlx::query(
                    "INSERT INTO notification_deliveries
                       (webhook_id, project_id, subscription_id, destination, topic, installation_id, event_id, body)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (webhook_id) DO NOTHING",
                )
                .bind(&webhook_id)
                .bind(notification.project_id)
                .bind(subscription)
                .bind(destination)
                .bind(topic)
                .bind(notification.installation_id.map(|i| i.to_string()))
                .bind(notification.event_id)
                .bind(&body)
                .execute(&mut *tx)
                .await?
                .rows_affected() as usize;
            }
        }
        Ok(queued)
    }

    /// Keeps where pushed changes go: each installation's connection, revision and enabled
    /// objects, and each revision's subscribing objects.
    async fn route(&self, tx: &mut sqlx::PgConnection, event: &amplog_log::RecordedEvent) -> Result<(), SyncError> {
        use amplog_domain::installation::{Installation, InstallationEvent};
        use amplog_domain::integration::{Integration, IntegrationEvent};
        let store = self.service.store();
        let (t, v) = (event.event_type.as_str(), event.event_version.as_str());
        let id: Uuid = event.aggregate_id.parse().unwrap_or_default();
        match (event.aggregate_type.as_str(), t) {
            ("integration", "RevisionDeployed") => {
                let IntegrationEvent::RevisionDeployed { revision, objects, .. } =
                    store.decode::<Integration>(t, v, event.payload.clone())?
                else {
                    return Ok(());
                };
                for object in objects.iter().filter(|o| !o.subscribe.is_empty()) {
                    let kinds: Vec<String> = object.subscribe.iter().map(name_of).collect();
                    sqlx::query(
                        "INSERT INTO change_subscriptions (integration_id, revision, object, kinds, destination)
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    )
                    .bind(id)
                    .bind(revision as i32)
                    .bind(&object.name)
                    .bind(&kinds)
                    .bind(object.destination.as_deref().unwrap_or("default"))
                    .execute(&mut *tx)
                    .await?;
                }
            }
            ("installation", "Created" | "ConfigUpdated" | "Paused" | "Unpaused" | "Deleted") => {
                let enabled = |objects: &BTreeMap<String, amplog_domain::installation::ObjectConfig>| -> Vec<String> {
                    objects.iter().filter(|(_, c)| c.enabled).map(|(n, _)| n.clone()).collect()
                };
                match store.decode::<Installation>(t, v, event.payload.clone())? {
                    InstallationEvent::Created { integration_id, revision, connection_id, objects, .. } => {
                        sqlx::query(
                            "INSERT INTO change_routes
                               (installation_id, project_id, connection_id, integration_id, revision, objects)
                             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                        )
                        .bind(id)
                        .bind(event.project_id.unwrap_or_default())
                        .bind(connection_id.0)
                        .bind(integration_id.0)
                        .bind(revision as i32)
                        .bind(enabled(&objects))
                        .execute(&mut *tx)
                        .await?;
                    }
                    InstallationEvent::ConfigUpdated { revision, objects, .. } => {
                        sqlx::query("UPDATE change_routes SET revision = $2, objects = $3 WHERE installation_id = $1")
                            .bind(id)
                            .bind(revision as i32)
                            .bind(enabled(&objects))
                            .execute(&mut *tx)
                            .await?;
                    }
                    InstallationEvent::Paused { .. } | InstallationEvent::Unpaused { .. } => {
                        sqlx::query("UPDATE change_routes SET paused = $2 WHERE installation_id = $1")
                            .bind(id)
                            .bind(t == "Paused")
                            .execute(&mut *tx)
                            .await?;
                    }
                    InstallationEvent::Deleted { .. } => {
                        sqlx::query("DELETE FROM change_routes WHERE installation_id = $1")
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    InstallationEvent::OperationRequested { .. } => {}
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Queues a pushed change for each installation of its connection whose revision
    /// subscribes its object to its kind: per installation (so in order per record), under
    /// an id from the installation and the change.
    async fn queue_change(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &amplog_log::RecordedEvent,
    ) -> Result<usize, SyncError> {
        use amplog_domain::change::{Change, ChangeEvent};
        let ChangeEvent::Received { facts, .. } =
            self.service.store().decode::<Change>(&event.event_type, &event.event_version, event.payload.clone())?;
        let kind = name_of(&facts.kind);
        let targets: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT r.installation_id, s.destination FROM change_routes r
             JOIN change_subscriptions s ON s.integration_id = r.integration_id AND s.revision = r.revision
             WHERE r.connection_id = $1 AND r.project_id = $2 AND NOT r.paused AND s.object = $3
               AND $3 = ANY (r.objects) AND $4 = ANY (s.kinds)
             ORDER BY r.installation_id",
        )
        .bind(facts.connection_id.0)
        .bind(facts.project_id.0)
        .bind(&facts.object)
        .bind(&kind)
        .fetch_all(&mut *tx)
        .await?;
        let mut queued = 0;
        for (installation, destination) in targets {
            let body = serde_json::json!({
                "type": RECORD_CHANGED,
                "timestamp": event.recorded_at,
                "data": {
                    "installation_id": installation,
                    "connection_id": facts.connection_id,
                    "object": facts.object,
                    "record_id": facts.record_id,
                    "kind": kind,
                    "properties": facts.properties,
                    "occurred_at": facts.occurred_at,
                    "change_id": event.aggregate_id,
                },
            });
            let webhook_id = format!("chg_{}", Uuid::new_v5(&installation, event.event_id.as_bytes()).simple());
            queued += sqlx::query(
                "INSERT INTO notification_deliveries
                   (webhook_id, project_id, subscription_id, destination, topic, installation_id, event_id, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (webhook_id) DO NOTHING",
            )
            .bind(&webhook_id)
            .bind(facts.project_id.0)
            .bind(installation)
            .bind(&destination)
            .bind(RECORD_CHANGED)
            .bind(installation.to_string())
            .bind(event.event_id)
            .bind(body.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected() as usize;
        }
        Ok(queued)
    }

    /// The subscriptions (not sending now) whose oldest undelivered notification is due,
    /// each with its next `RUN` undelivered notifications in queue order.
    async fn due(
        &self,
        busy: &std::collections::HashSet<Uuid>,
        limit: usize,
    ) -> Result<Vec<(Uuid, Vec<Due>)>, SyncError> {
        type Row = (Uuid, String, Uuid, String, String, String, i32);
        let busy: Vec<Uuid> = busy.iter().copied().collect();
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT head.subscription_id, d.webhook_id, d.project_id, d.destination, d.topic, d.body, d.attempts
             FROM (SELECT subscription_id FROM (
                       SELECT DISTINCT ON (subscription_id) subscription_id, next_attempt_at
                       FROM notification_deliveries
                       WHERE delivered_at IS NULL AND given_up_at IS NULL AND NOT (subscription_id = ANY($1))
                       ORDER BY subscription_id, seq) AS first
                   WHERE first.next_attempt_at <= now() ORDER BY first.next_attempt_at LIMIT $2) AS head
             CROSS JOIN LATERAL (
                 SELECT webhook_id, project_id, destination, topic, body, attempts, seq FROM notification_deliveries
                 WHERE subscription_id = head.subscription_id AND delivered_at IS NULL AND given_up_at IS NULL
                 ORDER BY seq LIMIT $3) AS d
             ORDER BY head.subscription_id, d.seq",
        )
        .bind(&busy)
        .bind(limit as i64)
        .bind(RUN)
        .fetch_all(self.service.pool())
        .await?;
        let mut by_subscription: BTreeMap<Uuid, Vec<Due>> = BTreeMap::new();
        for (subscription, webhook_id, project_id, destination, topic, body, attempts) in rows {
            let row = Due { webhook_id, project_id, destination, topic, body, attempts };
            by_subscription.entry(subscription).or_default().push(row);
        }
        Ok(by_subscription.into_iter().collect())
    }

    /// Sends a subscription's run in order, stopping at its first failure (which waits for
    /// its retry with the later ones behind it).
    async fn deliver_in_order(&self, rows: Vec<Due>) -> Result<(), SyncError> {
        let pool = self.service.pool();
        let Some(first) = rows.first() else { return Ok(()) };
        let project = ProjectId(first.project_id);
        let name = first.destination.clone();
        let unusable = match destinations::get(pool, self.service.credentials(), project, &name).await {
            Ok(Some(d)) if d.disabled.is_none() => Ok(d),
            Ok(Some(d)) => Err(format!("the destination is disabled ({})", d.disabled.unwrap_or_default())),
            Ok(None) => Err("the destination does not exist".to_string()),
            Err(error) => {
                tracing::error!(destination = %name, %error, "a destination cannot be read");
                Err(format!("the destination cannot be read: {}", error.code()))
            }
        };
        let destination = match unusable {
            Ok(destination) => destination,
            Err(why) => {
                // Nothing can be sent to it: its queued notifications are given up, with why.
                let ids: Vec<&str> = rows.iter().map(|r| r.webhook_id.as_str()).collect();
                sqlx::query(
                    "UPDATE notification_deliveries SET given_up_at = now(), last_error = $2 WHERE webhook_id = ANY($1)",
                )
                .bind(&ids)
                .bind(&why)
                .execute(pool)
                .await?;
                return Ok(());
            }
        };
        for row in rows {
            let attempt = row.attempts + 1;
            let body = match row.topic.as_str() {
                RECORD_CHANGED => self.with_record(project, &row.body).await,
                _ => Ok(row.body.clone()),
            };
            let outcome = match body {
                Ok(body) => {
                    let (url, secret) = (&destination.url, &destination.secret.0);
                    webhook::deliver(&self.http, url, secret, &row.webhook_id, body.as_bytes()).await
                }
                Err(why) => webhook::Attempted { status: None, error: Some(why) },
            };
            amplog_log::telemetry::metrics().webhook_attempt(
                amplog_log::telemetry::WebhookKind::Notification,
                &format!("{}/{}", project.0, destination.name),
                outcome.delivered(),
            );
            if outcome.delivered() {
                sqlx::query(
                    "UPDATE notification_deliveries SET delivered_at = now(), attempts = $2, last_status = $3,
                            last_error = NULL WHERE webhook_id = $1",
                )
                .bind(&row.webhook_id)
                .bind(attempt)
                .bind(outcome.status.map(i32::from))
                .execute(pool)
                .await?;
                continue;
            }
            let gone = outcome.status == Some(410);
            let give_up = gone || attempt >= self.policy.max_attempts;
            let seed = Uuid::new_v5(&Uuid::NAMESPACE_OID, row.webhook_id.as_bytes()).as_u128() as u64;
            let delay = crate::worker::backoff(self.policy.backoff, self.policy.max_backoff, attempt as u32, seed);
            sqlx::query(
                "UPDATE notification_deliveries SET attempts = $2, last_status = $3, last_error = $4,
                        next_attempt_at = now() + $5 * interval '1 millisecond',
                        given_up_at = CASE WHEN $6 THEN now() END
                 WHERE webhook_id = $1",
            )
            .bind(&row.webhook_id)
            .bind(attempt)
            .bind(outcome.status.map(i32::from))
            .bind(&outcome.error)
            .bind(delay.as_millis() as i64)
            .bind(give_up)
            .execute(pool)
            .await?;
            if gone {
                let reason = format!("answered 410 Gone to notification {}", row.webhook_id);
                let ctx = CommandContext::new(project, format!("notifier:{}", self.holder));
                if let Err(error) = self.service.disable_destination(&ctx, &name, &reason).await {
                    tracing::warn!(destination = %name, %error, "disabling the destination failed");
                }
            }
            tracing::info!(webhook_id = %row.webhook_id, attempt, error = ?outcome.error, "notification not delivered");
            return Ok(());
        }
        Ok(())
    }
}

impl Notifier {
    /// A pushed change's body with the record as the provider has it now (`null` once
    /// deleted or gone); an `Err` (the provider unreachable, the connection needing
    /// re-auth) is a failed attempt, retried like a refused delivery.
    async fn with_record(&self, project: ProjectId, body: &str) -> Result<String, String> {
        let mut body: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
        let data = &body["data"];
        let text = |key: &str| data[key].as_str().unwrap_or_default().to_string();
        let (object, record_id, kind) = (text("object"), text("record_id"), text("kind"));
        let connection: Uuid =
            text("connection_id").parse().map_err(|_| "a change without its connection".to_string())?;
        let record = match kind.as_str() {
            "deleted" => serde_json::Value::Null,
            _ => {
                let ctx = CommandContext::new(project, format!("notifier:{}", self.holder));
                let loaded = self
                    .service
                    .load::<amplog_domain::connection::Connection>(&ctx, connection)
                    .await
                    .map_err(|e| e.to_string())?;
                let connector = self
                    .connectors
                    .get(&loaded.state.provider)
                    .ok_or_else(|| format!("no connector for provider {}", loaded.state.provider))?;
                let id = amplog_domain::ConnectionId(connection);
                let tokens = self.tokens.access_token(&ctx, id, &connector, None).await.map_err(|e| e.message)?;
                let fetched = connector.get_record(&tokens, &object, &record_id).await.map_err(|e| e.message)?;
                fetched.unwrap_or(serde_json::Value::Null)
            }
        };
        body["data"]["record"] = record;
        Ok(body.to_string())
    }
}

fn name_of<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// A queued notification and what became of it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub seq: i64,
    pub webhook_id: String,
    pub subscription_id: Uuid,
    pub destination: String,
    pub topic: String,
    pub installation_id: Option<String>,
    pub body: String,
    /// `pending`, `delivered` or `given_up`.
    pub status: &'static str,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub queued_at: chrono::DateTime<chrono::Utc>,
    pub delivered_at: Option<chrono::DateTime<chrono::Utc>>,
    pub next_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The project's queued notifications, newest first (before `before`, a `seq`), on the
/// caller's connection (the API's: row-level security keeps it to its project).
pub async fn deliveries(
    conn: &mut sqlx::PgConnection,
    project: ProjectId,
    subscription: Option<Uuid>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Delivery>, sqlx::Error> {
    type Row = (
        i64,
        String,
        Uuid,
        String,
        String,
        Option<String>,
        String,
        i32,
        Option<i32>,
        Option<String>,
        chrono::DateTime<chrono::Utc>,
        Option<chrono::DateTime<chrono::Utc>>,
        chrono::DateTime<chrono::Utc>,
        Option<chrono::DateTime<chrono::Utc>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT seq, webhook_id, subscription_id, destination, topic, installation_id, body, attempts, last_status,
                last_error, queued_at, delivered_at, next_attempt_at, given_up_at
         FROM notification_deliveries
         WHERE project_id = $1 AND ($2::uuid IS NULL OR subscription_id = $2) AND ($3::bigint IS NULL OR seq < $3)
         ORDER BY project_id, seq DESC LIMIT $4",
    )
    .bind(project.0)
    .bind(subscription)
    .bind(before)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let status = match (r.11, r.13) {
                (Some(_), _) => "delivered",
                (None, Some(_)) => "given_up",
                (None, None) => "pending",
            };
            Delivery {
                seq: r.0,
                webhook_id: r.1,
                subscription_id: r.2,
                destination: r.3,
                topic: r.4,
                installation_id: r.5,
                body: r.6,
                status,
                attempts: r.7,
                last_status: r.8,
                last_error: r.9,
                queued_at: r.10,
                delivered_at: r.11,
                next_attempt_at: (status == "pending").then_some(r.12),
            }
        })
        .collect())
}
