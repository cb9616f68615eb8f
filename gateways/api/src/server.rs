//! `amplog serve`: the axum router (GraphQL over HTTP and WebSocket, health, readiness,
//! metrics, the audit export), authentication, request limits and graceful shutdown.

use crate::auth::{Keys, Principal, Scope};
use crate::error::ApiError;
use crate::graphql::{self, guard, AmplogSchema};
use crate::state::{stopped, AppState, Counted, Limits, ServerConfig, Slot, SocketCounts};
use crate::tenant::TenantDb;
use amplog_commands::CommandService;
use amplog_log::audit::{self, HistoryRange};
use amplog_log::LogCursor;
use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql::{Data, Executor};
use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::any::TypeId;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

/// Bytes of query text the parsed-document cache holds at most (weighed as guard.rs says).
const PARSED_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes the compiled plans may take (weighed as compiled.rs says).
const PLAN_CACHE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Clone)]
struct Shared {
    state: Arc<AppState>,
    schema: AmplogSchema,
    /// The limits in force (introspection on in `--dev`).
    limits: Arc<Limits>,
    /// In `--dev`: the schema that answers introspection-only queries (deeper nesting).
    introspection: Option<AmplogSchema>,
    /// Compiled read queries by text (`graphql::compiled`).
    plans: graphql::compiled::PlanCache,
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), std::io::Error>>,
}

impl Server {
    /// Binds `config.listen` (port 0 picks a free port) and serves until `stop`.
    pub async fn start(config: ServerConfig, service: CommandService, keys: Keys) -> Result<Server, std::io::Error> {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let (stop, shutdown) = watch::channel(false);
        let (projected, _) = broadcast::channel(16);
        tokio::spawn(relay_projected(service.pool().clone(), projected.clone(), shutdown.clone()));
        let parsed = guard::parsed_cache(PARSED_CACHE_BYTES);
        let (sockets, feeds) = (Arc::default(), Default::default());
        let public_url = config.public_url.clone().unwrap_or_else(|| format!("http://{addr}"));
        let public_url = public_url.trim_end_matches('/').to_string();
        let tokens = amplog_providers::tokens::Tokens::new(service.clone());
        if config.metrics_per_project {
            amplog_log::telemetry::metrics().set_per_project(true);
        }
        let state = Arc::new(AppState {
            service,
            keys,
            tokens,
            config,
            public_url,
            projected,
            shutdown: shutdown.clone(),
            parsed,
            sockets,
            feeds,
        });
        let router = router(state);
        let mut until = shutdown;
        // Without TCP_NODELAY a response written in two parts (a proxied body after its
        // headers) waits for the client's delayed ACK: 40 ms.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "TCP_NODELAY could not be set");
            }
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, router).with_graceful_shutdown(async move { stopped(&mut until).await }).await
        });
        tracing::info!(%addr, "serving: POST /graphql, GET /graphql/ws, /healthz, /readyz, /metrics");
        Ok(Server { addr, stop, task })
    }

    /// Stops accepting, ends subscriptions, lets in-flight requests finish.
    pub async fn stop(self) -> Result<(), std::io::Error> {
        self.stop.send(true).ok();
        self.task.await.map_err(std::io::Error::other)?
    }
}

