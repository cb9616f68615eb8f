//! `/v1/proxy/{installationId}/{path…}`, any method: a call to the customer's SaaS API
//! through the installation's connection. The caller is an API key with `write` scope or an
//! end user's token of the installation's group. The path is checked as sent (no `.`/`..`
//! or empty segments, no encoded separators or dots, no backslash), bodies stream both
//! ways, and the call is recorded as a `proxy` operation committed before the response's
//! last byte goes out (`x-amplog-operation-id` names it on every answer).

use crate::auth::Scope;
use crate::error::ApiError;
use crate::state::{AppState, Counted, Slot};
use amplog_commands::{CommandContext, CommandService};
use amplog_domain::connection::{Connection, ConnectionStatus};
use amplog_domain::installation::Installation;
use amplog_domain::operation::{ErrorClass, ProxyCall, PROXY_PATH_MAX};
use amplog_domain::{ConnectionId, InstallationId, OperationId};
use amplog_providers::proxy::{self, ProxyBody, ProxyRequest};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use futures::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const PREFIX: &str = "/v1/proxy/";
/// Bodies up to this size are held whole, so the call can be sent again after a refresh
/// or a 429; larger ones stream through once.
const BUFFERED_MAX: u64 = 1024 * 1024;
/// The longest query string forwarded.
const QUERY_MAX: usize = 8 * 1024;
/// The longest a caller may ask a 429 to be waited out (`x-amplog-rate-limit-wait`, seconds).
const WAIT_MAX_SECS: u64 = 30;
const OPERATION_HEADER: &str = "x-amplog-operation-id";

pub fn router(state: Arc<AppState>) -> Router {
    Router::new().route("/v1/proxy/{*rest}", any(handle)).with_state(state)
}

/// Splits `/v1/proxy/{id}/{path}` as sent and checks the path: relative, each segment
/// non-empty and not `.` or `..` (plain or percent-encoded), no encoded `/` or `\`, no
/// backslash, valid percent-escapes, at most `PROXY_PATH_MAX` bytes.
pub fn split_path(raw: &str) -> Result<(Uuid, &str), ApiError> {
    let invalid = |why: &str| ApiError::bad_request("invalid_path", format!("the provider path {why}"));
    let rest = raw.strip_prefix(PREFIX).ok_or(ApiError::NotFound("route"))?;
    let (id, path) = rest.split_once('/').ok_or_else(|| invalid("is missing: /v1/proxy/{installationId}/{path}"))?;
    let id = Uuid::try_parse(id).map_err(|_| ApiError::NotFound("installation"))?;
    if path.is_empty() {
        return Err(invalid("is missing: /v1/proxy/{installationId}/{path}"));
    }
    // Recorded with its leading `/`.
    if path.len() + 1 > PROXY_PATH_MAX {
        return Err(invalid(&format!("is longer than {} bytes", PROXY_PATH_MAX - 1)));
    }
    let bytes = path.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'\\' => return Err(invalid("holds a backslash")),
            // Path parameters (`..;/`) walk up on some servers.
            b';' => return Err(invalid("holds a `;`")),
            b'%' => {
                let escape = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
                let Some(value) = escape.and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()) else {
                    return Err(invalid("holds a malformed percent-escape"));
                };
                if matches!(value, b'/' | b'\\' | b'.' | b';' | 0) {
                    return Err(invalid("holds an encoded `/`, `\\`, `.`, `;` or NUL"));
                }
            }
            0..=0x20 | 0x7f => return Err(invalid("holds a control character or a space")),
            _ => {}
        }
    }
    for segment in path.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(invalid("has an empty, `.` or `..` segment"));
        }
    }
    if path.split('/').next().is_some_and(|first| first.contains(':')) {
        return Err(invalid("must be relative to the provider's API"));
    }
    Ok((id, path))
}

/// What is recorded when the call is over, and who records it: once, when the response's
/// end is reached (the commit is awaited before that end goes out), or, when the caller
/// went away first, from `Drop` (marked `aborted`).
struct Recording {
    service: CommandService,
    ctx: CommandContext,
    operation: OperationId,
    installation: InstallationId,
    connection: ConnectionId,
    call: ProxyCall,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    done: bool,
    /// The call's places in the in-flight limits, given back when this is dropped.
    _slots: (Slot, Slot),
}

