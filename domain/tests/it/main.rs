//! The integration tests of this crate, one binary (each file a module).

mod connect;
mod connection;
mod installation;
mod operation;
mod organization;
mod project_integration;
mod support;
