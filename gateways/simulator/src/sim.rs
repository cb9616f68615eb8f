//! The provider simulator (`amplog provider-sim`): a real HTTP server that behaves like a
//! CRM API, for the tests, the benchmarks and the demo.
//!
//! - OAuth2: `GET /oauth/authorize` (auto-approves, redirects with a code; `customer` names
//!   the grant), `POST /oauth/token` (authorization_code and refresh_token grants; access
//!   tokens expire after `token_ttl`; a revoked grant answers `invalid_grant`).
//! - Objects (contacts, companies, deals) with generated records ordered by (updated, id);
//!   some archived. HubSpot-like: `GET /crm/v3/objects/{object}?limit&after&updatedSince`
//!   → `{results, paging.next.after}`. Salesforce-like: `GET /services/data/v59.0/query?q=
//!   SELECT ... FROM {object} WHERE SystemModstamp >= {time}` → `{records, done,
//!   nextRecordsUrl}` and `GET /services/data/v59.0/query/{locator}`.
//! - Writes: `POST /crm/v3/objects/{object}/batch/upsert` with a result per record; one
//!   record: `GET`, `PATCH` (`{properties}`) and `DELETE` (archive) on
//!   `/crm/v3/objects/{object}/{id}`.
//! - `/_sim/echo/{path}`, any method, authenticated like data: what arrived (method, path,
//!   query, headers, body size and SHA-256, read as it streams), or with `?size=N` N bytes
//!   streamed back (byte i is `i % 251`).
//! - Faults, chosen per request from a seeded hash: 429 with Retry-After, 5xx, slow
//!   responses; 401 for an expired or unknown token.
//! - Change webhooks, HubSpot-style: once `PUT /_sim/webhooks {url}` names a receiver,
//!   records touched for a customer (`/_sim/touch/{object}/{n}?customer=`) are sent to it
//!   as batches of `{eventId, portalId, objectId, subscriptionType, occurredAt, ...}`
//!   signed v3 with the client secret, each batch retried until it is acknowledged; some
//!   batches sent twice (`duplicate`), some reversed (`reorder`).
//! - Control (`/_sim/...`): faults, expire tokens, revoke a customer's grant, touch records
//!   (they change and move to the end of the order), webhooks, stats.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{any, get, post, put};
use axum::{Form, Json, Router};
use base64::Engine;
use chrono::{DateTime, Duration as TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Fault injection, as fractions of data requests.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Answer 429 with `Retry-After: retry_after_secs`.
    pub rate_limited: f64,
    pub retry_after_secs: u64,
    /// Answer 503.
    pub server_error: f64,
    /// Sleep `slow_ms` before answering.
    pub slow: f64,
    pub slow_ms: u64,
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub objects: Vec<String>,
    /// Records per object.
    pub records: usize,
    pub seed: u64,
    pub token_ttl: Duration,
    pub client_id: String,
    pub client_secret: String,
    pub faults: Faults,
    /// The largest page a request may ask for.
    pub max_page: usize,
    /// The time the generated history ends at (records are spread over the year before).
    pub now: DateTime<Utc>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            objects: ["contacts", "companies", "deals"].map(String::from).to_vec(),
            records: 2_000,
            seed: 7,
            token_ttl: Duration::from_secs(1800),
            client_id: "amplog-demo".into(),
            client_secret: "amplog-demo-secret".into(),
            faults: Faults { retry_after_secs: 1, slow_ms: 200, ..Faults::default() },
            max_page: 200,
            now: Utc::now(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
struct Record {
    id: String,
    created: DateTime<Utc>,
    updated: DateTime<Utc>,
    archived: bool,
    properties: Map<String, Value>,
}

/// A position in an object's order: (updated, in nanoseconds; id).
type Position = (i64, String);

/// Records of one object by (updated, id), and where each id is.
#[derive(Default)]
struct Table {
    ordered: BTreeMap<Position, Record>,
    by_id: HashMap<String, i64>,
    next_id: u64,
}

impl Table {
    fn insert(&mut self, record: Record) {
        let key = nanos(record.updated);
        if let Some(old) = self.by_id.insert(record.id.clone(), key) {
            self.ordered.remove(&(old, record.id.clone()));
        }
        self.ordered.insert((key, record.id.clone()), record);
    }
}

struct Grant {
    customer: String,
    revoked: bool,
}

/// An authorization code, until it is exchanged.
struct Code {
    customer: String,
    redirect_uri: String,
    /// The PKCE `S256` challenge the authorization request carried.
    challenge: Option<String>,
}

#[derive(Default)]
struct Auth {
    codes: HashMap<String, Code>,
    /// access token → (customer, expires)
    access: HashMap<String, (String, Instant)>,
    /// refresh token → grant
    refresh: HashMap<String, Grant>,
}

/// Counters, as `GET /_sim/stats` reports them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SimStats {
    pub requests: u64,
    pub data_requests: u64,
    pub records_served: u64,
    pub by_status: BTreeMap<u16, u64>,
    pub token_grants: u64,
    pub token_refreshes: u64,
    pub invalid_grants: u64,
    /// Data requests presenting a customer's token (valid or not), and those made after the
    /// customer's grant was revoked.
    pub data_requests_by_customer: BTreeMap<String, u64>,
    pub requests_after_revoke: BTreeMap<String, u64>,
    pub records_written: u64,
    /// Consent decisions at the authorize page, and grants revoked through `/oauth/revoke`.
    pub approvals: u64,
    pub denials: u64,
    pub pkce_exchanges: u64,
    pub revocations: u64,
    /// Change webhooks: changes queued, batches acknowledged, attempts refused or unanswered,
    /// batches sent twice.
    pub changes_queued: u64,
    pub webhook_batches: u64,
    pub webhook_failures: u64,
    pub webhook_duplicates: u64,
}

struct Sim {
    config: SimConfig,
    faults: Mutex<Faults>,
    tables: Mutex<HashMap<String, Table>>,
    auth: Mutex<Auth>,
    stats: Mutex<SimStats>,
    counter: AtomicU64,
    hooks: Mutex<Hooks>,
    hooks_queued: tokio::sync::Notify,
}

/// Where change webhooks go, how, and what waits to be sent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    pub url: Option<String>,
    /// The fraction of batches sent a second time after they were acknowledged.
    pub duplicate: f64,
    /// The fraction of batches sent in reverse order.
    pub reorder: f64,
    /// Changes per batch (1 to 100; 0: 20).
    pub batch: usize,
}

