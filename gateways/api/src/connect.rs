//! The connect flow: the page an end user opens from a builder's connect link, the redirect
//! to the provider's consent (a `state` bound to the session and to this browser, PKCE
//! where the provider takes it), the callback that exchanges the code and records the
//! connection, the choice of optional objects, and the way back (the builder's return URL,
//! allow-listed per provider app, or a `postMessage` to the opener).
//!
//! Nothing here is authenticated by a key: the link token is the capability (random, kept
//! as a digest in the session's `Created` event, checked in constant time), and every later
//! step presents the attempt's `state` with this browser's cookie, whose digest the
//! session's `AuthorizationStarted` holds. Every refusal is a page with a status and a
//! machine-readable code (`x-amplog-error-code`), and appends nothing it should not.

use crate::state::AppState;
use amplog_commands::credentials::{random_bytes, Secret};
use amplog_commands::{CommandContext, CommandError};
use amplog_domain::connect_session::{ConnectSession, ConnectSessionCommand, ConnectSessionError, SessionStatus};
use amplog_domain::installation::ObjectConfig;
use amplog_domain::integration::Integration;
use amplog_domain::{Aggregate, ConnectionId, DomainError, ProjectId};
use amplog_providers::connector::{ClientApp, Connector};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use chrono::Utc;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// The link token is in the page's URL: no other site is ever sent it as a referrer (and
/// same-origin form posts keep their `Origin`, which `no-referrer` would turn into `null`).
const REFERRER_POLICY: &str = "same-origin";
/// Where the provider sends the user back.
pub const CALLBACK_PATH: &str = "/v1/oauth/callback";
/// Longest token or state accepted (both are 86 and 64 characters).
const MAX_TOKEN: usize = 128;
/// Longest authorization code or provider error accepted.
const MAX_CODE: usize = 4096;

/// The connect routes, with their own small body limit (forms of a few fields).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/connect/{token}", get(page).post(start))
        .route(CALLBACK_PATH, get(callback))
        .route("/v1/oauth/finish", post(finish))
        .layer(DefaultBodyLimit::max(16 * 1024))
        .with_state(state)
}

/// A new link token for a session and the digest its `Created` event keeps.
pub fn new_link_token(project: ProjectId, session: Uuid) -> (String, String) {
    let secret = random_bytes::<32>();
    let mut bytes = Vec::with_capacity(64);
    bytes.extend_from_slice(project.0.as_bytes());
    bytes.extend_from_slice(session.as_bytes());
    bytes.extend_from_slice(&secret);
    (B64.encode(bytes), secret_digest(&secret))
}

/// Whether a link token's secret is the session's (compared in constant time).
fn token_matches(secret: &[u8], session: &ConnectSession) -> bool {
    bool::from(secret_digest(secret).as_bytes().ct_eq(session.token_digest.as_bytes()))
}

fn secret_digest(secret: &[u8]) -> String {
    hex::encode(Sha256::new().chain_update(b"amplog-connect-link\0").chain_update(secret).finalize())
}

/// `project || session || rest` from a base64url text of the expected length.
fn split_ids(text: &str, rest: usize) -> Option<(ProjectId, Uuid, Vec<u8>)> {
    if text.len() > MAX_TOKEN {
        return None;
    }
    let bytes = B64.decode(text).ok().filter(|b| b.len() == 32 + rest)?;
    let project = Uuid::from_slice(&bytes[..16]).ok()?;
    let session = Uuid::from_slice(&bytes[16..32]).ok()?;
    Some((ProjectId(project), session, bytes[32..].to_vec()))
}

/// A refusal, shown as a page: its status, its code, what happened and what to do.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    code: &'static str,
    title: &'static str,
    message: String,
    retry: Option<String>,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, title: &'static str, message: impl Into<String>) -> Refusal {
        Refusal { status, code, title, message: message.into(), retry: None }
    }

    fn with_retry(mut self, link: Option<&str>) -> Refusal {
        self.retry = link.map(|token| format!("/connect/{token}"));
        self
    }

    fn invalid_link() -> Refusal {
        Refusal::new(
            StatusCode::NOT_FOUND,
            "link_invalid",
            "This connect link is not valid",
            "Ask the application that sent you here for a new link.",
        )
    }

    fn unknown_state() -> Refusal {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "state_invalid",
            "This sign-in is not one we started",
            "Nothing was connected. Start again from the application's connect link.",
        )
    }
}