impl Recording {
    /// Records the call on its own task (a caller hanging up mid-commit cannot cancel it).
    fn spawn(&mut self) -> Option<tokio::task::JoinHandle<Result<(), amplog_commands::CommandError>>> {
        if std::mem::replace(&mut self.done, true) {
            return None;
        }
        self.call.duration_ms = self.started.elapsed().as_millis() as u64;
        self.call.request_bytes = self.request_bytes.load(Ordering::Relaxed);
        let (service, ctx, call) = (self.service.clone(), self.ctx.clone(), self.call.clone());
        let (operation, installation, connection) = (self.operation, self.installation, self.connection);
        let handle = tokio::runtime::Handle::try_current().ok()?;
        Some(handle.spawn(async move {
            let result = service.record_proxy_call(&ctx, operation, installation, connection, &call).await;
            if let Err(error) = &result {
                tracing::error!(%error, operation = %operation, "recording a proxy call failed");
            }
            result
        }))
    }

    async fn commit(&mut self) -> Result<(), std::io::Error> {
        let Some(task) = self.spawn() else { return Ok(()) };
        match task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(std::io::Error::other(format!("the call could not be recorded: {error}"))),
            Err(error) => Err(std::io::Error::other(error.to_string())),
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if !self.done {
            self.call.aborted = true;
            self.spawn();
        }
    }
}

async fn handle(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let operation = OperationId(Uuid::now_v7());
    let mut response = match forward(&state, operation, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&operation.to_string()) {
        response.headers_mut().insert(OPERATION_HEADER, value);
    }
    response
}