#[derive(Default)]
struct Hooks {
    settings: WebhookSettings,
    queue: std::collections::VecDeque<Value>,
    next_event: u64,
}

/// A running simulator.
pub struct Simulator {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Simulator {
    /// Serves on `addr` (port 0 for any).
    pub async fn start(addr: SocketAddr, config: SimConfig) -> std::io::Result<Simulator> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(config);
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                tracing::error!(%error, "provider simulator stopped");
            }
        });
        Ok(Simulator { addr, stop: Some(stop), task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

pub fn router(config: SimConfig) -> Router {
    let sim = Arc::new(Sim {
        faults: Mutex::new(config.faults.clone()),
        tables: Mutex::new(config.objects.iter().map(|o| (o.clone(), generate(&config, o))).collect()),
        auth: Mutex::new(Auth::default()),
        stats: Mutex::new(SimStats::default()),
        counter: AtomicU64::new(0),
        hooks: Mutex::new(Hooks::default()),
        hooks_queued: tokio::sync::Notify::new(),
        config,
    });
    tokio::spawn(send_webhooks(Arc::downgrade(&sim)));
    Router::new()
        .route("/oauth/authorize", get(consent_page).post(decide_consent))
        .route("/oauth/token", post(token))
        .route("/oauth/revoke", post(revoke_token))
        .route("/crm/v3/objects/{object}", get(hubspot_list))
        .route("/crm/v3/objects/{object}/batch/upsert", post(hubspot_upsert))
        .route("/crm/v3/objects/{object}/{id}", get(hubspot_get).patch(hubspot_patch).delete(hubspot_archive))
        .route("/_sim/echo/{*rest}", any(echo))
        .route("/services/data/v59.0/query", get(salesforce_query))
        .route("/services/data/v59.0/query/{locator}", get(salesforce_more))
        .route("/_sim/faults", put(set_faults))
        .route("/_sim/expire-tokens", post(expire_tokens))
        .route("/_sim/revoke/{customer}", post(revoke))
        .route("/_sim/touch/{object}/{count}", post(touch))
        .route("/_sim/webhooks", put(set_webhooks))
        .route("/_sim/stats", get(stats))
        .with_state(sim)
}

fn nanos(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or_default()
}

fn mix(mut x: u64) -> u64 {
    // splitmix64
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn unit(x: u64) -> f64 {
    (mix(x) >> 11) as f64 / (1u64 << 53) as f64
}

fn properties(object: &str, i: u64, version: u64) -> Map<String, Value> {
    let mut p = Map::new();
    match object {
        "contacts" => {
            p.insert("email".into(), json!(format!("person{i}@example.com")));
            p.insert("firstname".into(), json!(format!("First{i}")));
            p.insert("lastname".into(), json!(format!("Last{}", mix(i) % 1000)));
        }
        "companies" => {
            p.insert("name".into(), json!(format!("Company {i}")));
            p.insert("domain".into(), json!(format!("company{i}.example")));
        }
        _ => {
            p.insert("name".into(), json!(format!("{object} {i}")));
            p.insert("amount".into(), json!((mix(i) % 100_000) as f64 / 100.0));
        }
    }
    p.insert("version".into(), json!(version));
    p
}

fn generate(config: &SimConfig, object: &str) -> Table {
    let mut table = Table::default();
    let span = TimeDelta::days(365).num_seconds() as f64;
    let start = config.now - TimeDelta::days(365);
    let salt = mix(config.seed ^ object.bytes().fold(0u64, |h, b| mix(h ^ b as u64)));
    for i in 1..=config.records as u64 {
        let offset = span * (i as f64 - unit(salt ^ i) * 0.5) / config.records as f64;
        let updated = start + TimeDelta::milliseconds((offset * 1000.0) as i64);
        table.insert(Record {
            id: i.to_string(),
            created: updated - TimeDelta::days((mix(salt ^ i) % 30) as i64),
            updated,
            archived: i % 40 == 0,
            properties: properties(object, i, 1),
        });
    }
    table.next_id = config.records as u64 + 1;
    table
}

fn error(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

impl Sim {
    fn count(&self, status: u16) {
        *self.stats.lock().expect("stats").by_status.entry(status).or_default() += 1;
    }

    /// The customer an `Authorization: Bearer` header authenticates, or a 401.
    fn authenticate(&self, headers: &HeaderMap) -> Result<String, Box<Response>> {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let auth = self.auth.lock().expect("auth");
        if let Some((customer, _)) = auth.access.get(token) {
            // Every call presenting a customer's token, valid or not.
            let revoked = auth.refresh.values().any(|g| &g.customer == customer && g.revoked);
            let mut stats = self.stats.lock().expect("stats");
            *stats.data_requests_by_customer.entry(customer.clone()).or_default() += 1;
            if revoked {
                *stats.requests_after_revoke.entry(customer.clone()).or_default() += 1;
            }
        }
        match auth.access.get(token) {
            Some((customer, expires)) if *expires > Instant::now() => Ok(customer.clone()),
            Some(_) => Err(Box::new(error(
                StatusCode::UNAUTHORIZED,
                json!({"status": "error", "category": "EXPIRED_AUTHENTICATION", "message": "the access token expired"}),
            ))),
            None => Err(Box::new(error(
                StatusCode::UNAUTHORIZED,
                json!({"status": "error", "category": "INVALID_AUTHENTICATION", "message": "unknown access token"}),
            ))),
        }
    }

    /// Every data request: count it, maybe fail it, maybe slow it, then authenticate.
    async fn admit(&self, headers: &HeaderMap) -> Result<String, Box<Response>> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.stats.lock().expect("stats").data_requests += 1;
        let faults = self.faults.lock().expect("faults").clone();
        let roll = unit(self.config.seed.wrapping_mul(31) ^ n);
        let slow_roll = unit(self.config.seed.wrapping_mul(131) ^ n);
        if slow_roll < faults.slow {
            tokio::time::sleep(Duration::from_millis(faults.slow_ms)).await;
        }
        let result = if roll < faults.rate_limited {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"status": "error", "category": "RATE_LIMITS", "message": "You have reached your secondly limit."}),
            );
            let headers = response.headers_mut();
            headers.insert("retry-after", faults.retry_after_secs.to_string().parse().expect("digits"));
            headers.insert("x-ratelimit-remaining", "0".parse().expect("digits"));
            Err(Box::new(response))
        } else if roll < faults.rate_limited + faults.server_error {
            Err(Box::new(error(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "error", "message": "upstream unavailable"}),
            )))
        } else {
            self.authenticate(headers)
        };
        if let Err(response) = &result {
            self.count(response.status().as_u16());
        }
        result
    }

    /// Up to `limit` records of `object` after `from` (exclusive) with `updated >= since`.
    fn page(
        &self,
        object: &str,
        since: Option<DateTime<Utc>>,
        from: Option<Position>,
        limit: usize,
    ) -> Option<(Vec<Record>, Option<Position>)> {
        let tables = self.tables.lock().expect("tables");
        let table = tables.get(object)?;
        let lower = from.unwrap_or((since.map(nanos).unwrap_or(i64::MIN), String::new()));
        let mut records: Vec<Record> = table
            .ordered
            .range(lower.clone()..)
            .filter(|(k, _)| **k != lower)
            .take(limit + 1)
            .map(|(_, r)| r.clone())
            .collect();
        let next = if records.len() > limit {
            records.truncate(limit);
            records.last().map(|r| (nanos(r.updated), r.id.clone()))
        } else {
            None
        };
        let mut stats = self.stats.lock().expect("stats");
        stats.records_served += records.len() as u64;
        *stats.by_status.entry(200).or_default() += 1;
        Some((records, next))
    }
}

