//! `POST /v1/providers/{provider}/webhooks`: changes a provider pushes, HubSpot-style (a
//! JSON array of change events, signed v3). With `?project={id}` the project's provider app
//! signs them; without, the deployment's own client (its connections in every project).
//! The body is bounded, the timestamp window and the signature are checked before it is
//! parsed (401, nothing stored), each change is attributed to the connections of the
//! account it names (`portalId`), recorded as its own stream (a change sent twice is
//! recorded once), and only then acknowledged.

use crate::error::ApiError;
use crate::state::AppState;
use amplog_commands::CommandContext;
use amplog_domain::change::{ChangeFacts, ChangeKind};
use amplog_domain::{ConnectionId, ProjectId};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use uuid::Uuid;

/// The largest delivery, and the most changes in one.
const BODY_MAX: usize = 1024 * 1024;
const CHANGES_MAX: usize = 1000;
/// How far a delivery's timestamp may be from now (HubSpot's own rule: five minutes).
const WINDOW_MS: i64 = 5 * 60 * 1000;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/providers/{provider}/webhooks", post(receive))
        .layer(DefaultBodyLimit::max(BODY_MAX))
        .with_state(state)
}

#[derive(Deserialize)]
struct Target {
    project: Option<Uuid>,
}

/// One change event as HubSpot sends it (ids may come as numbers or strings).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderChange {
    event_id: Value,
    portal_id: Value,
    object_id: Value,
    subscription_type: String,
    occurred_at: i64,
    #[serde(default)]
    property_name: Option<String>,
}

/// An id as text: 1 to 256 characters, no control characters (what a change may record).
fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The object and the kind of change a `subscriptionType` (`contact.propertyChange`) names;
/// none for kinds not delivered (merges, associations, ...).
fn kind_of(subscription_type: &str) -> Option<(String, ChangeKind)> {
    let (object, kind) = subscription_type.split_once('.')?;
    let object = match object {
        "contact" => "contacts",
        "company" => "companies",
        "deal" => "deals",
        "ticket" => "tickets",
        _ => return None,
    };
    let kind = match kind {
        "creation" => ChangeKind::Created,
        "propertyChange" => ChangeKind::Updated,
        "deletion" => ChangeKind::Deleted,
        _ => return None,
    };
    Some((object.into(), kind))
}

async fn receive(
    State(state): State<Arc<AppState>>,
    Path(provider): Path<String>,
    Query(target): Query<Target>,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    // Refused from its declared length before a byte is read; a chunked body is cut at the
    // limit as it is read.
    let declared = headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_MAX as u64) {
        return Err(ApiError::TooLarge(BODY_MAX));
    }
    let connector = state.config.connectors.get(&provider).ok_or(ApiError::NotFound("provider"))?;
    // Whose client signs: the project's provider app, or the deployment's.
    let secret = match target.project {
        Some(project) => {
            let ctx = CommandContext::new(ProjectId(project), format!("provider:{provider}"));
            let app = state.service.provider_client(&ctx, &provider).await?;
            app.ok_or(ApiError::NotFound("provider app"))?.client_secret.0
        }
        None => connector.app.client_secret.clone(),
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(signature), Some(timestamp)) = (header("x-hubspot-signature-v3"), header("x-hubspot-request-timestamp"))
    else {
        return Err(ApiError::WebhookRefused("webhook_signature", "the signature headers are missing".into()));
    };
    let timestamp: i64 = timestamp
        .parse()
        .map_err(|_| ApiError::WebhookRefused("webhook_stale", "the timestamp is not a number".into()))?;
    if (chrono::Utc::now().timestamp_millis() - timestamp).abs() > WINDOW_MS {
        return Err(ApiError::WebhookRefused("webhook_stale", "the timestamp is more than 5 minutes away".into()));
    }
    // A declared length is within the limit: failing, the body was cut short; undeclared
    // (chunked), it went past the limit.
    let body = axum::body::to_bytes(body, BODY_MAX).await.map_err(|e| match declared {
        None => ApiError::TooLarge(BODY_MAX),
        Some(_) => ApiError::bad_request("invalid_webhook", format!("the body could not be read: {e}")),
    })?;
    let path = uri.path_and_query().map(axum::http::uri::PathAndQuery::as_str).unwrap_or("/");
    let url = format!("{}{path}", state.public_url);
    if !amplog_providers::webhook::hubspot_v3_matches(&secret, "POST", &url, &body, timestamp, signature) {
        return Err(ApiError::WebhookRefused("webhook_signature", "the signature does not match".into()));
    }
    // Authentic from here on; still bounded before it is trusted.
    let changes: Vec<ProviderChange> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_webhook", format!("not a list of change events: {e}")))?;
    if changes.len() > CHANGES_MAX {
        return Err(ApiError::bad_request("invalid_webhook", format!("at most {CHANGES_MAX} changes per delivery")));
    }
    let accounts: Vec<String> = changes.iter().filter_map(|c| id_text(&c.portal_id)).collect();
    let rows: Vec<(String, Uuid, Uuid)> = sqlx::query_as(
        "SELECT account_id, project_id, connection_id FROM connection_accounts
         WHERE provider = $1 AND account_id = ANY($2) AND ($3::uuid IS NULL OR project_id = $3)",
    )
    .bind(&provider)
    .bind(&accounts)
    .bind(target.project)
    .fetch_all(state.service.pool())
    .await?;
    // A revoked connection hears nothing more.
    let mut rows = rows;
    let mut live = std::collections::BTreeMap::new();
    for (_, project, connection) in &rows {
        if !live.contains_key(connection) {
            let ctx = CommandContext::new(ProjectId(*project), format!("provider:{provider}"));
            let state = state.service.load::<amplog_domain::connection::Connection>(&ctx, *connection).await?.state;
            let revoked = state.status == amplog_domain::connection::ConnectionStatus::Revoked;
            live.insert(*connection, state.exists && !revoked);
        }
    }
    rows.retain(|(_, _, connection)| live.get(connection) == Some(&true));
    let mut facts = Vec::new();
    let mut ignored = 0;
    for change in &changes {
        let (Some(account), Some(record), Some(event)) =
            (id_text(&change.portal_id), id_text(&change.object_id), id_text(&change.event_id))
        else {
            // Authentic but unusable (no ids, control characters): acknowledged and skipped,
            // so the provider does not retry the whole batch forever.
            ignored += 1;
            continue;
        };
        let Some((object, kind)) = kind_of(&change.subscription_type) else {
            ignored += 1;
            continue;
        };
        let Some(occurred_at) = chrono::DateTime::from_timestamp_millis(change.occurred_at) else {
            ignored += 1;
            continue;
        };
        let owners: Vec<&(String, Uuid, Uuid)> = rows.iter().filter(|(a, ..)| *a == account).collect();
        if owners.is_empty() {
            ignored += 1;
        }
        for (_, project, connection) in owners {
            facts.push(ChangeFacts {
                project_id: ProjectId(*project),
                connection_id: ConnectionId(*connection),
                object: object.clone(),
                record_id: record.clone(),
                kind,
                properties: change
                    .property_name
                    .iter()
                    .filter(|p| !p.is_empty() && p.len() <= 256 && !p.chars().any(char::is_control))
                    .cloned()
                    .collect(),
                provider_event_id: event.clone(),
                occurred_at,
            });
        }
    }
    let new = state.service.record_changes(&format!("provider:{provider}"), &facts).await?;
    Ok(Json(json!({"received": changes.len(), "recorded": new, "ignored": ignored})).into_response())
}