/// Turns the projectors' NOTIFYs into ticks for subscriptions.
async fn relay_projected(pool: sqlx::PgPool, ticks: broadcast::Sender<()>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            Err(error) = listen_projected(&pool, &ticks) => {
                tracing::warn!(%error, "listening for projector batches failed; subscriptions poll meanwhile");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Ticks `ticks` for each projector NOTIFY until the listening connection fails.
async fn listen_projected(pool: &sqlx::PgPool, ticks: &broadcast::Sender<()>) -> Result<Infallible, sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    listener.listen(amplog_projections::PROJECTED_CHANNEL).await?;
    loop {
        listener.recv().await?;
        ticks.send(()).ok();
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let limits = Limits { introspection: state.config.dev, ..state.config.limits.clone() };
    let schema = graphql::build(state.clone(), &limits);
    let introspection = limits.introspection.then(|| graphql::build_introspection(state.clone(), &limits));
    let body_limit = state.config.body_limit;
    let connect = crate::connect::router(state.clone());
    let proxy = crate::proxy::router(state.clone());
    let subscribe = crate::subscribe::router(state.clone());
    let plans = graphql::compiled::plan_cache(PLAN_CACHE_BYTES);
    let shared = Shared { state, schema, limits: Arc::new(limits), introspection, plans };
    Router::new()
        .route("/graphql", get(graphiql).post(graphql_http))
        .route("/graphql/ws", get(graphql_ws))
        .route("/graphql/assets/{name}", get(graphiql_asset))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/audit/installations/{id}/events", get(export_events))
        .route("/v1/audit/project/events", get(export_project_events))
        .fallback(|| async { ApiError::NotFound("route") })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(shared)
        .merge(connect)
        .merge(proxy)
        .merge(subscribe)
        .layer(axum::middleware::from_fn(observe))
}

/// Counts each request in this process's metrics by its route pattern (never the raw path,
/// which carries ids), method and status, timed to the response's head.
async fn observe(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let started = std::time::Instant::now();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().clone();
    // The request's span, a child of the caller's when it sends a W3C `traceparent`.
    let span = tracing::info_span!(
        "http.request",
        otel.name = format!("{} {route}", amplog_log::telemetry::method_label(method.as_str())).as_str(),
        otel.kind = "server",
        http.request.method = amplog_log::telemetry::method_label(method.as_str()),
        http.route = route.as_str(),
        http.response.status_code = tracing::field::Empty,
    );
    let traceparent = request.headers().get("traceparent").and_then(|v| v.to_str().ok());
    amplog_log::telemetry::follow(&span, traceparent);
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    amplog_log::telemetry::metrics().http_request(
        &route,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key") {
        return key.to_str().ok();
    }
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

/// The caller: an admin key (`X-Admin-Key`, acting in the project `X-Amplog-Project`
/// names; its use recorded as `what`), an API key or an end user's token.
pub(crate) async fn authenticate(state: &AppState, headers: &HeaderMap, what: &str) -> Result<Principal, ApiError> {
    if let Some(admin) = headers.get("x-admin-key") {
        let admin = admin.to_str().map_err(|_| ApiError::Unauthenticated)?;
        let project = headers.get("x-amplog-project").and_then(|v| v.to_str().ok()).ok_or_else(|| {
            ApiError::bad_request("project_required", "an admin key names the project it acts in: X-Amplog-Project")
        })?;
        let project = Uuid::try_parse(project).map_err(|_| ApiError::NotFound("project"))?;
        return state.keys.authenticate_admin(admin, amplog_domain::ProjectId(project), what).await;
    }
    let key = presented_key(headers).ok_or(ApiError::Unauthenticated)?;
    state.keys.authenticate(key).await
}

async fn graphql_http(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let state = &shared.state;
    let principal = authenticate(state, &headers, "graphql").await?;
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(state.config.body_limit),
        _ => ApiError::bad_request("bad_request", rejection.body_text()),
    })?;
    let request: async_graphql::Request = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("bad_request", format!("the body is not a GraphQL request: {e}")))?;
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 200)
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_input", "Idempotency-Key must be 1 to 200 visible ASCII characters")
                })?
                .to_string(),
        ),
    };
    if idempotency_key.is_none() {
        if let Some(body) = answer_by_plan(&shared, &principal, &request).await? {
            return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
        }
    }
    let checked = guard::check(request, &shared.limits, &state.parsed)?;
    let response = execute_once(&shared, principal, checked, idempotency_key, true).await?;
    Ok(Json(response).into_response())
}

