//! The sync commands: `provider-sim`, `worker` (sync workers + the scheduler),
//! `destinations`, and the pieces `serve` runs in-process (workers, scheduler, `--demo`).

use crate::config::App;
use crate::settings::{SimArgs, WorkerOptions};
use amplog_commands::destinations;
use amplog_commands::{CommandContext, CommandService};
use amplog_domain::integration::{Backfill, Manifest, ObjectDecl};
use amplog_domain::{IntegrationId, ProjectId};
use amplog_log::EventStore;
use amplog_providers::connector::{Catalog, Connectors, ProviderSettings};
use amplog_providers::scheduler::Scheduler;
use amplog_providers::sync::SyncHandler;
use amplog_providers::worker::{InProcessDispatch, Worker};
use amplog_simulator::sim::{SimConfig, Simulator};
use amplog_simulator::Sink;
use anyhow::{Context, Result};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub async fn provider_sim(args: &SimArgs) -> Result<i32> {
    let sim =
        Simulator::start(args.listen, args.config()).await.with_context(|| format!("listening on {}", args.listen))?;
    println!("provider simulator on {} (client id amplog-demo)", sim.url());
    crate::shutdown::signal().await;
    sim.stop().await;
    Ok(0)
}

fn holder(role: &str) -> String {
    format!("{role}:{}:{}", crate::hostname(), std::process::id())
}

