//! The integration tests of this crate, one binary (each file a module).

mod admin;
mod api;
mod audit;
mod browser;
mod compiled;
mod connect;
mod jwt;
mod proxy;
mod security;
mod subscribe;
mod sync;