impl From<CommandError> for Refusal {
    fn from(e: CommandError) -> Refusal {
        use ConnectSessionError as E;
        let (status, code, title, message) = match &e {
            CommandError::Domain(DomainError::ConnectSession(s)) => match s {
                E::Expired => (StatusCode::GONE, "expired", "This connect link has expired", "Ask the application for a new link."),
                E::AlreadyCompleted => (StatusCode::CONFLICT, "already_completed", "This account is already connected", "You can close this window."),
                E::StateUsed | E::AlreadyConnected => (StatusCode::CONFLICT, "state_used", "This sign-in was already used", "Nothing more was changed. Go back to the application."),
                E::StateMismatch | E::NotAuthorizing => (StatusCode::BAD_REQUEST, "state_mismatch", "This sign-in was not started in this browser", "Nothing was connected. Open the connect link again in this browser; cookies must be allowed for this site."),
                E::NotConnected => (StatusCode::BAD_REQUEST, "not_connected", "No account is connected yet", "Open the connect link again."),
                _ => (StatusCode::BAD_REQUEST, "invalid_session", "This connect session cannot continue", "Ask the application for a new link."),
            },
            CommandError::Domain(d) if d.code().ends_with("not_found") => (StatusCode::NOT_FOUND, "link_invalid", "This connect link is not valid", "Ask the application that sent you here for a new link."),
            CommandError::Domain(_) => (StatusCode::UNPROCESSABLE_ENTITY, "refused", "The connection could not be set up", "Ask the application for help; nothing was changed."),
            _ => {
                tracing::error!(error = %e, "connect flow failed");
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Something went wrong on our side", "Nothing was changed. Try again in a moment.")
            }
        };
        Refusal::new(status, code, title, format!("{message} ({})", e.code()))
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let retry = match &self.retry {
            Some(link) => format!(r#"<p><a id="retry" href="{}">Try again</a></p>"#, escape(link)),
            None => String::new(),
        };
        let body = format!(r#"<h1>{}</h1><p id="message">{}</p>{retry}"#, escape(self.title), escape(&self.message));
        let mut response = Html { status: self.status, code: Some(self.code), body, ..Html::default() }.into_response();
        response.headers_mut().insert("x-amplog-error-code", HeaderValue::from_static(self.code));
        response
    }
}

/// A page: the body inside the layout, under a strict Content-Security-Policy.
#[derive(Default)]
struct Html {
    status: StatusCode,
    code: Option<&'static str>,
    body: String,
    /// Origins forms may go to (besides this one) and the frames that may embed the page.
    form_action: Vec<String>,
    frame_ancestors: Vec<String>,
    script: Option<String>,
    cookie: Option<String>,
}

const STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;color:#1d2330;max-width:34rem;margin:2.5rem auto;padding:0 1rem}\
main{border:1px solid #d5d9e0;border-radius:12px;padding:1.5rem 1.75rem}h1{font-size:1.35rem;margin-top:0}\
button{font:inherit;padding:.55rem 1.3rem;border-radius:8px;border:0;background:#3451d1;color:#fff;cursor:pointer}\
ul{padding-left:1.2rem}code{background:#f1f3f6;padding:0 .25rem;border-radius:4px}.muted{color:#5b6475;font-size:.9rem}";

impl IntoResponse for Html {
    fn into_response(self) -> Response {
        let nonce = B64.encode(random_bytes::<16>());
        let script = match &self.script {
            Some(js) => format!(r#"<script nonce="{nonce}">{js}</script>"#),
            None => String::new(),
        };
        let code = self.code.map(|c| format!(r#" data-error-code="{c}""#)).unwrap_or_default();
        let page = format!(
            r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Connect</title><style nonce="{nonce}">{STYLE}</style></head><body><main{code}>{}</main>{script}</body></html>"#,
            self.body
        );
        let ancestors = match self.frame_ancestors.is_empty() {
            true => "'none'".to_string(),
            false => self.frame_ancestors.join(" "),
        };
        let csp = format!(
            "default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; img-src 'self' data:; \
             form-action 'self' {}; frame-ancestors {ancestors}; base-uri 'none'",
            self.form_action.join(" ")
        );
        let mut response = (self.status, page).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::REFERRER_POLICY, HeaderValue::from_static(REFERRER_POLICY));
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        if let Ok(csp) = HeaderValue::from_str(&csp) {
            headers.insert(header::CONTENT_SECURITY_POLICY, csp);
        }
        if let Some(cookie) = self.cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
            headers.insert(header::SET_COOKIE, cookie);
        }
        response
    }
}

/// Text for HTML element content and quoted attributes.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    match url.origin() {
        origin @ url::Origin::Tuple(..) => Some(origin.ascii_serialization()),
        url::Origin::Opaque(_) => None,
    }
}

/// Whether `url` is one of `allowed`: the same scheme, host, port and path; the query is
/// the builder's. Parsed, so `https://app.example.evil/` or `https://app.example@evil/` do
/// not pass for `https://app.example/`.
pub fn return_url_allowed(url: &str, allowed: &[String]) -> bool {
    let Ok(url) = url::Url::parse(url) else { return false };
    if url.fragment().is_some() || !url.username().is_empty() || url.password().is_some() {
        return false;
    }
    allowed.iter().filter_map(|a| url::Url::parse(a).ok()).any(|a| {
        a.scheme() == url.scheme()
            && a.host_str() == url.host_str()
            && a.port_or_known_default() == url.port_or_known_default()
            && a.path() == url.path()
    })
}

/// One session as a step of the flow sees it.
struct Flow {
    state: Arc<AppState>,
    ctx: CommandContext,
    id: Uuid,
    session: ConnectSession,
    integration: Integration,
    connector: Arc<Connector>,
}

impl Flow {
    /// A session of `project`, or the refusal for an unknown one.
    async fn session(
        state: &AppState,
        project: ProjectId,
        id: Uuid,
    ) -> Result<(CommandContext, ConnectSession), Refusal> {
        let ctx = CommandContext::new(project, format!("connect_session:{id}"));
        let session = state.service.load::<ConnectSession>(&ctx, id).await?.state;
        match session.exists {
            true => Ok((ctx, session)),
            false => Err(Refusal::invalid_link()),
        }
    }

    /// The rest of a session's flow, once the caller proved it may see it (its link
    /// token, or its attempt's state and cookie): nothing of the integration or the
    /// provider is told before.
    async fn with(
        state: &Arc<AppState>,
        ctx: CommandContext,
        id: Uuid,
        session: ConnectSession,
    ) -> Result<Flow, Refusal> {
        let request = session.request.clone().unwrap_or_default();
        let integration = state.service.load::<Integration>(&ctx, request.integration_id.0).await?.state;
        let connector = state.config.connectors.get(&request.provider).ok_or_else(|| {
            Refusal::new(
                StatusCode::CONFLICT,
                "provider_unavailable",
                "This provider cannot be connected here",
                format!("The deployment has no connector for `{}`.", request.provider),
            )
        })?;
        Ok(Flow { state: state.clone(), ctx, id, session, integration, connector })
    }

    async fn load(state: &Arc<AppState>, project: ProjectId, id: Uuid) -> Result<Flow, Refusal> {
        let (ctx, session) = Flow::session(state, project, id).await?;
        Flow::with(state, ctx, id, session).await
    }

    /// From a link token: the session whose `Created` digest it matches.
    async fn from_link(state: &Arc<AppState>, token: &str) -> Result<Flow, Refusal> {
        let (project, id, secret) = split_ids(token, 32).ok_or_else(Refusal::invalid_link)?;
        let (ctx, session) = Flow::session(state, project, id).await?;
        if !token_matches(&secret, &session) {
            return Err(Refusal::invalid_link());
        }
        Flow::with(state, ctx, id, session).await
    }

    /// The project's app at the provider, or the page that says it is missing.
    async fn client(&self) -> Result<(ClientApp, amplog_domain::provider_app::AppConfig), Refusal> {
        let client = self.state.service.provider_client(&self.ctx, &self.connector.name).await?.ok_or_else(|| {
            Refusal::new(
                StatusCode::CONFLICT,
                "provider_app_missing",
                "This integration is not set up yet",
                format!(
                    "The application has not configured its {} app. Nothing was changed.",
                    self.connector.entry.display_name
                ),
            )
        })?;
        let app = ClientApp { client_id: client.config.client_id.clone(), client_secret: client.client_secret.0 };
        Ok((app, client.config))
    }

    fn objects(&self) -> Vec<amplog_domain::integration::ObjectDecl> {
        let latest = self.integration.revisions.len() as u32;
        self.integration.revision(latest).map(|r| r.objects.values().cloned().collect()).unwrap_or_default()
    }

    /// Refusals for a session that cannot take a new attempt, before anything is shown.
    fn check_open(&self) -> Result<(), Refusal> {
        let probe = ConnectSessionCommand::StartAuthorization { state_digest: "probe".into(), at: Utc::now() };
        self.session.decide(&probe).map(|_| ()).map_err(|e| CommandError::Domain(e.into()).into())
    }

    fn cookie_name(&self) -> String {
        cookie_name(self.id)
    }
}

/// The cookie holding a session's browser nonce (and its link, for "Try again").
fn cookie_name(session: Uuid) -> String {
    format!("amplog_connect_{}", session.simple())
}

/// The redirect URI registered at the provider for this deployment.
fn redirect_uri(state: &AppState) -> String {
    format!("{}{CALLBACK_PATH}", state.public_url)
}

/// `GET /connect/{token}`: what the integration will read, with which scopes; "Connect".
async fn page(State(state): State<Arc<AppState>>, Path(token): Path<String>) -> Result<Html, Refusal> {
    let flow = Flow::from_link(&state, &token).await?;
    flow.check_open()?;
    let (_, config) = flow.client().await?;
    let provider = escape(&flow.connector.entry.display_name);
    let mut objects = String::new();
    for object in flow.objects() {
        let fields = match object.fields.is_empty() {
            true => "every field".to_string(),
            false => object.fields.iter().map(|f| format!("<code>{}</code>", escape(f))).collect::<Vec<_>>().join(", "),
        };
        let optional = if object.optional { r#" <span class="muted">(optional)</span>"# } else { "" };
        let _ = write!(objects, "<li><strong>{}</strong>{optional}: {fields}</li>", escape(&object.name));
    }
    let scopes = match config.scopes.is_empty() {
        true => "<li>the provider's basic access</li>".to_string(),
        false => config.scopes.iter().map(|s| format!("<li><code>{}</code></li>", escape(s))).collect(),
    };
    let body = format!(
        r#"<h1>Connect your {provider} account</h1>
<p><strong>{integration}</strong> will read:</p><ul id="objects">{objects}</ul>
<p>It asks {provider} for these permissions:</p><ul id="scopes">{scopes}</ul>
<form method="post" action="/connect/{token}" id="start"><button id="connect" type="submit">Connect {provider}</button></form>
<p class="muted">You will sign in at {provider} and come back here.</p>"#,
        integration = escape(&flow.integration.name),
        token = escape(&token),
    );
    // Framed in the builder's app, the provider's page opens in a new window (providers
    // refuse to be framed); the finish page then tells its opener.
    let script = "if (window.top !== window.self) document.getElementById('start').target = '_blank';";
    // The form's redirect goes to the provider: CSP's form-action covers it.
    let authorize = flow.connector.authorize_url(&redirect_uri(&state), "");
    Ok(Html {
        status: StatusCode::OK,
        body,
        form_action: origin(&authorize).into_iter().collect(),
        frame_ancestors: config.return_urls.iter().filter_map(|u| origin(u)).collect(),
        script: Some(script.into()),
        ..Html::default()
    })
}

/// Whether a form post comes from this site: `Sec-Fetch-Site` where the browser sends it,
/// else `Origin` (browsers send it on every POST; neither is a client that is no browser,
/// which a cross-site form cannot be).
fn same_origin(state: &AppState, headers: &HeaderMap) -> Result<(), Refusal> {
    let text = |name| headers.get(name).map(|v: &HeaderValue| v.to_str().unwrap_or("?"));
    let ours = origin(&state.public_url);
    let fine = match (text("sec-fetch-site"), text(header::ORIGIN.as_str())) {
        (Some(site), _) => site == "same-origin",
        (None, Some(presented)) => Some(presented) == ours.as_deref(),
        (None, None) => true,
    };
    match fine {
        true => Ok(()),
        false => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "cross_site",
            "This form was sent from another site",
            "Nothing was changed. Open the connect link directly.",
        )),
    }
}

fn state_digest(state_text: &str, browser: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"amplog-connect-state\0")
        .chain_update(state_text.as_bytes())
        .chain_update(b"\0")
        .chain_update(browser.as_bytes())
        .finalize();
    hex::encode(digest)
}

/// `POST /connect/{token}`: a new attempt. The state names the session; its digest (with
/// this browser's cookie) goes into `AuthorizationStarted`; then the provider's consent.
async fn start(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Result<Response, Refusal> {
    same_origin(&state, &headers)?;
    let flow = Flow::from_link(&state, &token).await?;
    flow.check_open()?;
    let (app, config) = flow.client().await?;
    let mut raw = Vec::with_capacity(48);
    raw.extend_from_slice(flow.ctx.project_id.0.as_bytes());
    raw.extend_from_slice(flow.id.as_bytes());
    raw.extend_from_slice(&random_bytes::<16>());
    let state_text = B64.encode(raw);
    let browser = B64.encode(random_bytes::<16>());
    let digest = state_digest(&state_text, &browser);
    state.service.start_connect_authorization(&flow.ctx, flow.id, &digest).await?;
    let verifier = pkce_verifier(&state, &state_text);
    let challenge = B64.encode(Sha256::digest(verifier.as_bytes()));
    let location =
        flow.connector.authorize_url_for(&app, &redirect_uri(&state), &state_text, &config.scopes, Some(&challenge));
    let max_age = flow.session.expires_at.map(|end| (end - Utc::now()).num_seconds().max(0)).unwrap_or(0);
    let secure = if state.public_url.starts_with("https://") { "; Secure" } else { "" };
    let cookie = format!(
        "{}={browser}.{token}; Path=/v1/oauth; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}",
        flow.cookie_name()
    );
    let mut response = (StatusCode::SEE_OTHER, [(header::CACHE_CONTROL, "no-store")]).into_response();
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_str(&location).map_err(|_| Refusal::invalid_link())?);
    headers.insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).map_err(|_| Refusal::invalid_link())?);
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static(REFERRER_POLICY));
    Ok(response)
}

