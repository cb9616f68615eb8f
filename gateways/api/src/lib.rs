//! The edges: the HTTP API (`amplog serve`). GraphQL over the read models and the command
//! service, API keys and scopes, tenancy's second line (row-level security per request),
//! the auditor's endpoints, the connect pages, the proxy, provider webhooks, health, readiness
//! and metrics.

pub mod auth;
pub mod connect;
pub mod error;
pub mod graphiql;
pub mod graphql;
pub mod manifest;
pub mod ops;
pub mod proxy;
pub mod server;
pub mod state;
pub mod subscribe;
pub mod tenant;
#[cfg(feature = "testing")]
pub mod testing;

pub use auth::{Keys, Principal, Scope};
pub use error::ApiError;
pub use server::Server;
pub use state::ServerConfig;
