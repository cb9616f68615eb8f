//! `amplog serve` and the admin commands around it (projects, API keys).

use crate::config::App;
use crate::settings::InProcess;
use amplog_api::{Keys, Scope, Server, ServerConfig};
use amplog_commands::CommandContext;
use amplog_domain::project::Project;
use amplog_domain::ProjectId;
use amplog_projections::Runner;
use amplog_providers::egress::Egress;
use anyhow::{bail, Context, Result};
use uuid::Uuid;

pub async fn run(
    app: &App,
    mut config: ServerConfig,
    run: InProcess,
    kafka: &crate::settings::KafkaArgs,
) -> Result<i32> {
    // The demo's simulator and sink are on loopback.
    config.egress = if run.demo { Egress::private() } else { Egress::from_env() };
    let service = app.service()?;
    let keys = Keys::new(&service);
    let listen = config.listen;
    let (demo, demo_integration) = match run.demo {
        true => {
            let (sandbox, integration) = crate::demo::start_for_serve(&service).await?;
            (Some(sandbox), Some(integration))
        }
        false => (None, None),
    };
    config.connectors = match &demo {
        Some(demo) => demo.connectors.clone(),
        None => amplog_providers::connector::Connectors::from_env(),
    };
    let public_url = config.public_url.clone();
    let server =
        Server::start(config, service.clone(), keys.clone()).await.with_context(|| format!("listening on {listen}"))?;
    // Tests and scripts read the bound address (listen on port 0 to pick a free one).
    println!("amplog serving on http://{}", server.addr);
    let stopping = tokio_util::sync::CancellationToken::new();
    let wait = || stopping.clone().cancelled_owned();
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
        let (workers, until, routes) = (service.clone(), wait(), connectors.clone());
        tasks.push(tokio::spawn(async move {
            crate::sync::run_workers(&workers, connectors, kafka, Default::default(), until).await
        }));
        let (scheduler, until) = (service.clone(), wait());
        tasks.push(tokio::spawn(async move {
            crate::sync::run_scheduler(&scheduler, routes, until).await;
            Ok(())
        }));
    }
    if let Some(demo) = &demo {
        let project = amplog_domain::ProjectId(crate::demo::DEMO_PROJECT);
        let (_, key) = keys.create(project, Scope::Read, Some("demo")).await?;
        println!("demo: a read key for the demo project: {key}");
        let public_url = public_url.unwrap_or_else(|| format!("http://{}", server.addr));
        if let Some(integration) = demo_integration {
            let link = crate::demo::connect_link(&service, integration, public_url.trim_end_matches('/')).await?;
            println!("demo: connect one more customer in a browser: {link}");
        }
        println!(
            "demo: curl -s http://{}/graphql -H 'x-api-key: {key}' -H 'content-type: application/json' \\
               -d '{{\"query\":\"{{ installations(first: 5) {{ nodes {{ groupRef health readStates {{ object watermark recordsRead }} }} }} }}\"}}'",
            server.addr
        );
        let (sink, until) = (demo.sink.clone(), wait());
        tasks.push(tokio::spawn(async move {
            crate::demo::report(sink, until).await;
            Ok(())
        }));
    }
    crate::shutdown::signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    server.stop().await?;
    stopping.cancel();
    for task in tasks {
        task.await??;
    }
    if let Some(demo) = demo {
        demo.stop().await;
    }
    Ok(0)
}

pub async fn create_org(app: &App, name: &str) -> Result<i32> {
    let id = Uuid::now_v7();
    app.service()?.create_organization(id, name, "cli").await?;
    println!("{id}");
    Ok(0)
}

pub async fn create_admin_key(app: &App, label: Option<&str>) -> Result<i32> {
    let (id, key) = Keys::new(&app.service()?).create_admin_key(label).await?;
    eprintln!("admin key {id}: send it as X-Admin-Key with X-Amplog-Project; it is shown once, keep it now:");
    println!("{key}");
    Ok(0)
}

pub async fn revoke_admin_key(app: &App, id: Uuid) -> Result<i32> {
    if Keys::new(&app.service()?).revoke_admin_key(id).await? {
        println!("revoked {id}");
        Ok(0)
    } else {
        bail!("no live admin key {id}");
    }
}

pub async fn create_project(app: &App, name: &str, org: Option<Uuid>) -> Result<i32> {
    let id = ProjectId(Uuid::now_v7());
    let ctx = CommandContext::new(id, "cli");
    let service = app.service()?;
    let outcome = match org {
        Some(org) => service.create_project_in(&ctx, name, org).await?,
        None => service.create_project(&ctx, name).await?,
    };
    tracing::info!(project = %id, events = outcome.events.len(), "project created");
    println!("{id}");
    Ok(0)
}

pub async fn create_key(app: &App, project: Uuid, scope: &str, label: Option<&str>) -> Result<i32> {
    let scope = Scope::parse(scope).context("scope is read, write or admin")?;
    let ctx = CommandContext::new(ProjectId(project), "cli");
    let service = app.service()?;
    if !service.load::<Project>(&ctx, project).await?.state.exists {
        bail!("project {project} does not exist");
    }
    let (id, key) = Keys::new(&service).create(ProjectId(project), scope, label).await?;
    eprintln!("key {id} ({}) for project {project}; it is shown once, keep it now:", scope.as_str());
    println!("{key}");
    Ok(0)
}

pub async fn list_keys(app: &App, project: Uuid) -> Result<i32> {
    for key in Keys::new(&app.service()?).list(ProjectId(project)).await? {
        println!("{}", serde_json::to_string(&key)?);
    }
    Ok(0)
}

pub async fn revoke_key(app: &App, id: Uuid) -> Result<i32> {
    if Keys::new(&app.service()?).revoke(id).await? {
        println!("revoked {id}");
        Ok(0)
    } else {
        bail!("no live key {id}");
    }
}