/// The PKCE verifier of an attempt: derived from its state under the deployment's key, so
/// it is never stored and only this deployment can compute it (43 characters, RFC 7636).
fn pkce_verifier(state: &AppState, state_text: &str) -> String {
    B64.encode(state.service.credentials().key().derive("pkce-verifier", state_text.as_bytes()))
}

/// This browser's part of an attempt: the cookie the start step set, as
/// `(browser nonce, link token)`.
fn browser_cookie(headers: &HeaderMap, name: &str) -> Option<(String, String)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.split_once('.'))
        .filter(|(nonce, token)| nonce.len() <= MAX_TOKEN && token.len() <= MAX_TOKEN)
        .map(|(nonce, token)| (nonce.to_string(), token.to_string()))
}

/// A step after the start: the session named by the state, and the digest this browser's
/// cookie makes of it (a forged state, or one from another browser, matches nothing).
async fn attempt(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    state_text: &str,
) -> Result<(Flow, String, Option<String>), Refusal> {
    let (project, id, _) = split_ids(state_text, 16).ok_or_else(Refusal::unknown_state)?;
    let (ctx, session) = Flow::session(state, project, id).await.map_err(|_| Refusal::unknown_state())?;
    let name = cookie_name(id);
    let (digest, link) = match browser_cookie(headers, &name) {
        Some((browser, link)) => (state_digest(state_text, &browser), Some(link)),
        None => (String::new(), None),
    };
    // Not this browser's current attempt: refused before anything of the session's
    // integration or provider is looked at (a completed session says only that).
    if session.status == SessionStatus::Completed {
        return Err(CommandError::Domain(ConnectSessionError::AlreadyCompleted.into()).into());
    }
    if session.state_digest.as_deref() != Some(digest.as_str()) {
        return Err(CommandError::Domain(ConnectSessionError::StateMismatch.into()).into());
    }
    // A link from the cookie that is not this session's is not offered for a retry.
    let link = link.filter(|l| {
        split_ids(l, 32).is_some_and(|(p, s, secret)| p == project && s == id && token_matches(&secret, &session))
    });
    let flow = Flow::with(state, ctx, id, session).await?;
    Ok((flow, digest, link))
}

