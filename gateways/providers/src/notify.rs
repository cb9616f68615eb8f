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
    http: reqwest::Client,
    holder: String,
    pub policy: NotifyPolicy,
}

/// One queued delivery.
struct Due {
    webhook_id: String,
    project_id: Uuid,
    destination: String,
    body: String,
    attempts: i32,
}

/// Subscriptions sending at once, each on its own task (a slow endpoint holds only its own).
const SENDERS: usize = 32;
/// Deliveries one sending task takes, in queue order.
const RUN: i64 = 50;
/// Delivered and given-up notifications are kept this long.
const RETENTION_DAYS: i32 = 30;

impl Notifier {
    pub fn new(service: CommandService, egress: crate::egress::Egress, holder: impl Into<String>) -> Self {
        let http = egress.client().build().expect("the HTTP client builds");
        Self { service, http, holder: holder.into(), policy: NotifyPolicy::default() }
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
                let mut tx = pool.begin().await?;
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

    /// The subscriptions (not sending now) whose oldest undelivered notification is due,
    /// each with its next `RUN` undelivered notifications in queue order.
    async fn due(
        &self,
        busy: &std::collections::HashSet<Uuid>,
        limit: usize,
    ) -> Result<Vec<(Uuid, Vec<Due>)>, SyncError> {
        type Row = (Uuid, String, Uuid, String, String, i32);
        let busy: Vec<Uuid> = busy.iter().copied().collect();
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT head.subscription_id, d.webhook_id, d.project_id, d.destination, d.body, d.attempts
             FROM (SELECT subscription_id FROM (
                       SELECT DISTINCT ON (subscription_id) subscription_id, next_attempt_at
                       FROM notification_deliveries
                       WHERE delivered_at IS NULL AND given_up_at IS NULL AND NOT (subscription_id = ANY($1))
                       ORDER BY subscription_id, seq) AS first
                   WHERE first.next_attempt_at <= now() ORDER BY first.next_attempt_at LIMIT $2) AS head
             CROSS JOIN LATERAL (
                 SELECT webhook_id, project_id, destination, body, attempts, seq FROM notification_deliveries
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
        for (subscription, webhook_id, project_id, destination, body, attempts) in rows {
            let row = Due { webhook_id, project_id, destination, body, attempts };
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
            let outcome = webhook::deliver(
                &self.http,
                &destination.url,
                &destination.secret.0,
                &row.webhook_id,
                row.body.as_bytes(),
            )
            .await;
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
