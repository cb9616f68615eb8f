//! The integration tests of this crate, one binary (each file a module).

mod api;
mod audit;
mod security;
mod sync;