/// The answer of a request's compiled plan (`graphql::compiled`), if it has one and it
/// answers: bound to the request's variables, its documents read in one round trip, its
/// body written whole. `None` sends the request to the executor, which answers everything
/// (the refusals included) as always; a read past the request timeout is the timeout.
/// Run in the handler: the plan's one statement holds no transaction open, so a client
/// hanging up mid-read leaves nothing behind.
async fn answer_by_plan(
    shared: &Shared,
    principal: &Principal,
    request: &async_graphql::Request,
) -> Result<Option<Vec<u8>>, ApiError> {
    let state = &shared.state;
    if !state.config.compiled_reads {
        return Ok(None);
    }
    let Some(cached) = shared.plans.get(&(request.query.clone(), request.operation_name.clone())) else {
        return Ok(None);
    };
    let Some(plan) = cached.as_ref().as_ref() else { return Ok(None) };
    let Some(bound) = plan.bind(&request.variables, shared.limits.complexity) else { return Ok(None) };
    let span = tracing::info_span!(
        "graphql",
        otel.name = plan.span_name(),
        graphql.operation.type = "query",
        graphql.operation.name = graphql::span_name(request.operation_name.as_deref().unwrap_or("")),
        graphql.fields = plan.fields(),
    );
    let db = TenantDb::new(state.service.pool().clone(), principal.project_id, state.config.statement_timeout_ms)
        .with_group(principal.group.clone());
    let read = tracing::Instrument::instrument(db.read_once(&bound.reads), span);
    let fetched = match tokio::time::timeout(state.config.request_timeout, read).await {
        Ok(Ok(fetched)) => fetched,
        Ok(Err(_)) => return Ok(None),
        Err(_) => return Err(ApiError::Timeout(state.config.request_timeout)),
    };
    let Some(mut body) = bound.answer(fetched) else { return Ok(None) };
    amplog_log::telemetry::metrics().graphql_answer("plan");
    if state.config.dev {
        body.pop();
        body.extend_from_slice(b",\"extensions\":{\"sqlStatements\":1}}");
    }
    Ok(Some(body))
}