/// Runs sync workers until `stop`: a Kafka consumer group (`concurrency` members, group
/// `{topic prefix}sync-workers`) when Kafka is configured, else the in-process dispatch from
/// the log (`concurrency` lanes).
pub async fn run_workers(
    service: &CommandService,
    connectors: Connectors,
    kafka: Option<amplog_streams::KafkaConfig>,
    options: WorkerOptions,
    stop: impl Future<Output = ()> + Send,
) -> Result<()> {
    let concurrency = options.concurrency;
    let handler = Arc::new(SyncHandler::new(service.clone(), connectors));
    let new_worker = |name: String| {
        let mut worker = Worker::new(service.clone(), handler.clone(), name);
        worker.policy.lease_for = options.lease;
        worker
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let work = async {
        match kafka {
            Some(config) => {
                let runs = (0..concurrency.max(1)).map(|i| {
                    let worker = new_worker(format!("{}-{i}", holder("worker")));
                    let (config, rx) = (config.clone(), rx.clone());
                    async move {
                        let group = format!("{}sync-workers", config.topic_prefix);
                        amplog_streams::jobs::run_kafka_worker(&worker, &config, &group, stopped(rx)).await
                    }
                });
                for result in futures::future::join_all(runs).await {
                    result?;
                }
            }
            None => {
                let worker = Arc::new(new_worker(holder("worker")));
                let mut dispatch = InProcessDispatch::new(worker, EventStore::default(), holder("dispatch"));
                dispatch.lanes = concurrency.max(1);
                dispatch.run(stopped(rx.clone())).await?;
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::pin!(work);
    tokio::select! {
        result = &mut work => return result,
        _ = stop => { tx.send(true).ok(); }
    }
    work.await
}

/// Runs the scheduler (one leader among all processes) until `stop`.
pub async fn run_scheduler(service: &CommandService, stop: impl Future<Output = ()>) {
    Scheduler::new(service.clone(), holder("scheduler")).run(stop).await;
}

/// `amplog worker`: sync workers and the scheduler until Ctrl-C or SIGTERM.
pub async fn worker(
    app: &App,
    kafka: &crate::settings::KafkaArgs,
    options: WorkerOptions,
    scheduler: bool,
) -> Result<i32> {
    let service = app.service()?;
    let config = kafka.brokers.as_ref().map(|_| kafka.config()).transpose()?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let schedule = async {
        if scheduler {
            run_scheduler(&service, wait(rx.clone())).await;
        }
    };
    let workers = run_workers(&service, Connectors::from_env(), config, options, wait(rx.clone()));
    let signal = async {
        crate::shutdown::signal().await;
        tracing::info!("stopping: releasing the jobs in hand");
        tx.send(true).ok();
    };
    let (result, _, _) = tokio::join!(workers, schedule, signal);
    result?;
    Ok(0)
}

/// `amplog destinations create`: prints the signing secret (the only time it is shown).
pub async fn create_destination(app: &App, project: Uuid, name: &str, url: &str) -> Result<i32> {
    amplog_providers::egress::check_destination(url, amplog_providers::egress::Egress::from_env())
        .map_err(|e| anyhow::anyhow!(e))?;
    let service = app.service()?;
    let secret = destinations::put(&app.pool, service.credentials(), ProjectId(project), name, url, None).await?;
    eprintln!("destination {name} of project {project} → {url}; its signing secret is shown once:");
    println!("{}", secret.0);
    Ok(0)
}

pub async fn list_destinations(app: &App, project: Uuid) -> Result<i32> {
    for (name, url, disabled) in destinations::list(&app.pool, ProjectId(project)).await? {
        println!("{}", serde_json::json!({"name": name, "url": url, "disabled": disabled}));
    }
    Ok(0)
}

/// The demo's fixed project, so a second `serve --demo` picks up where the first stopped.
pub const DEMO_PROJECT: Uuid = Uuid::from_u128(0x0000_0000_0000_7000_8000_0000_00de_0001);
const DEMO_CUSTOMERS: [&str; 3] = ["acme", "globex", "initech"];

/// What `serve --demo` runs beside the API: the simulator and a webhook sink.
pub struct Demo {
    pub sim: Simulator,
    pub sink: Sink,
    sink_task: tokio::task::JoinHandle<()>,
    pub connectors: Connectors,
}

impl Demo {
    pub fn stop(self) -> impl Future<Output = ()> {
        self.sink_task.abort();
        self.sim.stop()
    }
}

/// Starts the simulator and a sink on free ports and provisions the demo project: an
/// integration of the simulator (contacts with a full backfill, companies with 30 days,
/// deals without), its destination at the sink, three customers connected through OAuth
/// and installed. On a second run the customers reconnect (the simulator forgot them).
pub async fn start_demo(app: &App) -> Result<Demo> {
    let sim = Simulator::start("127.0.0.1:0".parse()?, SimConfig::default()).await?;
    let secret = destinations::new_secret();
    let sink = Sink::new(&secret.0);
    let (sink_addr, sink_task) = sink.serve("127.0.0.1:0".parse()?).await?;
    let settings = [("simulator".to_string(), ProviderSettings { base_url: Some(sim.url()), ..Default::default() })]
        .into_iter()
        .collect();
    let connectors =
        Connectors::with_egress(&Catalog::builtin(), &settings, amplog_providers::egress::Egress::private());
    let connector = connectors.get("simulator").context("the simulator connector")?;
    let service = app.service()?;
    let ctx = CommandContext::new(ProjectId(DEMO_PROJECT), "demo");
    let url = format!("http://{sink_addr}/hooks/default");
    destinations::put(&app.pool, service.credentials(), ctx.project_id, "default", &url, Some(secret)).await?;
    let existing: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM events WHERE aggregate_type = 'connection' AND event_type = 'Created' AND project_id = $1",
    )
    .bind(DEMO_PROJECT)
    .fetch_all(&app.pool)
    .await?;
    if existing.is_empty() {
        service.create_project(&ctx, "demo").await?;
        let object = |name: &str, backfill| ObjectDecl {
            name: name.into(),
            schedule: Some("@every 1m".into()),
            backfill,
            fields: vec![],
            destination: None,
        };
        let manifest = Manifest {
            objects: vec![
                object("contacts", Backfill::Full),
                object("companies", Backfill::Days(30)),
                object("deals", Backfill::None),
            ],
        };
        let outcome = service.declare_integration_with(&ctx, "crm-sync", "simulator", Some(&manifest)).await?;
        let integration = IntegrationId(outcome.id_of("integration").context("no integration")?);
        for customer in DEMO_CUSTOMERS {
            amplog_simulator::sim::install_customer(&service, &ctx, integration, &connector, customer).await?;
        }
    } else {
        for id in existing {
            let id = amplog_domain::ConnectionId(id.parse()?);
            let state = service.load::<amplog_domain::connection::Connection>(&ctx, id.0).await?.state;
            let tokens = amplog_simulator::sim::connect_customer(&connector, &state.group_ref).await?;
            let secret = amplog_commands::credentials::Secret(serde_json::to_string(&tokens)?);
            service.reconnect(&ctx, id, &secret).await?;
        }
    }
    println!("demo: provider simulator on {}, webhook sink on http://{sink_addr}/hooks", sim.url());
    println!("demo: project {DEMO_PROJECT}, customers {}", DEMO_CUSTOMERS.join(", "));
    Ok(Demo { sim, sink, sink_task, connectors })
}

/// Logs what the sink received every few seconds, until `stop`.
pub async fn report_demo(sink: Sink, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let mut last = 0;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
        }
        let report = sink.report();
        if report.records != last {
            last = report.records;
            tracing::info!(
                deliveries = report.deliveries,
                records = report.records,
                distinct_records = report.distinct_records,
                "demo: webhook sink received"
            );
        }
    }
}
