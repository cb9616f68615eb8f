//! The integration tests of this crate, one binary (each file a module).

mod cli;
mod failover;
mod partition;
mod pg;
mod relay;
mod tidy;
mod trace;
mod worker;