fn encode_cursor(parts: &[&str]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(parts.join("|"))
}

fn decode_cursor(token: &str) -> Option<Vec<String>> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).ok()?;
    Some(String::from_utf8(bytes).ok()?.split('|').map(String::from).collect())
}

fn bad_request(message: impl Into<String>) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        json!({"status": "error", "category": "VALIDATION_ERROR", "message": message.into()}),
    )
}

#[derive(Deserialize)]
struct AuthorizeQuery {
    client_id: String,
    redirect_uri: String,
    #[serde(default)]
    response_type: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    code_challenge: Option<String>,
    #[serde(default)]
    code_challenge_method: Option<String>,
    /// Who signs in (the page's default; a real provider knows its user).
    #[serde(default)]
    customer: Option<String>,
}

/// Text for HTML (element content and quoted attributes).
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

/// What is wrong with an authorization request, if anything.
fn check_authorize(sim: &Sim, q: &AuthorizeQuery) -> Option<Response> {
    if q.client_id != sim.config.client_id {
        return Some(bad_request("unknown client_id"));
    }
    if q.response_type != "code" || reqwest::Url::parse(&q.redirect_uri).is_err() {
        return Some(bad_request("response_type=code and an absolute redirect_uri are required"));
    }
    match (&q.code_challenge, q.code_challenge_method.as_deref()) {
        (None, None) => None,
        (Some(c), Some("S256")) if c.len() == 43 => None,
        _ => Some(bad_request("PKCE: code_challenge_method must be S256 with a 43-character challenge")),
    }
}

