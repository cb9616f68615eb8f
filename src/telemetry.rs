//! Logs and traces. Logs: plain text (colours only on a terminal, never with `NO_COLOR`)
//! or, with `AMPLOG_LOG_FORMAT=json`, one JSON object per line with the trace and span ids
//! of the span it was written in; filtered by `AMPLOG_LOG` (default `info,sqlx=warn`).
//! Traces: exported over OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and neither `OTEL_SDK_DISABLED=true` nor
//! `OTEL_TRACES_EXPORTER=none`); the exporter reads the other standard `OTEL_*` variables
//! (headers, timeout, service name, resource attributes, sampler, batch settings).

use anyhow::{bail, Context, Result};
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::io::IsTerminal;
use std::time::Duration;
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

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

/// Kept by `main` until the end: [`Telemetry::shutdown`] exports the spans still buffered.
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

fn set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Whether the standard variables ask for traces (the SDK reads neither `OTEL_SDK_DISABLED`
/// nor `OTEL_TRACES_EXPORTER`, and would export to localhost:4318 by default).
fn export_requested() -> bool {
    let off = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !off && (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// `service.name` from `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES`, else `amplog`.
fn resource() -> opentelemetry_sdk::Resource {
    let detected = opentelemetry_sdk::Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    match named {
        true => detected,
        false => opentelemetry_sdk::Resource::builder().with_service_name("amplog").build(),
    }
}

/// The tracer provider: with the OTLP exporter when export is requested; without any (ids
/// for the JSON log lines and for propagation, nothing sent) otherwise.
fn provider(export: bool) -> Result<SdkTracerProvider> {
    let builder = SdkTracerProvider::builder().with_resource(resource());
    if !export {
        return Ok(builder.build());
    }
    // The providers' client (rustls on ring); endpoint and headers from the OTEL_* variables.
    let client = amplog_providers::connector::http_client().timeout(Duration::from_secs(10)).build()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .context("the OTLP exporter (OTEL_EXPORTER_OTLP_*)")?;
    // On a tokio task (the SDK's default processor is a thread that cannot drive reqwest).
    let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    Ok(builder.with_span_processor(processor).build())
}

/// Installs the process's subscriber (logs to standard error); call inside the runtime.
pub fn init() -> Result<Telemetry> {
    let format = LogFormat::from_env()?;
    let export = export_requested();
    let filter = EnvFilter::try_from_env("AMPLOG_LOG").unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    // Spans are recorded when they go somewhere: to a collector, or into JSON lines' ids.
    let provider = (export || format == LogFormat::Json).then(|| provider(export)).transpose()?;
    let otel = provider.as_ref().map(|p| {
        // Never the exporter's own HTTP calls (they would be traced, and exported, forever).
        let own = |m: &tracing::Metadata<'_>| {
            !["hyper", "h2", "reqwest", "opentelemetry", "tower"].iter().any(|t| m.target().starts_with(t))
        };
        // Spans carry what a trace needs; not the busy/idle times of every poll, the thread,
        // or an OpenTelemetry context entered on every poll (nothing here reads it).
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("amplog"))
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_context_activation(false)
            .with_filter(tracing_subscriber::filter::filter_fn(own))
    });
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(WithTraceIds(
                tracing_subscriber::fmt::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            ))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry().with(filter).with(otel).with(logs).try_init()?;
    Ok(Telemetry { provider: provider.filter(|_| export) })
}

impl Telemetry {
    /// Exports what is buffered, 5 s at most (call before `std::process::exit`).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else { return };
        // The processor's shutdown blocks on its task's answer: never on a runtime thread.
        let join = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(Duration::from_secs(5), join).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "exporting the last traces"),
            Ok(Err(error)) => tracing::warn!(%error, "exporting the last traces"),
            Err(_) => tracing::warn!("the last traces were not exported within 5 s"),
        }
    }
}

/// JSON lines with `trace_id` and `span_id` first when written inside a recorded span.
struct WithTraceIds(Format<Json>);

impl<S, N> FormatEvent<S, N> for WithTraceIds
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        // The event's span's context (no OpenTelemetry context is entered on each poll).
        let context = tracing_opentelemetry::OpenTelemetrySpanExt::context(&tracing::Span::current());
        let span = context.span();
        let ids = span.span_context();
        if !ids.is_valid() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => {
                write!(writer, "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}", ids.trace_id(), ids.span_id())
            }
            None => writer.write_str(&line),
        }
    }
}