#[derive(Deserialize)]
struct CallbackQuery {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
}

/// `GET /v1/oauth/callback`: the provider's answer. A refusal is recorded (the session can
/// be tried again); a code is exchanged, with the PKCE verifier, and the account recorded
/// with the session `Connected` in one transaction.
async fn callback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<CallbackQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Refusal> {
    let Query(query) = query.map_err(|_| Refusal::unknown_state())?;
    let state_text = query.state.filter(|s| s.len() <= MAX_TOKEN).ok_or_else(Refusal::unknown_state)?;
    let (flow, digest, link) = attempt(&state, &headers, &state_text).await?;
    if flow.session.status == SessionStatus::Connected {
        // This browser's attempt already connected the account (a reload, the back
        // button): the next step again, without spending another code.
        return next_after_connected(&flow, &digest, &state_text).await;
    }
    // The session's own rules before anything else: a replayed, stale or foreign callback
    // is refused without calling the provider.
    let probe = ConnectSessionCommand::Connect {
        state_digest: digest.clone(),
        connection_id: ConnectionId(Uuid::nil()),
        at: Utc::now(),
    };
    flow.session.decide(&probe).map_err(|e| Refusal::from(CommandError::Domain(e.into())))?;
    if let Some(error) = query.error {
        let reason: String = error.chars().take(64).filter(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let reason = if reason.is_empty() { "provider_error".to_string() } else { reason };
        state.service.record_connect_failure(&flow.ctx, flow.id, &digest, &reason).await?;
        let denied = reason == "access_denied";
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            if denied { "access_denied" } else { "provider_refused" },
            if denied { "Access was not granted" } else { "The provider did not grant access" },
            format!("Nothing was connected ({reason})."),
        )
        .with_retry(link.as_deref()));
    }
    let code = query.code.filter(|c| !c.is_empty() && c.len() <= MAX_CODE).ok_or_else(Refusal::unknown_state)?;
    let (app, _) = flow.client().await?;
    let verifier = pkce_verifier(&state, &state_text);
    let tokens = match flow.connector.exchange_code_for(&app, &code, &redirect_uri(&state), Some(&verifier)).await {
        Ok(tokens) => tokens,
        Err(error) => {
            tracing::warn!(session = %flow.id, class = ?error.class, "the provider refused the code exchange");
            state.service.record_connect_failure(&flow.ctx, flow.id, &digest, "exchange_refused").await?;
            return Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                "exchange_refused",
                "The provider did not complete the sign-in",
                "Nothing was connected.",
            )
            .with_retry(link.as_deref()));
        }
    };
    let secret = Secret(serde_json::to_string(&tokens).expect("token sets serialise"));
    if let Err(error) = state.service.connect_session_account(&flow.ctx, flow.id, &digest, &secret).await {
        // Not recorded (a concurrent callback won, the session changed): the grant would be
        // left live and unused at the provider. A collision is this attempt already used.
        if let Err(revoke) = flow.connector.revoke(&app, &tokens).await {
            tracing::warn!(session = %flow.id, class = ?revoke.class, "revoking an unrecorded grant failed");
        }
        return Err(match error {
            CommandError::Conflict { .. } => CommandError::Domain(ConnectSessionError::StateUsed.into()).into(),
            other => other.into(),
        });
    }
    let flow = Flow::load(&state, flow.ctx.project_id, flow.id).await?;
    next_after_connected(&flow, &digest, &state_text).await
}

