//! `amplog serve` and the admin commands around it (projects, API keys).

use crate::config::App;
use amplog_api::{Keys, Scope, Server, ServerConfig};
use amplog_commands::CommandContext;
use amplog_domain::project::Project;
use amplog_domain::ProjectId;
use amplog_projections::Runner;
use amplog_providers::egress::Egress;
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use uuid::Uuid;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Projectors {
    Auto,
    On,
    Off,
}

impl Projectors {
    fn enabled(self, embedded: bool) -> bool {
        matches!((self, embedded), (Projectors::On, _) | (Projectors::Auto, true))
    }
}

/// What `serve` runs beside the API.
#[derive(Clone, Copy, Debug)]
pub struct InProcess {
    pub projectors: Projectors,
    pub workers: Projectors,
    pub demo: bool,
}

/// `serve --config FILE`: every key optional, unknown keys refused (with their place).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    dev: Option<bool>,
    body_limit_bytes: Option<usize>,
    request_timeout_ms: Option<u64>,
    statement_timeout_ms: Option<u64>,
    max_depth: Option<usize>,
    max_complexity: Option<usize>,
    max_aliases: Option<usize>,
    metrics_token: Option<String>,
    metrics_per_project: Option<bool>,
}

/// The server's settings: defaults, then the config file, then flags and variables.
pub fn server_config(file: Option<&Path>, listen: Option<SocketAddr>, dev: bool) -> Result<ServerConfig> {
    let from_file: FileConfig = match file {
        None => FileConfig::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("{} is not a valid amplog config", path.display()))?
        }
    };
    let mut config = ServerConfig::default();
    config.listen = listen.or(from_file.listen).unwrap_or(config.listen);
    config.dev = dev || from_file.dev.unwrap_or(false);
    config.body_limit = from_file.body_limit_bytes.unwrap_or(config.body_limit);
    config.request_timeout = from_file.request_timeout_ms.map(Duration::from_millis).unwrap_or(config.request_timeout);
    config.statement_timeout_ms = from_file.statement_timeout_ms.unwrap_or(config.statement_timeout_ms);
    config.limits.depth = from_file.max_depth.unwrap_or(config.limits.depth);
    config.limits.complexity = from_file.max_complexity.unwrap_or(config.limits.complexity);
    config.limits.aliases = from_file.max_aliases.unwrap_or(config.limits.aliases);
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    config.metrics_token = var("AMPLOG_METRICS_TOKEN").or(from_file.metrics_token);
    config.metrics_per_project = var("AMPLOG_METRICS_PER_PROJECT")
        .map(|v| matches!(v.as_str(), "1" | "true" | "yes"))
        .or(from_file.metrics_per_project)
        .unwrap_or(false);
    if config.metrics_per_project && config.metrics_token.is_none() {
        bail!(
            "per-project metrics name every tenant: they need a metrics token (AMPLOG_METRICS_TOKEN or metrics_token)"
        );
    }
    Ok(config)
}