/// The consent page: who asks, for which scopes; approve or deny.
async fn consent_page(State(sim): State<Arc<Sim>>, Query(q): Query<AuthorizeQuery>) -> Response {
    if let Some(response) = check_authorize(&sim, &q) {
        return response;
    }
    let hidden = [
        ("client_id", q.client_id.as_str()),
        ("redirect_uri", &q.redirect_uri),
        ("response_type", "code"),
        ("state", &q.state),
        ("scope", &q.scope),
        ("code_challenge", q.code_challenge.as_deref().unwrap_or_default()),
        ("code_challenge_method", q.code_challenge_method.as_deref().unwrap_or_default()),
    ]
    .iter()
    .map(|(k, v)| format!(r#"<input type="hidden" name="{k}" value="{}">"#, escape(v)))
    .collect::<String>();
    let scopes = match q.scope.split(' ').filter(|s| !s.is_empty()).collect::<Vec<_>>() {
        scopes if scopes.is_empty() => "<li>basic access</li>".to_string(),
        scopes => scopes.iter().map(|s| format!("<li><code>{}</code></li>", escape(s))).collect(),
    };
    let customer = escape(q.customer.as_deref().unwrap_or("customer"));
    let page = format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>Sign in to the provider simulator</title>
<style>body{{font:16px system-ui,sans-serif;max-width:32rem;margin:3rem auto;color:#1d2330}}
.card{{border:1px solid #d5d9e0;border-radius:10px;padding:1.5rem}}button{{font:inherit;padding:.5rem 1.2rem;border-radius:6px;border:1px solid #888;margin-right:.5rem}}
#approve{{background:#ff7a59;border-color:#ff7a59;color:white}}</style></head>
<body><div class="card"><h1>Provider simulator</h1>
<p><strong>{client}</strong> wants to access your account.</p><p>It asks for:</p><ul id="scopes">{scopes}</ul>
<form method="post" action="/oauth/authorize">{hidden}
<p><label>Signed in as <input name="customer" value="{customer}"></label></p>
<button id="approve" name="decision" value="approve">Approve</button>
<button id="deny" name="decision" value="deny">Deny</button></form></div></body></html>"#,
        client = escape(&q.client_id),
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

#[derive(Deserialize)]
struct ConsentForm {
    #[serde(flatten)]
    request: AuthorizeQuery,
    decision: String,
}

fn with_query(redirect_uri: &str, pairs: &[(&str, &str)]) -> String {
    let mut url = reqwest::Url::parse(redirect_uri).expect("checked absolute above");
    url.query_pairs_mut().extend_pairs(pairs);
    url.to_string()
}

/// The user's decision: a code (approve) or `error=access_denied` (deny), back at the
/// redirect URI with the request's state.
async fn decide_consent(State(sim): State<Arc<Sim>>, Form(form): Form<ConsentForm>) -> Response {
    let mut q = form.request;
    // An empty hidden field is an absent parameter.
    q.code_challenge = q.code_challenge.filter(|c| !c.is_empty());
    q.code_challenge_method = q.code_challenge_method.filter(|c| !c.is_empty());
    if let Some(response) = check_authorize(&sim, &q) {
        return response;
    }
    if form.decision != "approve" {
        sim.stats.lock().expect("stats").denials += 1;
        let location = with_query(
            &q.redirect_uri,
            &[("error", "access_denied"), ("error_description", "the user denied access"), ("state", &q.state)],
        );
        return Redirect::to(&location).into_response();
    }
    let code = hex::encode(amplog_commands::credentials::random_bytes::<16>());
    let customer = q.customer.filter(|c| !c.is_empty()).unwrap_or_else(|| "customer".into());
    let grant = Code { customer, redirect_uri: q.redirect_uri.clone(), challenge: q.code_challenge };
    sim.auth.lock().expect("auth").codes.insert(code.clone(), grant);
    sim.stats.lock().expect("stats").approvals += 1;
    Redirect::to(&with_query(&q.redirect_uri, &[("code", &code), ("state", &q.state)])).into_response()
}

#[derive(Deserialize)]
struct RevokeForm {
    token: String,
    client_id: String,
    client_secret: String,
}

/// RFC 7009: revokes the grant of a refresh (or access) token; an unknown token is not an
/// error.
async fn revoke_token(State(sim): State<Arc<Sim>>, Form(form): Form<RevokeForm>) -> Response {
    if form.client_id != sim.config.client_id || form.client_secret != sim.config.client_secret {
        return error(StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}));
    }
    let mut auth = sim.auth.lock().expect("auth");
    if let Some(grant) = auth.refresh.get_mut(&form.token) {
        grant.revoked = true;
        let customer = grant.customer.clone();
        let now = Instant::now();
        for (c, expires) in auth.access.values_mut() {
            if *c == customer {
                *expires = now;
            }
        }
        sim.stats.lock().expect("stats").revocations += 1;
    } else if let Some(access) = auth.access.get_mut(&form.token) {
        access.1 = Instant::now();
        sim.stats.lock().expect("stats").revocations += 1;
    }
    StatusCode::OK.into_response()
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: String,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    redirect_uri: Option<String>,
    #[serde(default)]
    code_verifier: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
    client_id: String,
    client_secret: String,
}

async fn token(State(sim): State<Arc<Sim>>, headers: HeaderMap, Form(form): Form<TokenForm>) -> Response {
    if form.client_id != sim.config.client_id || form.client_secret != sim.config.client_secret {
        return error(StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}));
    }
    let invalid_grant = |sim: &Sim| {
        sim.stats.lock().expect("stats").invalid_grants += 1;
        error(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_grant", "error_description": "the grant is invalid or revoked"}),
        )
    };
    let mut auth = sim.auth.lock().expect("auth");
    let (customer, refresh) = match form.grant_type.as_str() {
        "authorization_code" => {
            let Some(code) = form.code.and_then(|c| auth.codes.remove(&c)) else {
                drop(auth);
                return invalid_grant(&sim);
            };
            // The redirect URI of the authorization request, and the verifier of its
            // PKCE challenge (RFC 7636: BASE64URL(SHA256(verifier))).
            let verified = match (&code.challenge, &form.code_verifier) {
                (None, _) => true,
                (Some(challenge), Some(verifier)) => {
                    use sha2::Digest;
                    let digest = sha2::Sha256::digest(verifier.as_bytes());
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest) == *challenge
                }
                (Some(_), None) => false,
            };
            if !verified || form.redirect_uri.as_deref() != Some(code.redirect_uri.as_str()) {
                drop(auth);
                return invalid_grant(&sim);
            }
            if code.challenge.is_some() {
                sim.stats.lock().expect("stats").pkce_exchanges += 1;
            }
            let customer = code.customer;
            let refresh = hex::encode(amplog_commands::credentials::random_bytes::<16>());
            auth.refresh.insert(refresh.clone(), Grant { customer: customer.clone(), revoked: false });
            sim.stats.lock().expect("stats").token_grants += 1;
            (customer, refresh)
        }
        "refresh_token" => {
            let refresh = form.refresh_token.unwrap_or_default();
            match auth.refresh.get(&refresh) {
                Some(grant) if !grant.revoked => {
                    sim.stats.lock().expect("stats").token_refreshes += 1;
                    (grant.customer.clone(), refresh)
                }
                _ => {
                    drop(auth);
                    return invalid_grant(&sim);
                }
            }
        }
        _ => return error(StatusCode::BAD_REQUEST, json!({"error": "unsupported_grant_type"})),
    };
    let access = hex::encode(amplog_commands::credentials::random_bytes::<16>());
    auth.access.insert(access.clone(), (customer.clone(), Instant::now() + sim.config.token_ttl));
    Json(json!({
        "access_token": access,
        // The customer's portal: what its change webhooks name it by.
        "hub_id": customer,
        "refresh_token": refresh,
        "expires_in": sim.config.token_ttl.as_secs(),
        "token_type": "bearer",
        // Salesforce-style: where this customer's data lives (here: where it asked).
        "instance_url": format!("http://{}", headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1")),
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    updated_since: Option<DateTime<Utc>>,
}

fn hubspot_record(r: &Record) -> Value {
    json!({
        "id": r.id,
        "properties": r.properties,
        "createdAt": r.created,
        "updatedAt": r.updated,
        "archived": r.archived,
    })
}

async fn hubspot_list(
    State(sim): State<Arc<Sim>>,
    Path(object): Path<String>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(response) = sim.admit(&headers).await {
        return *response;
    }
    let limit = q.limit.unwrap_or(100).clamp(1, sim.config.max_page);
    let from = match q.after.as_deref().map(decode_cursor) {
        None => None,
        Some(Some(parts)) if parts.len() == 2 => match parts[0].parse() {
            Ok(n) => Some((n, parts[1].clone())),
            Err(_) => return bad_request("invalid `after` cursor"),
        },
        Some(_) => return bad_request("invalid `after` cursor"),
    };
    let Some((records, next)) = sim.page(&object, q.updated_since, from, limit) else {
        return error(
            StatusCode::NOT_FOUND,
            json!({"status": "error", "category": "OBJECT_NOT_FOUND", "message": format!("unknown object {object}")}),
        );
    };
    let mut body = json!({"results": records.iter().map(hubspot_record).collect::<Vec<_>>()});
    if let Some((n, id)) = next {
        body["paging"] = json!({"next": {"after": encode_cursor(&[&n.to_string(), &id])}});
    }
    Json(body).into_response()
}

#[derive(Deserialize)]
struct UpsertBody {
    inputs: Vec<UpsertInput>,
}

#[derive(Deserialize)]
struct UpsertInput {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    properties: Map<String, Value>,
}

async fn hubspot_upsert(
    State(sim): State<Arc<Sim>>,
    Path(object): Path<String>,
    headers: HeaderMap,
    Json(body): Json<UpsertBody>,
) -> Response {
    if let Err(response) = sim.admit(&headers).await {
        return *response;
    }
    if body.inputs.len() > 100 {
        return bad_request("at most 100 inputs per batch");
    }
    let now = Utc::now();
    let mut tables = sim.tables.lock().expect("tables");
    let Some(table) = tables.get_mut(&object) else {
        return error(StatusCode::NOT_FOUND, json!({"status": "error", "message": format!("unknown object {object}")}));
    };
    let mut results = Vec::new();
    let mut written = 0;
    for (index, input) in body.inputs.into_iter().enumerate() {
        let invalid = match object.as_str() {
            "contacts" => input.properties.get("email").and_then(Value::as_str).is_none_or(|e| !e.contains('@')),
            _ => input.properties.is_empty(),
        };
        if invalid {
            results.push(json!({"index": index, "status": "error", "category": "VALIDATION_ERROR",
                                "message": "a required property is missing or invalid"}));
            continue;
        }
        let (id, status, created) = match input.id.as_ref().and_then(|id| table.by_id.get(id).map(|k| (id.clone(), *k)))
        {
            Some((id, key)) => {
                let created = table.ordered.get(&(key, id.clone())).map(|r| r.created).unwrap_or(now);
                (id, "updated", created)
            }
            None => {
                let id = table.next_id.to_string();
                table.next_id += 1;
                (id, "created", now)
            }
        };
        table.insert(Record { id: id.clone(), created, updated: now, archived: false, properties: input.properties });
        written += 1;
        results.push(json!({"index": index, "status": status, "id": id}));
    }
    drop(tables);
    let mut stats = sim.stats.lock().expect("stats");
    stats.records_written += written;
    *stats.by_status.entry(200).or_default() += 1;
    Json(json!({"status": "COMPLETE", "results": results})).into_response()
}

/// One record by id, changed by `change` first when given; `None` when there is no such record.
fn with_record(sim: &Sim, object: &str, id: &str, change: Option<&dyn Fn(&mut Record)>) -> Option<Value> {
    let mut tables = sim.tables.lock().expect("tables");
    let table = tables.get_mut(object)?;
    let key = *table.by_id.get(id)?;
    let record = table.ordered.get(&(key, id.to_string()))?;
    let Some(change) = change else { return Some(hubspot_record(record)) };
    let mut record = record.clone();
    change(&mut record);
    let shown = hubspot_record(&record);
    table.insert(record);
    Some(shown)
}

fn record_not_found(object: &str, id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        json!({"status": "error", "category": "OBJECT_NOT_FOUND", "message": format!("no {object} {id}")}),
    )
}

async fn hubspot_get(
    State(sim): State<Arc<Sim>>,
    Path((object, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = sim.admit(&headers).await {
        return *response;
    }
    sim.count(200);
    match with_record(&sim, &object, &id, None) {
        Some(record) => Json(record).into_response(),
        None => record_not_found(&object, &id),
    }
}

#[derive(Deserialize)]
struct PatchBody {
    properties: Map<String, Value>,
}

async fn hubspot_patch(
    State(sim): State<Arc<Sim>>,
    Path((object, id)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<PatchBody>,
) -> Response {
    if let Err(response) = sim.admit(&headers).await {
        return *response;
    }
    let now = Utc::now();
    let change = |r: &mut Record| {
        r.properties.extend(body.properties.clone());
        r.updated = now;
    };
    match with_record(&sim, &object, &id, Some(&change)) {
        Some(record) => {
            sim.count(200);
            sim.stats.lock().expect("stats").records_written += 1;
            Json(record).into_response()
        }
        None => record_not_found(&object, &id),
    }
}

async fn hubspot_archive(
    State(sim): State<Arc<Sim>>,
    Path((object, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = sim.admit(&headers).await {
        return *response;
    }
    let now = Utc::now();
    let change = |r: &mut Record| {
        r.archived = true;
        r.updated = now;
    };
    match with_record(&sim, &object, &id, Some(&change)) {
        Some(_) => {
            sim.count(204);
            StatusCode::NO_CONTENT.into_response()
        }
        None => record_not_found(&object, &id),
    }
}

/// What arrived, or `?size=N` bytes streamed back; the body is read as it streams.
async fn echo(
    State(sim): State<Arc<Sim>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    use futures::StreamExt;
    use sha2::Digest;
    if let Err(response) = sim.admit(&headers).await {
        return *response;
    }
    let (mut digest, mut bytes) = (sha2::Sha256::new(), 0u64);
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(chunk) => {
                bytes += chunk.len() as u64;
                digest.update(&chunk);
            }
            Err(e) => return bad_request(format!("the body broke off: {e}")),
        }
    }
    sim.count(200);
    let size = uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("size=")).and_then(|n| n.parse::<u64>().ok()));
    if let Some(size) = size {
        const CHUNK: u64 = 64 * 1024;
        let stream = futures::stream::unfold(0u64, move |at| async move {
            (at < size).then(|| {
                let n = CHUNK.min(size - at);
                let chunk: Vec<u8> = (at..at + n).map(|i| (i % 251) as u8).collect();
                (Ok::<_, std::io::Error>(axum::body::Bytes::from(chunk)), at + n)
            })
        });
        let mut response = axum::body::Body::from_stream(stream).into_response();
        response.headers_mut().insert(header::CONTENT_LENGTH, size.into());
        response.headers_mut().insert(header::CONTENT_TYPE, "application/octet-stream".parse().expect("a type"));
        return response;
    }
    let headers: Map<String, Value> = headers
        .iter()
        .map(|(name, value)| (name.to_string(), json!(String::from_utf8_lossy(value.as_bytes()))))
        .collect();
    Json(json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "headers": headers,
        "bytes": bytes,
        "sha256": hex::encode(digest.finalize()),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct SoqlQuery {
    q: String,
}

/// `SELECT ... FROM {object} [WHERE SystemModstamp >= {time}] ...`: the object and the
/// lower bound are all the simulator reads of it.
fn parse_soql(q: &str) -> Option<(String, Option<DateTime<Utc>>)> {
    let words: Vec<&str> = q.split_whitespace().collect();
    let from = words.iter().position(|w| w.eq_ignore_ascii_case("FROM"))?;
    let object = words.get(from + 1)?.to_ascii_lowercase();
    let since = match words.iter().position(|w| *w == "SystemModstamp") {
        Some(i) if words.get(i + 1) == Some(&">=") => {
            Some(DateTime::parse_from_rfc3339(words.get(i + 2)?).ok()?.to_utc())
        }
        Some(_) => return None,
        None => None,
    };
    Some((object, since))
}

const SF_PAGE: usize = 200;

fn salesforce_body(object: &str, records: Vec<Record>, next: Option<Position>) -> Value {
    let records: Vec<Value> = records
        .iter()
        .map(|r| {
            let mut v = json!({
                "attributes": {"type": object},
                "Id": r.id,
                "CreatedDate": r.created,
                "SystemModstamp": r.updated,
                "IsDeleted": r.archived,
            });
            for (k, value) in &r.properties {
                v[k] = value.clone();
            }
            v
        })
        .collect();
    let mut body = json!({"totalSize": records.len(), "done": next.is_none(), "records": records});
    if let Some((n, id)) = next {
        body["nextRecordsUrl"] =
            json!(format!("/services/data/v59.0/query/{}", encode_cursor(&[object, &n.to_string(), &id])));
    }
    body
}

async fn salesforce_query(State(sim): State<Arc<Sim>>, headers: HeaderMap, Query(q): Query<SoqlQuery>) -> Response {
    if let Err(response) = sim.admit(&headers).await {
        return *response;
    }
    let Some((object, since)) = parse_soql(&q.q) else {
        return error(
            StatusCode::BAD_REQUEST,
            json!([{"errorCode": "MALFORMED_QUERY", "message": "cannot parse the query"}]),
        );
    };
    match sim.page(&object, since, None, SF_PAGE) {
        Some((records, next)) => Json(salesforce_body(&object, records, next)).into_response(),
        None => error(
            StatusCode::BAD_REQUEST,
            json!([{"errorCode": "INVALID_TYPE", "message": format!("sObject type '{object}' is not supported")}]),
        ),
    }
}

async fn salesforce_more(State(sim): State<Arc<Sim>>, headers: HeaderMap, Path(locator): Path<String>) -> Response {
    if let Err(response) = sim.admit(&headers).await {
        return *response;
    }
    let parsed = decode_cursor(&locator)
        .filter(|p| p.len() == 3)
        .and_then(|p| Some((p[0].clone(), p[1].parse().ok()?, p[2].clone())));
    let Some((object, n, id)) = parsed else {
        return error(
            StatusCode::BAD_REQUEST,
            json!([{"errorCode": "INVALID_QUERY_LOCATOR", "message": "invalid query locator"}]),
        );
    };
    match sim.page(&object, None, Some((n, id)), SF_PAGE) {
        Some((records, next)) => Json(salesforce_body(&object, records, next)).into_response(),
        None => error(
            StatusCode::BAD_REQUEST,
            json!([{"errorCode": "INVALID_QUERY_LOCATOR", "message": "invalid query locator"}]),
        ),
    }
}

async fn set_faults(State(sim): State<Arc<Sim>>, Json(faults): Json<Faults>) -> Json<Faults> {
    *sim.faults.lock().expect("faults") = faults.clone();
    Json(faults)
}

async fn expire_tokens(State(sim): State<Arc<Sim>>) -> Json<Value> {
    let mut auth = sim.auth.lock().expect("auth");
    let now = Instant::now();
    for (_, expires) in auth.access.values_mut() {
        *expires = now;
    }
    Json(json!({"expired": auth.access.len()}))
}

async fn revoke(State(sim): State<Arc<Sim>>, Path(customer): Path<String>) -> Json<Value> {
    let mut auth = sim.auth.lock().expect("auth");
    let mut revoked = 0;
    for grant in auth.refresh.values_mut().filter(|g| g.customer == customer) {
        grant.revoked = true;
        revoked += 1;
    }
    // Its access tokens stop working too.
    let now = Instant::now();
    for (c, expires) in auth.access.values_mut() {
        if *c == customer {
            *expires = now;
        }
    }
    Json(json!({"revoked": revoked}))
}

/// Changes the `count` least recently updated records of `object`: they move to now.
#[derive(Deserialize)]
struct TouchQuery {
    /// The customer (portal) whose change webhooks report the touch.
    customer: Option<String>,
}

async fn touch(
    State(sim): State<Arc<Sim>>,
    Path((object, count)): Path<(String, usize)>,
    Query(q): Query<TouchQuery>,
) -> Response {
    let mut tables = sim.tables.lock().expect("tables");
    let Some(table) = tables.get_mut(&object) else { return bad_request(format!("unknown object {object}")) };
    let now = Utc::now();
    let picked: Vec<Record> = table.ordered.values().take(count).cloned().collect();
    let mut ids = Vec::new();
    for (i, mut record) in picked.into_iter().enumerate() {
        // Distinct times keep the order total even within one call.
        record.updated = now + TimeDelta::microseconds(i as i64);
        let version = record.properties.get("version").and_then(Value::as_u64).unwrap_or(1) + 1;
        record.properties.insert("version".into(), json!(version));
        ids.push(record.id.clone());
        if let Some(customer) = &q.customer {
            sim.queue_change(
                customer,
                &object,
                &record.id,
                "propertyChange",
                Some(("version", json!(version))),
                record.updated,
            );
        }
        table.insert(record);
    }
    drop(tables);
    sim.hooks_queued.notify_one();
    Json(json!({"touched": ids, "updated": now})).into_response()
}

async fn set_webhooks(State(sim): State<Arc<Sim>>, Json(settings): Json<WebhookSettings>) -> Json<WebhookSettings> {
    sim.hooks.lock().expect("hooks").settings = settings.clone();
    sim.hooks_queued.notify_one();
    Json(settings)
}

impl Sim {
    /// Queues one change event for `customer`'s portal (when a receiver is set).
    fn queue_change(
        &self,
        customer: &str,
        object: &str,
        id: &str,
        kind: &str,
        property: Option<(&str, Value)>,
        at: DateTime<Utc>,
    ) {
        let singular = match object {
            "contacts" => "contact",
            "companies" => "company",
            "deals" => "deal",
            other => other,
        };
        let mut hooks = self.hooks.lock().expect("hooks");
        if hooks.settings.url.is_none() {
            return;
        }
        hooks.next_event += 1;
        let mut event = json!({
            "eventId": hooks.next_event,
            "subscriptionId": 1,
            "portalId": customer,
            "appId": self.config.client_id,
            "occurredAt": at.timestamp_millis(),
            "subscriptionType": format!("{singular}.{kind}"),
            "attemptNumber": 0,
            "objectId": id,
            "changeSource": "CRM",
        });
        if let Some((name, value)) = property {
            event["propertyName"] = json!(name);
            event["propertyValue"] = value;
        }
        hooks.queue.push_back(event);
        drop(hooks);
        self.stats.lock().expect("stats").changes_queued += 1;
    }
}

/// HubSpot's v3 signature: base64 HMAC-SHA256 of method, URL, body and timestamp (ms).
pub fn hubspot_signature(secret: &str, method: &str, url: &str, body: &[u8], timestamp: i64) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{method}{url}").as_bytes());
    mac.update(body);
    mac.update(timestamp.to_string().as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Sends queued changes in batches, each until acknowledged (a refused or unanswered one
/// is sent again, before any later one); ends with the simulator.
async fn send_webhooks(sim: std::sync::Weak<Sim>) {
    let http = amplog_providers::connector::http_client().build().expect("a client");
    let mut sent = 0u64;
    loop {
        let Some(strong) = sim.upgrade() else { return };
        let (url, batch, settings) = {
            let mut hooks = strong.hooks.lock().expect("hooks");
            let size = match hooks.settings.batch {
                0 => 20,
                n => n.min(100),
            };
            let take = hooks.queue.len().min(size);
            let batch: Vec<Value> = hooks.queue.drain(..take).collect();
            (hooks.settings.url.clone(), batch, hooks.settings.clone())
        };
        let (Some(url), false) = (url, batch.is_empty()) else {
            let _ = tokio::time::timeout(Duration::from_millis(200), strong.hooks_queued.notified()).await;
            continue;
        };
        sent += 1;
        let seed = strong.config.seed ^ sent.wrapping_mul(0x9e37);
        let mut batch = batch;
        if unit(seed.wrapping_mul(7)) < settings.reorder {
            batch.reverse();
        }
        let times = if unit(seed.wrapping_mul(13)) < settings.duplicate { 2 } else { 1 };
        let body = serde_json::to_vec(&batch).expect("json");
        let secret = strong.config.client_secret.clone();
        drop(strong);
        for time in 0..times {
            let mut delay = Duration::from_millis(50);
            loop {
                let timestamp = Utc::now().timestamp_millis();
                let signature = hubspot_signature(&secret, "POST", &url, &body, timestamp);
                let answer = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-hubspot-signature-v3", signature)
                    .header("x-hubspot-request-timestamp", timestamp.to_string())
                    .body(body.clone())
                    .send()
                    .await;
                let acknowledged = answer.is_ok_and(|a| a.status().is_success());
                {
                    let Some(strong) = sim.upgrade() else { return };
                    let mut stats = strong.stats.lock().expect("stats");
                    match acknowledged {
                        true if time > 0 => {
                            stats.webhook_batches += 1;
                            stats.webhook_duplicates += 1;
                        }
                        true => stats.webhook_batches += 1,
                        false => stats.webhook_failures += 1,
                    }
                }
                if acknowledged {
                    break;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn stats(State(sim): State<Arc<Sim>>) -> Json<SimStats> {
    let mut stats = sim.stats.lock().expect("stats").clone();
    stats.requests = stats.by_status.values().sum();
    Json(stats)
}

/// Connects a customer the way a builder's app would: the customer approves amplog at the
/// provider's consent page (the form posted directly), and the code it redirects with is
/// exchanged for a token set.
pub async fn connect_customer(
    connector: &amplog_providers::connector::Connector,
    customer: &str,
) -> Result<amplog_providers::connector::TokenSet, amplog_providers::connector::ProviderError> {
    use amplog_domain::operation::ErrorClass;
    use amplog_providers::connector::ProviderError;
    let redirect = "http://127.0.0.1/oauth/callback";
    let authorize = reqwest::Url::parse(&connector.authorize_url(redirect, "amplog")).expect("catalog URLs parse");
    let mut form: Vec<(String, String)> = authorize.query_pairs().into_owned().collect();
    form.extend([("customer".into(), customer.into()), ("decision".into(), "approve".into())]);
    let client = amplog_providers::connector::http_client()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a client");
    let response = client
        .post(authorize.as_str().split('?').next().unwrap_or_default())
        .form(&form)
        .send()
        .await
        .map_err(|e| ProviderError::new(ErrorClass::Timeout, e.to_string()))?;
    let location = response.headers().get("location").and_then(|l| l.to_str().ok()).unwrap_or_default().to_string();
    let code = reqwest::Url::parse(&location)
        .ok()
        .and_then(|u| u.query_pairs().find(|(k, _)| k == "code").map(|(_, v)| v.into_owned()))
        .ok_or_else(|| {
            ProviderError::new(ErrorClass::BadRequest, format!("no code in the redirect ({})", response.status()))
        })?;
    connector.exchange_code(&code, redirect).await
}

/// A customer of a builder, connected through the provider's OAuth and with the integration
/// installed (for the tests, the benchmarks and the demo).
pub async fn install_customer(
    service: &amplog_commands::CommandService,
    ctx: &amplog_commands::CommandContext,
    integration: amplog_domain::IntegrationId,
    connector: &amplog_providers::connector::Connector,
    customer: &str,
) -> Result<(amplog_domain::ConnectionId, amplog_domain::InstallationId), crate::SimError> {
    use amplog_domain::{ConnectionId, InstallationId};
    let tokens =
        connect_customer(connector, customer).await.map_err(|e| crate::SimError::Connect(customer.to_string(), e))?;
    let secret = amplog_commands::credentials::Secret(serde_json::to_string(&tokens).expect("token sets serialise"));
    let outcome = service.create_connection(ctx, integration, customer, &secret).await?;
    let connection = ConnectionId(outcome.id_of("connection").ok_or(crate::SimError::Missing("connection"))?);
    let new = amplog_commands::service::NewInstallation {
        integration_id: integration,
        revision: None,
        group_ref: customer.into(),
        consumer_ref: format!("{customer}-admin"),
        connection_id: connection,
        objects: None,
    };
    let outcome = service.create_installation(ctx, &new).await?;
    let installation = InstallationId(outcome.id_of("installation").ok_or(crate::SimError::Missing("installation"))?);
    Ok((connection, installation))
}
