//! The integration tests of this crate, one binary (each file a module).

mod connection;
mod installation;
mod operation;
mod project_integration;
mod support;