pub async fn run(
    app: &App,
    mut config: ServerConfig,
    run: InProcess,
    kafka: &crate::streams::KafkaArgs,
) -> Result<i32> {
    // The demo's simulator and sink are on loopback.
    config.egress = if run.demo { Egress::private() } else { Egress::from_env() };
    let service = app.service()?;
    let keys = Keys::new(app.pool.clone());
    let listen = config.listen;
    let demo = if run.demo { Some(crate::sync::start_demo(app).await?) } else { None };
    let server =
        Server::start(config, service.clone(), keys.clone()).await.with_context(|| format!("listening on {listen}"))?;
    // Tests and scripts read the bound address (listen on port 0 to pick a free one).
    println!("amplog serving on http://{}", server.addr);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let mut tasks: Vec<tokio::task::JoinHandle<Result<()>>> = Vec::new();
    // The demo's scheduler reads the read models: it needs the projector too.
    if run.demo || run.projectors.enabled(app.is_embedded()) {
        let holder = format!("{}:{}:serve", crate::hostname(), std::process::id());
        let runner = Runner::new(app.pool.clone(), service.store().clone(), holder);
        let until = wait();
        tasks.push(tokio::spawn(async move { Ok(runner.run(until).await?) }));
    }
    if run.demo || run.workers.enabled(app.is_embedded()) {
        let connectors = match &demo {
            Some(demo) => demo.connectors.clone(),
            None => amplog_providers::connector::Connectors::from_env(),
        };
        let kafka = kafka.brokers.as_ref().map(|_| kafka.config()).transpose()?;
        let (workers, until) = (service.clone(), wait());
        tasks.push(tokio::spawn(async move {
            crate::sync::run_workers(&workers, connectors, kafka, Default::default(), until).await
        }));
        let (scheduler, until) = (service.clone(), wait());
        tasks.push(tokio::spawn(async move {
            crate::sync::run_scheduler(&scheduler, until).await;
            Ok(())
        }));
    }
    if let Some(demo) = &demo {
        let project = amplog_domain::ProjectId(crate::sync::DEMO_PROJECT);
        let (_, key) = keys.create(project, Scope::Read, Some("demo")).await?;
        println!("demo: a read key for the demo project: {key}");
        println!(
            "demo: curl -s http://{}/graphql -H 'x-api-key: {key}' -H 'content-type: application/json' \\
               -d '{{\"query\":\"{{ installations(first: 5) {{ nodes {{ groupRef health readStates {{ object watermark recordsRead }} }} }} }}\"}}'",
            server.addr
        );
        let (sink, until) = (demo.sink.clone(), wait());
        tasks.push(tokio::spawn(async move {
            crate::sync::report_demo(sink, until).await;
            Ok(())
        }));
    }
    shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    server.stop().await?;
    stop.send(true).ok();
    for task in tasks {
        task.await??;
    }
    if let Some(demo) = demo {
        demo.stop().await;
    }
    Ok(0)
}

pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub async fn create_project(app: &App, name: &str) -> Result<i32> {
    let id = ProjectId(Uuid::now_v7());
    let outcome = app.service()?.create_project(&CommandContext::new(id, "cli"), name).await?;
    tracing::info!(project = %id, events = outcome.events.len(), "project created");
    println!("{id}");
    Ok(0)
}

pub async fn create_key(app: &App, project: Uuid, scope: &str, label: Option<&str>) -> Result<i32> {
    let scope = Scope::parse(scope).context("scope is read, write or admin")?;
    let ctx = CommandContext::new(ProjectId(project), "cli");
    if !app.service()?.load::<Project>(&ctx, project).await?.state.exists {
        bail!("project {project} does not exist");
    }
    let (id, key) = Keys::new(app.pool.clone()).create(ProjectId(project), scope, label).await?;
    eprintln!("key {id} ({}) for project {project}; it is shown once, keep it now:", scope.as_str());
    println!("{key}");
    Ok(0)
}

pub async fn list_keys(app: &App, project: Uuid) -> Result<i32> {
    for key in Keys::new(app.pool.clone()).list(ProjectId(project)).await? {
        println!("{}", serde_json::to_string(&key)?);
    }
    Ok(0)
}

pub async fn revoke_key(app: &App, id: Uuid) -> Result<i32> {
    if Keys::new(app.pool.clone()).revoke(id).await? {
        println!("revoked {id}");
        Ok(0)
    } else {
        bail!("no live key {id}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("amplog.toml");
        std::fs::write(&path, "listen = \"0.0.0.0:9000\"\nmax_aliases = 5\nrequest_timeout_ms = 2500\n").unwrap();
        let config = server_config(Some(&path), None, false).unwrap();
        assert_eq!(config.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.limits.aliases, 5);
        assert_eq!(config.request_timeout, Duration::from_millis(2500));
        assert_eq!(config.limits.depth, ServerConfig::default().limits.depth);
        let config = server_config(Some(&path), Some("127.0.0.1:1".parse().unwrap()), true).unwrap();
        assert_eq!(config.listen, "127.0.0.1:1".parse().unwrap());
        assert!(config.dev);
        std::fs::write(&path, "listen = \"0.0.0.0:9000\"\nmax_alias = 5\n").unwrap();
        let error = format!("{:#}", server_config(Some(&path), None, false).unwrap_err());
        assert!(error.contains("max_alias"), "{error}");
    }
}