/// Executes a checked query or mutation for `principal` within the request timeout;
/// `compiled`: compile it for later requests (over HTTP) when the executor answers cleanly.
async fn execute_once(
    shared: &Shared,
    principal: Principal,
    checked: guard::Checked,
    idempotency_key: Option<String>,
    compiled: bool,
) -> Result<async_graphql::Response, ApiError> {
    let state = &shared.state;
    let schema = match (&shared.introspection, checked.introspection_only) {
        (Some(introspection), true) => introspection.clone(),
        _ => shared.schema.clone(),
    };
    let mut request = checked.request;
    // The operation's span: its kind and root fields, never its text or variables.
    let span = tracing::info_span!(
        "graphql",
        otel.name = tracing::field::Empty,
        graphql.operation.type = tracing::field::Empty,
        graphql.operation.name = graphql::span_name(request.operation_name.as_deref().unwrap_or("")),
        graphql.fields = tracing::field::Empty,
    );
    if !span.is_disabled() {
        let (kind, fields) = graphql::describe(&mut request);
        span.record("otel.name", format!("{kind} {fields}").as_str());
        span.record("graphql.operation.type", kind);
        span.record("graphql.fields", fields.as_str());
    }
    let db = Arc::new(
        TenantDb::new(state.service.pool().clone(), principal.project_id, state.config.statement_timeout_ms)
            .with_group(principal.group.clone()),
    );
    // A read query compiled before (or to compile if the executor answers it cleanly).
    let plan_key = (compiled && state.config.compiled_reads && !checked.introspection_only)
        .then(|| (request.query.clone(), request.operation_name.clone()));
    let cached = plan_key.as_ref().is_some_and(|key| shared.plans.contains_key(key));
    let candidate = match (&plan_key, cached) {
        (Some((_, operation)), false) => {
            request.parsed_query().ok().map(|doc| graphql::compiled::compile(doc, operation.as_deref()))
        }
        _ => None,
    };
    let plans = shared.plans.clone();
    let request = graphql::request_data(request, principal, db.clone(), idempotency_key);
    // Executed on its own task: a timeout or a client hanging up stops waiting for it, but
    // never cancels it halfway through a PostgreSQL exchange (a connection must not go back
    // to the pool in the middle of a BEGIN). statement_timeout bounds what keeps running.
    // The response goes back before the read-only transaction is rolled back.
    let (done, answer) = tokio::sync::oneshot::channel();
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let response = schema.execute(request).await;
            if compiled {
                amplog_log::telemetry::metrics().graphql_answer("executor");
            }
            if let (Some(key), Some(compiled)) = (plan_key, candidate) {
                if response.errors.is_empty() {
                    plans.insert(key, Arc::new(compiled));
                }
            }
            let _ = done.send((response, db.uses()));
            db.release().await;
        },
        span,
    ));
    let (mut response, uses) = match tokio::time::timeout(state.config.request_timeout, answer).await {
        Ok(Ok(done)) => done,
        Ok(Err(_)) => return Err(ApiError::Internal("the request's task ended without an answer".into())),
        Err(_) => return Err(ApiError::Timeout(state.config.request_timeout)),
    };
    if state.config.dev {
        response.extensions.insert("sqlStatements".into(), async_graphql::Value::from(uses as i32));
    }
    // Errors the executor raised itself (syntax, validation, limits) get a code too; in
    // production they suggest no names ("Did you mean …" would map a hidden schema).
    for error in &mut response.errors {
        let extensions = error.extensions.get_or_insert_with(Default::default);
        if extensions.get("code").is_none() {
            extensions.set("code", "graphql_validation");
            extensions.set("status", 400);
            if !state.config.dev {
                if let Some(at) = error.message.find(" Did you mean") {
                    error.message.truncate(at);
                }
            }
        }
    }
    Ok(response)
}

async fn graphiql(State(shared): State<Shared>) -> Response {
    if shared.state.config.dev {
        Html(crate::graphiql::PAGE).into_response()
    } else {
        ApiError::NotFound("route").into_response()
    }
}

async fn graphiql_asset(State(shared): State<Shared>, Path(name): Path<String>) -> Response {
    match crate::graphiql::asset(&name) {
        Some(asset) if shared.state.config.dev => asset,
        _ => ApiError::NotFound("route").into_response(),
    }
}

/// GraphQL over WebSocket (graphql-transport-ws and graphql-ws). The key comes from the
/// upgrade request's `X-Api-Key`, or from `connection_init`'s payload `{"apiKey": ...}`.
/// Messages are bounded like HTTP bodies, and every operation passes the same checks as an
/// HTTP request (`WsExecutor`), with the key checked again for each one.
async fn graphql_ws(
    State(shared): State<Shared>,
    headers: HeaderMap,
    protocol: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
) -> Response {
    let from_header = match presented_key(&headers) {
        Some(key) => match authenticate(&shared.state, &headers, "websocket").await {
            Ok(_) => Some(key.to_string()),
            Err(e) => return e.into_response(),
        },
        None => None,
    };
    let limit = shared.state.config.body_limit;
    upgrade.max_message_size(limit).max_frame_size(limit).protocols(ALL_WEBSOCKET_PROTOCOLS).on_upgrade(
        move |socket| async move {
            let state = shared.state.clone();
            let limits = shared.limits.clone();
            GraphQLWebSocket::new(socket, WsExecutor(shared), protocol)
                .on_connection_init(move |payload: serde_json::Value| async move {
                    let key = match from_header {
                        Some(key) => key,
                        None => payload
                            .get("apiKey")
                            .or_else(|| payload.get("X-Api-Key"))
                            .and_then(|k| k.as_str())
                            .unwrap_or_default()
                            .to_string(),
                    };
                    let principal = state.keys.authenticate(&key).await.map_err(async_graphql::Error::from)?;
                    let slot = state
                        .sockets
                        .acquire(principal.limit_key(), Counted::Connections, limits.ws_connections_per_key)
                        .ok_or_else(|| {
                            async_graphql::Error::from(ApiError::bad_request(
                                "too_many_connections",
                                format!(
                                    "this key already holds {} WebSocket connections",
                                    limits.ws_connections_per_key
                                ),
                            ))
                        })?;
                    let mut data = Data::default();
                    data.insert(Arc::new(WsSession { key, _connection: slot, subscriptions: Arc::default() }));
                    Ok(data)
                })
                .serve()
                .await;
        },
    )
}

