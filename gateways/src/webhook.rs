//! Webhook destinations, per the Standard Webhooks spec: each delivery is a POST whose
//! `webhook-id` names the message (the same on every retry), `webhook-timestamp` is the
//! send time in seconds, and `webhook-signature` is `v1,` + base64 HMAC-SHA256, keyed by
//! the base64 part of the `whsec_` secret, over `{id}.{timestamp}.{body}`. Also a sink that
//! verifies and records deliveries (for the tests, the benchmarks and the demo).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The HMAC key a `whsec_` secret stands for.
fn key(secret: &str) -> Vec<u8> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    base64::engine::general_purpose::STANDARD.decode(encoded).unwrap_or_else(|_| encoded.as_bytes().to_vec())
}

/// `v1,<base64 signature>` of a message.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(&key(secret)).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// Why a received message is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("a webhook-id, webhook-timestamp or webhook-signature header is missing")]
    MissingHeaders,
    #[error("the timestamp is too far from now")]
    Stale,
    #[error("no signature matches")]
    BadSignature,
}

/// Verifies a received message as a receiver should: headers present, timestamp within
/// `tolerance` of `now`, one of the (space-separated) signatures matching, compared in
/// constant time.
pub fn verify(secret: &str, headers: &HeaderMap, body: &[u8], now: i64, tolerance: i64) -> Result<String, VerifyError> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(timestamp), Some(signatures)) =
        (get("webhook-id"), get("webhook-timestamp"), get("webhook-signature"))
    else {
        return Err(VerifyError::MissingHeaders);
    };
    let timestamp: i64 = timestamp.parse().map_err(|_| VerifyError::MissingHeaders)?;
    if (now - timestamp).abs() > tolerance {
        return Err(VerifyError::Stale);
    }
    let expected = sign(secret, id, timestamp, body);
    let matches = signatures.split(' ').any(|s| {
        use subtle::ConstantTimeEq;
        s.len() == expected.len() && bool::from(s.as_bytes().ct_eq(expected.as_bytes()))
    });
    if matches {
        Ok(id.to_string())
    } else {
        Err(VerifyError::BadSignature)
    }
}

/// The outcome of one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempted {
    pub status: Option<u16>,
    pub error: Option<String>,
}

impl Attempted {
    pub fn delivered(&self) -> bool {
        self.error.is_none()
    }
}

/// Sends one signed message; any 2xx is delivered, anything else (a 3xx included: the
/// client must not follow redirects) or no answer is not.
pub async fn deliver(client: &reqwest::Client, url: &str, secret: &str, id: &str, body: &[u8]) -> Attempted {
    let timestamp = chrono::Utc::now().timestamp();
    let request = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", sign(secret, id, timestamp, body))
        .body(body.to_vec());
    match request.send().await {
        Ok(response) if response.status().is_success() => {
            Attempted { status: Some(response.status().as_u16()), error: None }
        }
        Ok(response) => {
            let status = response.status().as_u16();
            let why = match response.status().is_redirection() {
                true => " (a redirect: deliveries never follow one)",
                false => "",
            };
            Attempted { status: Some(status), error: Some(format!("the endpoint answered HTTP {status}{why}")) }
        }
        Err(e) => Attempted { status: None, error: Some(format!("the endpoint did not answer: {e}")) },
    }
}

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
        for r in self.state.lock().expect("sink").received.iter() {
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
    state.last_raw = Some(RawDelivery { headers, body: body.to_vec() });
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

/// How page deliveries are retried: `max_attempts` quick tries (backoff up to
/// `max_backoff`), then, the destination being down, parked retries whose backoff grows to
/// `max_outage_backoff`, for as long as the outage lasts.
#[derive(Clone, Debug)]
pub struct DeliveryPolicy {
    pub max_attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub max_outage_backoff: Duration,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(15),
            max_outage_backoff: Duration::from_secs(30 * 60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_standard_webhooks_example() {
        // The example of the Standard Webhooks reference implementation's tests.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek".parse().unwrap());
        headers.insert("webhook-timestamp", "1614265330".parse().unwrap());
        headers.insert("webhook-signature", format!("v1,bm9wZQ== {signature}").parse().unwrap());
        assert_eq!(verify(secret, &headers, body, 1614265330, 300).as_deref(), Ok("msg_p5jXN8AQM9LWM0D4loKWxJek"));
        assert_eq!(verify(secret, &headers, body, 1614265330 + 301, 300), Err(VerifyError::Stale));
        assert_eq!(verify(secret, &headers, b"{}", 1614265330, 300), Err(VerifyError::BadSignature));
    }
}