/// After the account is connected: the choice of optional objects when the manifest has
/// any (shown again on a reload), else the end.
async fn next_after_connected(flow: &Flow, digest: &str, state_text: &str) -> Result<Response, Refusal> {
    let optional: Vec<_> = flow.objects().into_iter().filter(|o| o.optional).collect();
    let reconnecting = flow.session.request.as_ref().is_some_and(|r| r.reconnect.is_some());
    if reconnecting || optional.is_empty() {
        return complete(flow, digest, None).await;
    }
    let mut choices = String::new();
    for object in &optional {
        let name = escape(&object.name);
        let _ = write!(
            choices,
            r#"<li><label><input type="checkbox" name="object" value="{name}" checked> {name}</label></li>"#
        );
    }
    let required: Vec<String> = flow.objects().iter().filter(|o| !o.optional).map(|o| escape(&o.name)).collect();
    let body = format!(
        r#"<h1>Choose what to share</h1><p>Your {provider} account is connected.</p>
<p>Always read: {required}</p>
<form method="post" action="/v1/oauth/finish" id="finish"><input type="hidden" name="state" value="{state}">
<ul id="optional">{choices}</ul><button id="done" type="submit">Finish</button></form>"#,
        provider = escape(&flow.connector.entry.display_name),
        required = if required.is_empty() { "nothing else".into() } else { required.join(", ") },
        state = escape(state_text),
    );
    let back = flow.session.request.as_ref().and_then(|r| r.return_url.as_deref()).and_then(origin);
    Ok(Html { status: StatusCode::OK, body, form_action: back.into_iter().collect(), ..Html::default() }
        .into_response())
}