/// One WebSocket connection: its key (checked again for every operation and every
/// subscription event, so a revoked key stops being answered) and its open subscriptions.
struct WsSession {
    key: String,
    _connection: Slot,
    subscriptions: Arc<SocketCounts>,
}

/// What is counted per API key.
/// Runs WebSocket operations the way HTTP requests run: the same checks, the same per-request
/// data (tenant transaction, DataLoader), the same timeout for queries and mutations.
#[derive(Clone)]
struct WsExecutor(Shared);

impl Executor for WsExecutor {
    async fn execute(&self, _request: async_graphql::Request) -> async_graphql::Response {
        error_response(ApiError::Unauthenticated)
    }

    fn execute_stream(
        &self,
        request: async_graphql::Request,
        session: Option<Arc<Data>>,
    ) -> BoxStream<'static, async_graphql::Response> {
        let shared = self.0.clone();
        futures::stream::once(async move {
            ws_operation(shared, request, session)
                .await
                .unwrap_or_else(|e| futures::stream::iter([error_response(e)]).boxed())
        })
        .flatten()
        .boxed()
    }
}

async fn ws_operation(
    shared: Shared,
    request: async_graphql::Request,
    session: Option<Arc<Data>>,
) -> Result<BoxStream<'static, async_graphql::Response>, ApiError> {
    let session = session
        .as_ref()
        .and_then(|data| data.get(&TypeId::of::<Arc<WsSession>>()))
        .and_then(|s| s.downcast_ref::<Arc<WsSession>>())
        .cloned()
        .ok_or(ApiError::Unauthenticated)?;
    let state = shared.state.clone();
    let principal = state.keys.authenticate(&session.key).await?;
    let checked = guard::check(request, &shared.limits, &state.parsed)?;
    if !checked.subscription {
        let response = execute_once(&shared, principal, checked, None, false).await?;
        return Ok(futures::stream::iter([response]).boxed());
    }
    let too_many = |n: usize, per: &str| {
        ApiError::bad_request("too_many_subscriptions", format!("at most {n} subscriptions may run per {per}"))
    };
    let limits = &shared.limits;
    let slots = (
        session
            .subscriptions
            .acquire(Uuid::nil(), Counted::Subscriptions, limits.subscriptions_per_connection)
            .ok_or_else(|| too_many(limits.subscriptions_per_connection, "connection"))?,
        state
            .sockets
            .acquire(principal.limit_key(), Counted::Subscriptions, limits.subscriptions_per_key)
            .ok_or_else(|| too_many(limits.subscriptions_per_key, "API key"))?,
    );
    let db = Arc::new(
        TenantDb::new(state.service.pool().clone(), principal.project_id, state.config.statement_timeout_ms)
            .with_group(principal.group.clone()),
    );
    let request = graphql::request_data(checked.request, principal, db.clone(), None);
    let events = shared.schema.execute_stream(request);
    Ok(futures::stream::unfold(Some((events, db, session, slots, state)), |running| async move {
        let (mut events, db, session, slots, state) = running?;
        let response = events.next().await?;
        db.release().await;
        if let Err(e) = state.keys.authenticate(&session.key).await {
            return Some((error_response(e), None));
        }
        Some((response, Some((events, db, session, slots, state))))
    })
    .boxed())
}

