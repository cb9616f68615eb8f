//! The provider simulator (a CRM with OAuth, paged and incremental reads, writes and
//! injectable faults) and the verifying webhook sink: what the demo, the tests and the
//! benchmarks sync against. Never a dependency of the API or the providers.

#[cfg(feature = "testing")]
pub mod collector;
pub mod sim;
pub mod sink;
#[cfg(feature = "testing")]
pub mod testing;

pub use sim::{install_customer, Faults, SimConfig, SimStats, Simulator};
pub use sink::{Received, Sink, SinkReport};

/// What can go wrong setting a simulated customer up.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("connecting {0}: {1}")]
    Connect(String, amplog_providers::connector::ProviderError),
    #[error(transparent)]
    Command(#[from] amplog_commands::CommandError),
    #[error("the command recorded no {0}")]
    Missing(&'static str),
}
