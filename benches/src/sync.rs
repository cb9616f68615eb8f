//! Sync throughput: records moved from the provider simulator to a webhook sink (both on
//! loopback, in this process) by 1 and by 4 sync workers (the in-process dispatch's lanes),
//! beside the simulator's raw serving rate in the same run: plain HTTP clients paging
//! through the same object as fast as they can (1 client, 4 clients).

use crate::Report;
use amplog_commands::destinations;
use amplog_commands::{CommandContext, CommandService};
use amplog_domain::integration::{Backfill, Manifest, ObjectDecl};
use amplog_domain::operation::{Operation, OperationStatus};
use amplog_domain::{IntegrationId, OperationId, ProjectId};
use amplog_log::EventStore;
use amplog_providers::connector::{Catalog, Connectors, ProviderSettings};
use amplog_providers::sync::SyncHandler;
use amplog_providers::worker::{InProcessDispatch, Worker};
use amplog_simulator::sim::{SimConfig, Simulator};
use amplog_simulator::Sink;
use anyhow::{Context, Result};
use serde_json::Value;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub struct Setup {
    pub installations: usize,
    pub records: usize,
}

/// Pages through `contacts` with a fresh token, as fast as one client can; returns records.
async fn raw_client(sim: &str, connectors: &Connectors, customer: &str) -> Result<u64> {
    let connector = connectors.get("simulator").context("connector")?;
    let token = amplog_simulator::sim::connect_customer(&connector, customer).await?.access_token;
    let http = amplog_providers::connector::http_client().build().unwrap();
    let (mut records, mut after) = (0u64, None::<String>);
    loop {
        let mut request =
            http.get(format!("{sim}/crm/v3/objects/contacts")).bearer_auth(&token).query(&[("limit", "100")]);
        if let Some(after) = &after {
            request = request.query(&[("after", after)]);
        }
        let body: Value = serde_json::from_slice(&request.send().await?.error_for_status()?.bytes().await?)?;
        records += body["results"].as_array().map(Vec::len).unwrap_or(0) as u64;
        match body.pointer("/paging/next/after").and_then(Value::as_str) {
            Some(next) => after = Some(next.to_string()),
            None => return Ok(records),
        }
    }
}