/// `POST /v1/oauth/finish`: the objects chosen; the installation and the session's end.
async fn finish(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Result<Response, Refusal> {
    same_origin(&state, &headers)?;
    let mut state_text = None;
    let mut chosen = Vec::new();
    for (key, value) in url::form_urlencoded::parse(&body).take(1_000) {
        match &*key {
            "state" => state_text = Some(value.into_owned()),
            "object" if chosen.len() < 500 => chosen.push(value.into_owned()),
            _ => {}
        }
    }
    let state_text = state_text.filter(|s| s.len() <= MAX_TOKEN).ok_or_else(Refusal::unknown_state)?;
    let (flow, digest, _) = attempt(&state, &headers, &state_text).await?;
    let latest = flow.integration.revisions.len() as u32;
    let mut objects = amplog_commands::service::default_objects(&flow.integration, latest);
    for object in flow.objects().iter().filter(|o| o.optional) {
        if let Some(config) = objects.get_mut(&object.name) {
            config.enabled = chosen.contains(&object.name);
        }
    }
    complete(&flow, &digest, Some(&objects)).await
}

/// Completes the session (the installation made), then the way back: the return URL with
/// the ids, or a page that tells its opener.
async fn complete(
    flow: &Flow,
    digest: &str,
    objects: Option<&BTreeMap<String, ObjectConfig>>,
) -> Result<Response, Refusal> {
    flow.state.service.complete_connect_session(&flow.ctx, flow.id, digest, objects).await?;
    let done = flow.state.service.load::<ConnectSession>(&flow.ctx, flow.id).await?.state;
    let request = done.request.clone().unwrap_or_default();
    let connection = done.connection_id.map(|c| c.to_string()).unwrap_or_default();
    let installation = done.installation_id.map(|i| i.to_string()).unwrap_or_default();
    let clear = format!("{}=; Path=/v1/oauth; Max-Age=0; HttpOnly; SameSite=Lax", flow.cookie_name());
    // The app's return URLs as they are now: one removed since the session began is not
    // gone back to; they are also the only origins told by `postMessage`.
    let allowed = match flow.state.service.provider_client(&flow.ctx, &flow.connector.name).await {
        Ok(Some(client)) => client.config.return_urls,
        _ => Vec::new(),
    };
    if let Some(url) = request.return_url.as_ref().filter(|u| return_url_allowed(u, &allowed)) {
        let url = with_ids(
            url,
            &[
                ("amplog_status", "connected"),
                ("connection_id", &connection),
                ("installation_id", &installation),
                ("session_id", &flow.id.to_string()),
            ],
        )
        .ok_or_else(Refusal::invalid_link)?;
        let mut response = (StatusCode::SEE_OTHER, [(header::CACHE_CONTROL, "no-store")]).into_response();
        let headers = response.headers_mut();
        headers.insert(header::LOCATION, HeaderValue::from_str(url.as_str()).map_err(|_| Refusal::invalid_link())?);
        headers.insert(header::SET_COOKIE, HeaderValue::from_str(&clear).map_err(|_| Refusal::invalid_link())?);
        headers.insert(header::REFERRER_POLICY, HeaderValue::from_static(REFERRER_POLICY));
        return Ok(response);
    }
    let message = serde_json::json!({
        "type": "amplog:connected",
        "sessionId": flow.id,
        "connectionId": connection,
        "installationId": installation,
    });
    let origins: Vec<String> = allowed.iter().filter_map(|u| origin(u)).collect();
    let targets = match origins.is_empty() {
        // No return URL configured: the opener's origin is not known.
        true => vec!["*".to_string()],
        false => origins,
    };
    let script = format!(
        "if (window.opener) {{ for (const o of {}) {{ try {{ window.opener.postMessage({}, o); }} catch (e) {{}} }} }}",
        serde_json::to_string(&targets).expect("strings serialise").replace('<', "\\u003c"),
        message.to_string().replace('<', "\\u003c")
    );
    let body = format!(
        r#"<h1>Connected</h1><p id="message">Your {} account is connected. You can close this window.</p>"#,
        escape(&flow.connector.entry.display_name)
    );
    Ok(Html { status: StatusCode::OK, body, script: Some(script), cookie: Some(clear), ..Html::default() }
        .into_response())
}

/// The parameters amplog adds to a return URL; a builder's own of those names are dropped
/// (an end user could otherwise pre-fill them).
pub const RESERVED_RETURN_PARAMS: [&str; 4] = ["amplog_status", "connection_id", "installation_id", "session_id"];

/// `url` with its reserved parameters replaced by `ids`.
pub fn with_ids(url: &str, ids: &[(&str, &str)]) -> Option<url::Url> {
    let mut url = url::Url::parse(url).ok()?;
    let kept: Vec<(String, String)> =
        url.query_pairs().into_owned().filter(|(k, _)| !RESERVED_RETURN_PARAMS.contains(&k.as_str())).collect();
    {
        let mut query = url.query_pairs_mut();
        query.clear().extend_pairs(kept);
        query.extend_pairs(ids.iter().copied());
    }
    if url.query() == Some("") {
        url.set_query(None);
    }
    Some(url)
}

/// A session's state as the page flow leaves it, for the API (`connectSession`).
pub fn status_of(session: &ConnectSession) -> &'static str {
    match (session.exists, session.expires_at) {
        (true, Some(end)) if end <= Utc::now() && session.status != SessionStatus::Completed => "expired",
        _ => session.status.as_str(),
    }
}