/// A GraphQL response holding one API error.
fn error_response(e: ApiError) -> async_graphql::Response {
    let error = async_graphql::Error::from(e);
    let mut server = async_graphql::ServerError::new(error.message, None);
    server.extensions = error.extensions;
    async_graphql::Response::from_errors(vec![server])
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    database: bool,
    migrations: bool,
    projector: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

/// Ready when PostgreSQL answers, the schema is current, and the read-model projector has
/// a leader with a fresh heartbeat (in this process or another).
async fn readyz(State(shared): State<Shared>) -> Response {
    let ready = readiness(&shared.state).await;
    let status = if ready.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(ready)).into_response()
}

async fn readiness(state: &AppState) -> Readiness {
    let mut ready = Readiness { ready: false, database: false, migrations: false, projector: false, detail: None };
    // Bounded: a scrape or a probe never waits on a saturated pool.
    let check = async {
        let mut conn = state.service.pool().acquire().await?;
        ready.database = true;
        ready.migrations =
            amplog_migrations::is_current(&mut conn).await.map_err(amplog_commands::CommandError::from)?;
        drop(conn);
        let status = amplog_projections::status(state.service.pool(), amplog_projections::READ_MODELS).await?;
        let fresh = status
            .heartbeat
            .is_some_and(|h| (Utc::now() - h).to_std().unwrap_or_default() < state.config.projector_stale_after);
        ready.projector = status.leader.is_some() && fresh;
        if !ready.projector {
            ready.detail = Some(format!(
                "projector {}: leader {:?}, heartbeat {:?}",
                status.name, status.leader, status.heartbeat
            ));
        }
        Ok::<(), ApiError>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => ready.detail = Some(error.public_message()),
        Err(_) => ready.detail = Some("the readiness checks took more than 2 s".into()),
    }
    ready.ready = ready.database && ready.migrations && ready.projector;
    ready
}

/// Whether the request carries `Authorization: Bearer {token}` (compared in constant time).
pub(crate) fn presents_token(headers: &HeaderMap, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let digest = |s: &str| <sha2::Sha256 as sha2::Digest>::digest(s.as_bytes());
    bool::from(digest(presented).ct_eq(&digest(token)))
}

