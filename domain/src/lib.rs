//! The pure domain of amplog: aggregates (Project, Integration, Connection, Installation,
//! Operation, ProviderApp, ConnectSession, Organization, AdminKey, Change), their commands,
//! versioned events, state machines, typed errors and upcasters; the notification topics.
//! No IO, no clock, no id generation: time and ids arrive inside the commands.

pub mod admin_key;
pub mod aggregate;
pub mod change;
pub mod connect_session;
pub mod connection;
pub mod error;
pub mod ids;
pub mod installation;
pub mod integration;
pub mod notification;
pub mod operation;
pub mod organization;
pub mod project;
pub mod provider_app;
pub mod schedule;
pub mod upcast;

pub use aggregate::{Aggregate, DomainEvent, EventParts};
pub use error::DomainError;
pub use ids::*;
