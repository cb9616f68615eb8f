//! `amplog serve` and the admin commands around it (projects, API keys).

use crate::config::App;
use amplog_commands::CommandContext;
use amplog_domain::project::Project;
use amplog_domain::ProjectId;
use amplog_gateways::{Keys, Scope, Server, ServerConfig};
use amplog_projections::Runner;
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use uuid::Uuid;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Projectors {
    Auto,
    On,
    Off,
}

pub async fn run(app: &App, listen: SocketAddr, dev: bool, projectors: Projectors) -> Result<i32> {
    let service = app.service()?;
    let keys = Keys::new(app.pool.clone());
    let config = ServerConfig { listen, dev, ..ServerConfig::default() };
    let server =
        Server::start(config, service.clone(), keys).await.with_context(|| format!("listening on {listen}"))?;
    // Tests and scripts read the bound address (listen on port 0 to pick a free one).
    println!("amplog serving on http://{}", server.addr);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let projector = match (projectors, app.is_embedded()) {
        (Projectors::On, _) | (Projectors::Auto, true) => {
            let holder = format!("{}:{}:serve", crate::hostname(), std::process::id());
            let runner = Runner::new(app.pool.clone(), service.store().clone(), holder);
            let mut stopped = stopped.clone();
            Some(tokio::spawn(async move {
                runner
                    .run(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .await
            }))
        }
        _ => None,
    };
    shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    server.stop().await?;
    stop.send(true).ok();
    if let Some(projector) = projector {
        projector.await??;
    }
    Ok(0)
}

async fn shutdown_signal() {
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
