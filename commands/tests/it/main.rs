//! The integration tests of this crate, one binary (each file a module).

mod audit;
mod log;
mod reader;