/// `clients` raw readers, each reading the whole object `rounds` times: records per second.
async fn raw_rate(sim: &str, connectors: &Connectors, clients: usize, rounds: usize) -> Result<f64> {
    let start = Instant::now();
    let tasks = (0..clients).map(|c| async move {
        let mut n = 0;
        for r in 0..rounds {
            n += raw_client(sim, connectors, &format!("raw-{c}-{r}")).await?;
        }
        Ok::<_, anyhow::Error>(n)
    });
    let mut total = 0;
    for n in futures::future::join_all(tasks).await {
        total += n?;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// A project of `n` customers installed, each to read `contacts` in full.
async fn provision(
    service: &CommandService,
    connectors: &Connectors,
    sink_url: &str,
    secret: &str,
    n: usize,
) -> Result<(CommandContext, Vec<amplog_domain::InstallationId>)> {
    let ctx = CommandContext::new(ProjectId(Uuid::now_v7()), "bench");
    service.create_project(&ctx, "sync-bench").await?;
    let decl = ObjectDecl {
        optional: false,
        name: "contacts".into(),
        schedule: None,
        backfill: Backfill::Full,
        fields: vec![],
        destination: None,
        subscribe: vec![],
    };
    let outcome =
        service.declare_integration_with(&ctx, "crm", "simulator", Some(&Manifest { objects: vec![decl] })).await?;
    let integration = IntegrationId(outcome.id_of("integration").context("integration")?);
    let secret = amplog_commands::credentials::Secret(secret.into());
    service.put_destination(&ctx, "default", sink_url, Some(secret)).await?;
    let connector = connectors.get("simulator").context("connector")?;
    let mut installations = Vec::new();
    for i in 0..n {
        let (_, installation) =
            amplog_simulator::sim::install_customer(service, &ctx, integration, &connector, &format!("customer-{i}"))
                .await?;
        installations.push(installation);
    }
    Ok((ctx, installations))
}

/// Reads every installation's contacts with `workers` lanes: records per second, from the
/// requests to the last operation's success.
async fn sync_rate(
    service: &CommandService,
    connectors: &Connectors,
    sink: (&str, &str),
    setup: &Setup,
    workers: usize,
) -> Result<(f64, u64)> {
    let (ctx, installations) = provision(service, connectors, sink.0, sink.1, setup.installations).await?;
    let handler = Arc::new(SyncHandler::new(service.clone(), connectors.clone()));
    let worker = Arc::new(Worker::new(service.clone(), handler, format!("bench-{workers}")));
    let mut dispatch = InProcessDispatch::new(worker, EventStore::default(), format!("bench-{workers}"));
    dispatch.lanes = workers;
    // The dispatch goes on from its checkpoint: an earlier round's jobs are finished and
    // are skipped at once.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        dispatch
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    let start = Instant::now();
    let mut ops = Vec::new();
    for installation in &installations {
        let read = amplog_commands::service::NewOperation {
            op_type: amplog_domain::operation::OperationType::Read,
            object: "contacts".into(),
            since: None,
            until: None,
            trigger: amplog_domain::operation::Trigger::Triggered,
        };
        ops.push(OperationId(
            service.request_operation(&ctx, *installation, &read).await?.id_of("operation").context("op")?,
        ));
    }
    let mut records = 0;
    let mut last_report = Instant::now();
    for op in &ops {
        loop {
            let state = service.load::<Operation>(&ctx, op.0).await?.state;
            if state.status.is_terminal() {
                anyhow::ensure!(state.status == OperationStatus::Succeeded, "operation {op} ended {:?}", state.status);
                records += state.records;
                break;
            }
            if last_report.elapsed() > Duration::from_secs(2) {
                eprintln!("  {workers} worker(s): {:.0} s, waiting for {op}", start.elapsed().as_secs_f64());
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = stop.send(());
    running.await??;
    anyhow::ensure!(records == (setup.installations * setup.records) as u64, "{records} records synced");
    Ok((records as f64 / elapsed, records))
}

pub async fn run(report: &mut Report, pool: &PgPool, setup: Setup) -> Result<()> {
    let service = crate::service(pool);
    let config = SimConfig { records: setup.records, max_page: 100, ..SimConfig::default() };
    let sim = Simulator::start("127.0.0.1:0".parse()?, config).await?;
    let secret = destinations::new_secret();
    let sink = Sink::new(&secret.0);
    let (sink_addr, sink_task) = sink.serve("127.0.0.1:0".parse()?).await?;
    let sink_url = format!("http://{sink_addr}/hooks/default");
    let settings = [("simulator".to_string(), ProviderSettings { base_url: Some(sim.url()), ..Default::default() })]
        .into_iter()
        .collect();
    let connectors =
        Connectors::with_egress(&Catalog::builtin(), &settings, amplog_providers::egress::Egress::private());
    let url = sim.url();
    for workers in [1usize, 4] {
        eprintln!("sync: {} installations × {} contacts, {workers} worker(s)...", setup.installations, setup.records);
        let (ours, records) = sync_rate(&service, &connectors, (&sink_url, &secret.0), &setup, workers).await?;
        eprintln!("sync: raw simulator rate, {workers} client(s)...");
        let rounds = (setup.installations / workers).max(1);
        let raw = raw_rate(&url, &connectors, workers, rounds).await?;
        report.rate_pair(
            &format!("records synced simulator → webhook sink, {workers} worker(s), {records} records (vs {workers} raw HTTP client(s) paging the simulator)"),
            "records/s",
            ours,
            raw,
        );
    }
    let delivered = sink.report();
    eprintln!("sync: sink {delivered:?}");
    sink_task.abort();
    sim.stop().await;
    Ok(())
}