/// Prometheus metrics: OpenMetrics to a client that asks for it (`Accept`), the
/// Prometheus text format otherwise; behind the metrics token when one is configured.
async fn metrics(State(shared): State<Shared>, headers: HeaderMap) -> Result<Response, ApiError> {
    let config = &shared.state.config;
    if config.metrics_token.as_deref().is_some_and(|token| !presents_token(&headers, token)) {
        return Err(ApiError::Unauthenticated);
    }
    use amplog_projections::metrics::{self, OPENMETRICS, PROMETHEUS_TEXT};
    let derived = metrics::render(shared.state.service.pool(), config.metrics_per_project).await?;
    let ready = readiness(&shared.state).await.ready;
    let text =
        amplog_log::telemetry::join(&[&derived, &amplog_log::telemetry::metrics().render(), &ready_gauge(ready)]);
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if accept.contains("application/openmetrics-text") {
        Ok(([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response())
    } else {
        Ok(([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], metrics::as_prometheus_text(&text)).into_response())
    }
}

/// `amplog_ready`: whether this process would answer its readiness probe with 200.
pub(crate) fn ready_gauge(ready: bool) -> String {
    format!(
        "# HELP amplog_ready 1 when this process is ready\n# TYPE amplog_ready gauge\namplog_ready {}\n",
        u8::from(ready)
    )
}

#[derive(Deserialize)]
struct ExportParams {
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
}

const EXPORT_PAGE: i64 = 1000;

/// Which timeline an export streams.
#[derive(Clone, Copy)]
enum Timeline {
    Installation(Uuid),
    Project(amplog_domain::ProjectId),
}

/// `GET /v1/audit/installations/{id}/events`: the installation's timeline as NDJSON, in log
/// order, streamed page by page (memory stays flat however long the history).
async fn export_events(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    params: Result<Query<ExportParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = Uuid::try_parse(&id).map_err(|_| ApiError::NotFound("installation"));
    export(shared, headers, params, |_| id.map(Timeline::Installation)).await
}

/// `GET /v1/audit/project/events`: the key's project's configuration history as NDJSON.
async fn export_project_events(
    State(shared): State<Shared>,
    headers: HeaderMap,
    params: Result<Query<ExportParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    export(shared, headers, params, |principal| {
        principal.require(Scope::Admin)?;
        principal.require_key()?;
        Ok(Timeline::Project(principal.project_id))
    })
    .await
}

async fn export(
    shared: Shared,
    headers: HeaderMap,
    params: Result<Query<ExportParams>, axum::extract::rejection::QueryRejection>,
    timeline: impl FnOnce(&Principal) -> Result<Timeline, ApiError>,
) -> Result<Response, ApiError> {
    let state = shared.state.clone();
    let principal = authenticate(&state, &headers, "audit export").await?;
    principal.require(Scope::Read)?;
    let Query(params) = params.map_err(|e| ApiError::bad_request("invalid_input", e.body_text()))?;
    graphql::check_times(&[("from", params.from), ("to", params.to)])?;
    let timeline = timeline(&principal)?;
    let db = TenantDb::new(state.service.pool().clone(), principal.project_id, state.config.statement_timeout_ms)
        .with_group(principal.group.clone());
    if let Timeline::Installation(id) = timeline {
        graphql::query::require_installation(&db, id).await?;
    }
    db.release().await;
    let pages = futures::stream::unfold(Some((db, LogCursor::default())), move |cursor| async move {
        let (db, after) = cursor?;
        let range = HistoryRange { after, from: params.from, to: params.to, limit: EXPORT_PAGE };
        let page = match db.conn().await {
            Ok(mut conn) => match timeline {
                Timeline::Installation(id) => audit::installation_history_in(&mut conn, &id.to_string(), range).await,
                Timeline::Project(project) => audit::project_history_in(&mut conn, project.0, range).await,
            }
            .map_err(ApiError::from),
            Err(e) => Err(e),
        };
        db.release().await;
        match page {
            Err(error) => {
                tracing::error!(%error, "audit export failed mid-stream");
                Some((Err(std::io::Error::other(error.public_message())), None))
            }
            Ok(events) if events.is_empty() => None,
            Ok(events) => {
                let next = (events.len() as i64 == EXPORT_PAGE)
                    .then(|| events.last().map(amplog_log::RecordedEvent::cursor))
                    .flatten();
                let mut lines = Vec::with_capacity(events.len() * 512);
                for e in events {
                    let line = graphql::types::AuditEvent::from(e);
                    serde_json::to_writer(&mut lines, &line).expect("events serialise");
                    lines.push(b'\n');
                }
                Some((Ok(Bytes::from(lines)), next.map(|n| (db, n))))
            }
        }
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(pages)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2_000, ..Default::default() })]

        /// The export's query string: any text is parsed or refused, and what parses holds
        /// only times the edge accepts or refuses with a code.
        #[test]
        fn any_export_query_string_is_parsed_or_refused(query in "((from|to|x)=[-+0-9TZ:.%a-z]{0,40}&?){0,3}") {
            let uri: axum::http::Uri = match format!("/x?{query}").parse() {
                Ok(uri) => uri,
                Err(_) => return Ok(()),
            };
            if let Ok(Query(params)) = Query::<ExportParams>::try_from_uri(&uri) {
                let _ = graphql::check_times(&[("from", params.from), ("to", params.to)]);
            }
        }
    }
}
