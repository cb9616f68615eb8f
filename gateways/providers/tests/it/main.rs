//! The integration tests of this crate, one binary (each file a module).

mod jobs;
mod notify;
mod sync;
