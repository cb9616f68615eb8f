//! What the server's parts share, with no dependency on them: the configuration and the
//! limits, the state every handler and resolver reads (`AppState`), the shutdown signal,
//! and the counts and caches kept across requests.

use crate::auth::Keys;
use amplog_commands::CommandService;
use amplog_domain::ProjectId;
use amplog_projections::docs::OperationDoc;
use async_graphql::parser::types::ExecutableDocument;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

/// How the server runs. `dev` turns on GraphiQL and introspection.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub dev: bool,
    pub limits: Limits,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// How long one GraphQL request may run.
    pub request_timeout: Duration,
    /// PostgreSQL's `statement_timeout` for API reads, in milliseconds.
    pub statement_timeout_ms: u64,
    /// A projector heartbeat older than this makes `/readyz` fail.
    pub projector_stale_after: Duration,
    /// Where outbound requests (and so destinations) may point.
    pub egress: amplog_providers::egress::Egress,
    /// When set, `/metrics` answers only `Authorization: Bearer <token>`.
    pub metrics_token: Option<String>,
    /// Whether metrics carry a `project` label (needs a token; the binary checks).
    pub metrics_per_project: bool,
    /// The URL users reach this server at (connect links, the OAuth callback); unset:
    /// `http://` and the bound address.
    pub public_url: Option<String>,
    /// The providers the connect flow can send users to, and proxy calls go to.
    pub connectors: amplog_providers::connector::Connectors,
    /// Largest body a proxy call may send, in bytes (it streams; it is never held whole).
    pub proxy_body_limit: u64,
    /// Whether common read queries are answered by their compiled plans
    /// (`graphql::compiled`); off, the executor answers every request.
    pub compiled_reads: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            dev: false,
            limits: Limits::default(),
            body_limit: 256 * 1024,
            request_timeout: Duration::from_secs(10),
            statement_timeout_ms: 5_000,
            projector_stale_after: Duration::from_secs(30),
            egress: amplog_providers::egress::Egress::default(),
            metrics_token: None,
            metrics_per_project: false,
            public_url: None,
            connectors: Default::default(),
            proxy_body_limit: 256 * 1024 * 1024,
            compiled_reads: true,
        }
    }
}

/// The limits every request runs under (async-graphql ships with none).
#[derive(Clone, Debug)]
pub struct Limits {
    pub depth: usize,
    pub complexity: usize,
    pub recursive_depth: usize,
    pub aliases: usize,
    pub introspection: bool,
    /// WebSocket connections one API key may hold open at once.
    pub ws_connections_per_key: usize,
    /// Subscriptions running at once on one WebSocket connection, and for one key in all.
    pub subscriptions_per_connection: usize,
    pub subscriptions_per_key: usize,
    /// Proxy calls one key (or one end user) may have in flight at once, and a project.
    pub proxy_calls_per_key: usize,
    pub proxy_calls_per_project: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            depth: 10,
            complexity: 10_000,
            recursive_depth: 32,
            aliases: 30,
            introspection: false,
            ws_connections_per_key: 16,
            subscriptions_per_connection: 16,
            subscriptions_per_key: 32,
            proxy_calls_per_key: 64,
            proxy_calls_per_project: 256,
        }
    }
}

/// The parsed documents by query text, weighed by size: a parsed document takes about
/// forty times its text, so entries are weighed at 48 bytes per byte of query.
pub type ParsedCache = moka::sync::Cache<String, ExecutableDocument>;

/// What every handler shares.
pub struct AppState {
    pub service: CommandService,
    pub keys: Keys,
    /// Connections' access tokens for proxy calls (cached, refreshed one at a time).
    pub tokens: amplog_providers::tokens::Tokens,
    pub config: ServerConfig,
    /// `config.public_url`, or `http://` and the bound address; no trailing slash.
    pub public_url: String,
    /// Ticks when a projector batch commits (subscriptions re-read then).
    pub projected: broadcast::Sender<()>,
    /// Becomes true on shutdown: long-lived subscriptions end.
    pub shutdown: watch::Receiver<bool>,
    /// Parsed GraphQL documents by query text, weighed by size.
    pub parsed: ParsedCache,
    /// Open WebSocket connections and running subscriptions per API key.
    pub sockets: Arc<SocketCounts>,
    /// The `operationUpdates` feeds, one per installation with subscribers.
    pub feeds: Feeds,
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// An installation's operations as last read.
pub type Snapshot = Arc<Vec<OperationDoc>>;

/// The live feeds, one per (project, installation) with subscribers.
#[derive(Default)]
pub struct Feeds(pub(crate) Mutex<FeedMap>);

pub type FeedMap = HashMap<(ProjectId, Uuid), Arc<watch::Sender<Snapshot>>>;

#[derive(Clone, Copy)]
pub enum Counted {
    Connections,
    Subscriptions,
    ProxyCalls,
}

/// Open WebSocket connections, running subscriptions and proxy calls in flight per key.
#[derive(Default)]
pub struct SocketCounts(Mutex<HashMap<Uuid, [usize; 3]>>);

impl SocketCounts {
    /// Counts one more, unless `max` are already counted; the slot gives it back on drop.
    pub fn acquire(self: &Arc<Self>, key: Uuid, what: Counted, max: usize) -> Option<Slot> {
        let mut counts = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = &mut counts.entry(key).or_default()[what as usize];
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Slot { counts: self.clone(), key, what })
    }
}

/// One counted connection or subscription.
pub struct Slot {
    counts: Arc<SocketCounts>,
    key: Uuid,
    what: Counted,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = counts.get_mut(&self.key) {
            entry[self.what as usize] -= 1;
            if entry.iter().all(|n| *n == 0) {
                counts.remove(&self.key);
            }
        }
    }
}
