//! The operator's endpoints of a process that serves no API (a worker, the relay, a
//! projector, the scheduler), on `AMPLOG_OPS_LISTEN`: `/healthz` (the process runs),
//! `/readyz` (PostgreSQL answers and the schema is current) and `/metrics` (this process's
//! own metrics: its leadership, webhooks, lease takeovers and pool; behind
//! `AMPLOG_METRICS_TOKEN` when set).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use sqlx::PgPool;
use std::net::SocketAddr;

/// A running ops listener; dropped, it stops.
pub struct OpsServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `listen` and serves the ops endpoints for `pool`'s database.
pub async fn serve(listen: SocketAddr, pool: PgPool) -> std::io::Result<OpsServer> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(pool);
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "the ops listener stopped");
        }
    });
    tracing::info!(%addr, "ops: /healthz, /readyz, /metrics");
    Ok(OpsServer { addr, task })
}

/// Bounded: a probe or a scrape never waits on a saturated pool.
async fn ready(pool: &PgPool) -> bool {
    let check = async {
        let mut conn = pool.acquire().await.ok()?;
        amplog_migrations::is_current(&mut conn).await.ok()
    };
    matches!(tokio::time::timeout(std::time::Duration::from_secs(2), check).await, Ok(Some(true)))
}

async fn readyz(State(pool): State<PgPool>) -> impl IntoResponse {
    if ready(&pool).await {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: the database does not answer or its schema is not current\n")
    }
}

async fn metrics(State(pool): State<PgPool>, headers: axum::http::HeaderMap) -> axum::response::Response {
    // Behind the same token as the API's `/metrics` when one is configured.
    let token = std::env::var("AMPLOG_METRICS_TOKEN").unwrap_or_default();
    if !token.is_empty() && !crate::server::presents_token(&headers, &token) {
        return crate::ApiError::Unauthenticated.into_response();
    }
    let own = amplog_log::telemetry::metrics().render();
    let text = amplog_log::telemetry::join(&[&own, &crate::server::ready_gauge(ready(&pool).await)]);
    let text = amplog_projections::metrics::as_prometheus_text(&text);
    ([(header::CONTENT_TYPE, amplog_projections::metrics::PROMETHEUS_TEXT)], text).into_response()
}
