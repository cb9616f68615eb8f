//! The integration tests of this crate, one binary (each file a module).

mod cli;
mod failover;
mod partition;
mod pg;
mod process;
mod relay;
mod tidy;
mod topology;
mod trace;
mod worker;
