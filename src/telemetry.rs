//! Logs: plain text (colours only on a terminal, never with `NO_COLOR`) or, with
//! `AMPLOG_LOG_FORMAT=json`, one JSON object per line for a collector; filtered by
//! `AMPLOG_LOG` (default `info,sqlx=warn`).

use anyhow::{bail, Result};
use std::io::IsTerminal;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// From `AMPLOG_LOG_FORMAT` (`text`, the default, or `json`).
    pub fn from_env() -> Result<Self> {
        match std::env::var("AMPLOG_LOG_FORMAT").as_deref() {
            Err(_) | Ok("") | Ok("text") => Ok(Self::Text),
            Ok("json") => Ok(Self::Json),
            Ok(other) => bail!("AMPLOG_LOG_FORMAT is `{other}`: text or json"),
        }
    }
}

/// Installs the process's subscriber; logs go to standard error.
pub fn init() -> Result<()> {
    let format = LogFormat::from_env()?;
    let filter = EnvFilter::try_from_env("AMPLOG_LOG").unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => {
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi)).init()
        }
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    Ok(())
}
