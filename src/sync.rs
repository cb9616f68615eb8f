//! The sync commands: `provider-sim`, `worker` (sync workers + the scheduler),
//! `destinations`, and the pieces `serve` runs in-process (workers, scheduler).

use crate::config::App;
use crate::settings::{SimArgs, WorkerOptions};
use amplog_commands::destinations;
use amplog_commands::CommandService;
use amplog_domain::ProjectId;
use amplog_log::EventStore;
use amplog_providers::connector::Connectors;
use amplog_providers::scheduler::Scheduler;
use amplog_providers::sync::SyncHandler;
use amplog_providers::worker::{InProcessDispatch, Worker};
use amplog_simulator::sim::Simulator;
use anyhow::{Context, Result};
use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
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
    let stopping = CancellationToken::new();
    let work = async {
        match kafka {
            Some(config) => {
                let runs = (0..concurrency.max(1)).map(|i| {
                    let worker = new_worker(format!("{}-{i}", holder("worker")));
                    let (config, stopped) = (config.clone(), stopping.clone().cancelled_owned());
                    async move {
                        let group = format!("{}sync-workers", config.topic_prefix);
                        amplog_streams::jobs::run_kafka_worker(&worker, &config, &group, stopped).await
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
                dispatch.run(stopping.clone().cancelled_owned()).await?;
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::pin!(work);
    tokio::select! {
        result = &mut work => return result,
        _ = stop => stopping.cancel(),
    }
    work.await
}

/// Runs the scheduler and the notifier (each one leader among all processes) until `stop`.
pub async fn run_scheduler(service: &CommandService, connectors: Connectors, stop: impl Future<Output = ()>) {
    let stop = futures::FutureExt::shared(Box::pin(stop));
    let scheduler = Scheduler::new(service.clone(), holder("scheduler"));
    let notifier = amplog_providers::notify::Notifier::new(service.clone(), connectors, holder("notifier"));
    tokio::join!(scheduler.run(stop.clone()), notifier.run(stop));
}

/// `amplog worker`: sync workers, the scheduler and the notifier until Ctrl-C or SIGTERM.
pub async fn worker(
    app: &App,
    kafka: &crate::settings::KafkaArgs,
    options: WorkerOptions,
    scheduler: bool,
) -> Result<i32> {
    let service = app.service()?;
    let config = kafka.brokers.as_ref().map(|_| kafka.config()).transpose()?;
    let stopping = CancellationToken::new();
    let schedule = async {
        if scheduler {
            run_scheduler(&service, Connectors::from_env(), stopping.cancelled()).await;
        }
    };
    let workers = run_workers(&service, Connectors::from_env(), config, options, stopping.cancelled());
    let signal = async {
        crate::shutdown::signal().await;
        tracing::info!("stopping: releasing the jobs in hand");
        stopping.cancel();
    };
    let (result, _, _) = tokio::join!(workers, schedule, signal);
    result?;
    Ok(0)
}

/// `amplog scheduler`: the scheduler and the notifier until Ctrl-C or SIGTERM.
pub async fn scheduler(app: &App) -> Result<i32> {
    let service = app.service()?;
    run_scheduler(&service, Connectors::from_env(), async {
        crate::shutdown::signal().await;
        tracing::info!("stopping the scheduler and the notifier");
    })
    .await;
    Ok(0)
}

/// `amplog destinations create`: prints the signing secret (the only time it is shown).
pub async fn create_destination(app: &App, project: Uuid, name: &str, url: &str) -> Result<i32> {
    amplog_providers::egress::check_destination(url, amplog_providers::egress::Egress::from_env())
        .map_err(|e| anyhow::anyhow!(e))?;
    let service = app.service()?;
    let ctx = amplog_commands::CommandContext::new(ProjectId(project), "cli");
    let secret = service.put_destination(&ctx, name, url, None).await?;
    eprintln!("destination {name} of project {project} → {url}; its signing secret is shown once:");
    println!("{}", secret.0);
    Ok(0)
}

/// A refused command as the operator sees it: what was wrong and its code.
fn refused(error: amplog_commands::CommandError) -> anyhow::Error {
    anyhow::anyhow!("{error} (code: {})", error.code())
}

pub async fn retry_operation(app: &App, project: Uuid, id: Uuid) -> Result<i32> {
    let ctx = amplog_commands::CommandContext::new(ProjectId(project), "cli");
    app.service()?.retry_operation(&ctx, amplog_domain::OperationId(id)).await.map_err(refused)?;
    eprintln!("operation {id} retried: it is dispatched again");
    Ok(0)
}

pub async fn list_dead_letters(app: &App, project: Uuid, first: i64) -> Result<i32> {
    let mut conn = app.pool.acquire().await?;
    let letters = amplog_projections::queries::dead_letters(&mut conn, project, None, first.clamp(1, 1000)).await?;
    for letter in letters {
        println!("{}", serde_json::to_string(&letter)?);
    }
    Ok(0)
}

pub async fn replay_dead_letter(app: &App, project: Uuid, id: Uuid) -> Result<i32> {
    let ctx = amplog_commands::CommandContext::new(ProjectId(project), "cli");
    app.service()?.replay_dead_letter(&ctx, amplog_domain::OperationId(id)).await.map_err(refused)?;
    eprintln!("dead letter {id} replayed: it runs again from its last recorded page");
    Ok(0)
}

pub async fn list_destinations(app: &App, project: Uuid) -> Result<i32> {
    for (name, url, disabled) in destinations::list(&app.pool, ProjectId(project)).await? {
        println!("{}", serde_json::json!({"name": name, "url": url, "disabled": disabled}));
    }
    Ok(0)
}