async fn forward(state: &Arc<AppState>, operation: OperationId, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let principal = crate::server::authenticate(state, &parts.headers, "proxy").await?;
    principal.require(Scope::Write)?;
    let (installation_id, path) = split_path(parts.uri.path())?;
    let installation_id = InstallationId(installation_id);
    let query = parts.uri.query();
    if query.is_some_and(|q| q.len() > QUERY_MAX) {
        return Err(ApiError::bad_request("invalid_path", format!("the query is longer than {QUERY_MAX} bytes")));
    }
    let method = parts.method.clone();
    if !matches!(
        method,
        Method::GET | Method::HEAD | Method::POST | Method::PUT | Method::PATCH | Method::DELETE | Method::OPTIONS
    ) {
        return Err(ApiError::MethodNotAllowed(method.to_string()));
    }
    let wait = match parts.headers.get("x-amplog-rate-limit-wait") {
        None => Duration::ZERO,
        Some(value) => {
            let secs = value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()).filter(|s| *s <= WAIT_MAX_SECS);
            let secs = secs.ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_input",
                    format!("x-amplog-rate-limit-wait is a number of seconds from 0 to {WAIT_MAX_SECS}"),
                )
            })?;
            Duration::from_secs(secs)
        }
    };
    let limit = state.config.proxy_body_limit;
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()));
    let declared = match declared {
        None => None,
        Some(None) => return Err(ApiError::bad_request("invalid_input", "Content-Length is not a number")),
        Some(Some(n)) if n > limit => return Err(ApiError::TooLarge(limit as usize)),
        Some(Some(n)) => Some(n),
    };
    // Held until the response's end (it streams on after this returns): per key (or end
    // user), and for the whole project.
    let limits = &state.config.limits;
    let slots = (
        state.sockets.acquire(principal.limit_key(), Counted::ProxyCalls, limits.proxy_calls_per_key).ok_or_else(
            || ApiError::TooManyRequests(format!("this key has {} proxy calls in flight", limits.proxy_calls_per_key)),
        )?,
        state.sockets.acquire(principal.project_id.0, Counted::ProxyCalls, limits.proxy_calls_per_project).ok_or_else(
            || {
                ApiError::TooManyRequests(format!(
                    "this project has {} proxy calls in flight",
                    limits.proxy_calls_per_project
                ))
            },
        )?,
    );
    let ctx = CommandContext::new(principal.project_id, principal.actor());
    // Another project's installation, a deleted one or another group's: not found alike.
    let installation = state.service.load::<Installation>(&ctx, installation_id.0).await?.state;
    if !installation.exists || installation.deleted || !principal.sees_group(&installation.group_ref) {
        return Err(ApiError::NotFound("installation"));
    }
    let connection_id = installation.connection_id;
    let connection = state.service.load::<Connection>(&ctx, connection_id.0).await?.state;
    if !connection.exists {
        return Err(ApiError::NotFound("installation"));
    }
    if matches!(connection.status, ConnectionStatus::Revoked | ConnectionStatus::BadCredentials) {
        state.tokens.forget(connection_id);
        return Err(ApiError::NeedsReauth(format!("the connection is {}", connection.status.as_str())));
    }
    let connector =
        state.config.connectors.get(&connection.provider).ok_or_else(|| {
            ApiError::ProviderUnreachable(format!("no connector for provider {}", connection.provider))
        })?;

    let request_bytes = Arc::new(AtomicU64::new(0));
    let chunked = parts.headers.get(header::TRANSFER_ENCODING).is_some();
    let body = match declared {
        Some(0) | None if !chunked => ProxyBody::Empty,
        Some(n) if n <= BUFFERED_MAX => {
            let bytes = axum::body::to_bytes(body, BUFFERED_MAX as usize)
                .await
                .map_err(|e| ApiError::bad_request("invalid_input", format!("the body could not be read: {e}")))?;
            request_bytes.store(bytes.len() as u64, Ordering::Relaxed);
            ProxyBody::Buffered(bytes)
        }
        _ => {
            let counted = request_bytes.clone();
            let stream = body.into_data_stream().map(move |chunk| {
                let chunk = chunk.map_err(std::io::Error::other)?;
                let total = counted.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
                if total > limit {
                    return Err(std::io::Error::other(format!("the body is larger than {limit} bytes")));
                }
                Ok(chunk)
            });
            ProxyBody::Streaming(stream.boxed())
        }
    };
    let mut recording = Recording {
        service: state.service.clone(),
        ctx: ctx.clone(),
        operation,
        installation: installation_id,
        connection: connection_id,
        call: ProxyCall {
            method: method.to_string(),
            path: format!("/{path}"),
            status: None,
            request_bytes: 0,
            response_bytes: 0,
            duration_ms: 0,
            error_class: None,
            refreshed: false,
            aborted: false,
        },
        started: Instant::now(),
        request_bytes: request_bytes.clone(),
        done: false,
        _slots: slots,
    };
    let sent = proxy::send(
        &state.tokens,
        ProxyRequest {
            ctx: &ctx,
            connection: connection_id,
            connector: &connector,
            method: method.clone(),
            path,
            query,
            headers: proxy::strip(&parts.headers),
            body,
            rate_limit_wait: wait,
        },
    )
    .await;
    let answer = match sent {
        Ok(answer) => answer,
        Err(error) => {
            recording.call.error_class = Some(error.class);
            recording.commit().await.map_err(|e| ApiError::Internal(e.to_string()))?;
            if request_bytes.load(Ordering::Relaxed) > limit {
                return Err(ApiError::TooLarge(limit as usize));
            }
            return Err(match error.class {
                ErrorClass::AuthInvalidated => ApiError::NeedsReauth(error.message),
                ErrorClass::BadRequest => ApiError::bad_request("invalid_path", error.message),
                ErrorClass::Timeout => ApiError::ProviderTimeout(error.message),
                // Amplog's own (the database, a credential): logged, not told.
                ErrorClass::Internal => ApiError::Internal(error.message),
                _ => ApiError::ProviderUnreachable(error.message),
            });
        }
    };
    recording.call.status = Some(answer.status.as_u16());
    recording.call.error_class = proxy::status_class(answer.status);
    recording.call.refreshed = answer.refreshed;
    // A body that is empty by rule or by its length ends with the headers: recorded first.
    let empty = answer.headers.get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() == b"0");
    let mut response = Response::builder().status(answer.status);
    if let Some(headers) = response.headers_mut() {
        *headers = answer.headers;
    }
    let no_body =
        empty || method == Method::HEAD || matches!(answer.status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    let body = if no_body {
        drop(answer.body);
        recording.commit().await.map_err(|e| ApiError::Internal(e.to_string()))?;
        Body::empty()
    } else {
        // One chunk is held back until the next arrives, and the last until the record is
        // committed: a client that knows the length has the whole body only after the commit.
        let start: Option<(_, _, Option<Bytes>)> = Some((answer.body, recording, None));
        let stream = futures::stream::unfold(start, |state| async move {
            let (mut upstream, mut recording, mut held) = state?;
            loop {
                match upstream.next().await {
                    Some(Ok(chunk)) if chunk.is_empty() => {}
                    Some(Ok(chunk)) => {
                        recording.call.response_bytes += chunk.len() as u64;
                        if let Some(previous) = held.replace(chunk) {
                            return Some((Ok::<Bytes, std::io::Error>(previous), Some((upstream, recording, held))));
                        }
                    }
                    Some(Err(error)) => {
                        recording.call.error_class.get_or_insert(error.class);
                        let _ = recording.commit().await;
                        return Some((Err(std::io::Error::other(error.message)), None));
                    }
                    None => {
                        return match recording.commit().await {
                            Ok(()) => held.map(|last| (Ok(last), None)),
                            Err(error) => Some((Err(error), None)),
                        }
                    }
                }
            }
        });
        Body::from_stream(stream)
    };
    response.body(body).map_err(|e| ApiError::Internal(e.to_string()))
}
