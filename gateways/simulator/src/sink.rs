//! The verifying webhook sink: a receiver that checks Standard Webhooks signatures and keeps
//! what it got (for the tests, the benchmarks and the demo).

use amplog_providers::webhook::verify;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// A delivery byte for byte, for checks by other implementations of the signature.
#[derive(Clone, Debug, Default)]
pub struct RawDelivery {
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// One delivery as a sink received it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Received {
    pub webhook_id: String,
    pub installation_id: String,
    pub object: String,
    pub operation_id: String,
    pub page: u64,
    pub record_ids: Vec<String>,
    /// Each record's `idempotencyKey`, in the same order.
    #[serde(default)]
    pub record_keys: Vec<String>,
    /// The latest `updatedAt` among the page's records.
    pub max_updated: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Default)]
struct SinkState {
    secret: String,
    /// Answer 503 to this many requests before accepting.
    fail_next: u64,
    /// Statuses to answer the next requests with, in order (a 3xx points at `/elsewhere`).
    answer_next: std::collections::VecDeque<u16>,
    /// Requests that arrived at `/elsewhere` (followed redirects), with or without a body.
    redirected: u64,
    /// The last accepted delivery as it arrived: its Standard Webhooks headers and body.
    last_raw: Option<RawDelivery>,
    refused: u64,
    rejected_signatures: u64,
    received: Vec<Received>,
    /// Accepted notifications (`{type, timestamp, data}` bodies), as they arrived.
    notifications: Vec<RawDelivery>,
}

/// What a sink has seen, by (installation, object).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SinkReport {
    pub deliveries: usize,
    pub distinct_webhook_ids: usize,
    pub duplicate_deliveries: usize,
    pub records: usize,
    pub distinct_records: usize,
    pub refused: u64,
    pub rejected_signatures: u64,
    pub redirected: u64,
}

/// A webhook receiver that verifies signatures and keeps what it got. `POST /hooks/{name}`.
#[derive(Clone)]
pub struct Sink {
    state: Arc<Mutex<SinkState>>,
}

impl Sink {
    pub fn new(secret: &str) -> Sink {
        Sink { state: Arc::new(Mutex::new(SinkState { secret: secret.into(), ..SinkState::default() })) }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/hooks/{name}", post(receive))
            .route("/hooks", get(report))
            .route("/elsewhere", axum::routing::any(elsewhere))
            .with_state(self.clone())
    }

    /// Serves on `addr` until the returned handle is aborted.
    pub async fn serve(&self, addr: SocketAddr) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = self.router();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((addr, task))
    }

    /// Refuse the next `n` deliveries with 503.
    pub fn fail_next(&self, n: u64) {
        self.state.lock().expect("sink").fail_next = n;
    }

    /// Answer the next requests with these statuses, in order (redirects to `/elsewhere`,
    /// which answers 200 to anything, as a careless receiver would).
    pub fn answer_next(&self, statuses: &[u16]) {
        self.state.lock().expect("sink").answer_next.extend(statuses);
    }

    /// The notifications it accepted, in arrival order, as they arrived.
    pub fn notifications(&self) -> Vec<RawDelivery> {
        self.state.lock().expect("sink").notifications.clone()
    }

    /// The last delivery it accepted, as it arrived.
    pub fn last_raw(&self) -> Option<RawDelivery> {
        self.state.lock().expect("sink").last_raw.clone()
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().expect("sink").received.clone()
    }

    pub fn report(&self) -> SinkReport {
        let state = self.state.lock().expect("sink");
        let ids: HashSet<&str> = state.received.iter().map(|r| r.webhook_id.as_str()).collect();
        let records: usize = state.received.iter().map(|r| r.record_ids.len()).sum();
        let distinct: HashSet<(&str, &str, &str)> = state
            .received
            .iter()
            .flat_map(|r| {
                r.record_ids.iter().map(move |id| (r.installation_id.as_str(), r.object.as_str(), id.as_str()))
            })
            .collect();
        SinkReport {
            deliveries: state.received.len(),
            distinct_webhook_ids: ids.len(),
            duplicate_deliveries: state.received.len() - ids.len(),
            records,
            distinct_records: distinct.len(),
            refused: state.refused,
            rejected_signatures: state.rejected_signatures,
            redirected: state.redirected,
        }
    }

    /// The pages each (installation, object) received, in arrival order.
    pub fn pages_by_stream(&self) -> BTreeMap<(String, String), Vec<(String, u64)>> {
        let mut out: BTreeMap<(String, String), Vec<(String, u64)>> = BTreeMap::new();
        for r in &self.state.lock().expect("sink").received {
            out.entry((r.installation_id.clone(), r.object.clone()))
                .or_default()
                .push((r.operation_id.clone(), r.page));
        }
        out
    }
}

async fn elsewhere(State(sink): State<Sink>) -> StatusCode {
    sink.state.lock().expect("sink").redirected += 1;
    StatusCode::OK
}

async fn receive(
    State(sink): State<Sink>,
    Path(_name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut state = sink.state.lock().expect("sink");
    if let Some(status) = state.answer_next.pop_front() {
        state.refused += 1;
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, [(axum::http::header::LOCATION, "/elsewhere")]).into_response();
    }
    receive_verified(&mut state, &headers, &body).into_response()
}

fn receive_verified(state: &mut SinkState, headers: &HeaderMap, body: &Bytes) -> StatusCode {
    if state.fail_next > 0 {
        state.fail_next -= 1;
        state.refused += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let now = chrono::Utc::now().timestamp();
    let Ok(webhook_id) = verify(&state.secret, headers, body, now, 300) else {
        state.rejected_signatures += 1;
        return StatusCode::UNAUTHORIZED;
    };
    let Ok(payload) = serde_json::from_slice::<Value>(body) else { return StatusCode::BAD_REQUEST };
    let standard = ["webhook-id", "webhook-timestamp", "webhook-signature"];
    let headers = standard
        .iter()
        .filter_map(|name| Some((name.to_string(), headers.get(*name)?.to_str().ok()?.to_string())))
        .collect();
    let raw = RawDelivery { headers, body: body.to_vec() };
    if payload.get("type").is_some() && payload.get("data").is_some() {
        state.notifications.push(raw.clone());
        state.last_raw = Some(raw);
        return StatusCode::NO_CONTENT;
    }
    state.last_raw = Some(raw);
    let text = |key: &str| payload.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
    let max_updated = payload
        .get("records")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("updatedAt").and_then(Value::as_str))
        .filter_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok().map(|t| t.to_utc()))
        .max();
    let field = |name: &str| -> Vec<String> {
        let records = payload.get("records").and_then(Value::as_array).into_iter().flatten();
        records.filter_map(|r| r.get(name).and_then(Value::as_str).map(str::to_string)).collect()
    };
    let (record_ids, record_keys) = (field("id"), field("idempotencyKey"));
    state.received.push(Received {
        webhook_id,
        installation_id: text("installationId"),
        object: text("object"),
        operation_id: text("operationId"),
        page: payload.get("page").and_then(Value::as_u64).unwrap_or_default(),
        record_ids,
        record_keys,
        max_updated,
    });
    StatusCode::NO_CONTENT
}

async fn report(State(sink): State<Sink>) -> Json<SinkReport> {
    Json(sink.report())
}
