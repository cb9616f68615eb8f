//! The demos: `amplog demo` (a scenario through the command layer, printing what it
//! appends, then one real read) and `serve --demo` (three customers syncing continuously),
//! both over one [`Sandbox`] of the provider simulator and a webhook sink.

use crate::output::appended;
use amplog_commands::credentials::Secret;
use amplog_commands::destinations;
use amplog_commands::service::{NewInstallation, NewOperation};
use amplog_commands::{CommandContext, CommandError, CommandOutcome, CommandService};
use amplog_domain::connection::Connection;
use amplog_domain::installation::Installation;
use amplog_domain::integration::Integration;
use amplog_domain::integration::{Backfill, Manifest, ObjectDecl};
use amplog_domain::operation::Operation;
use amplog_domain::operation::{Cursor, ErrorClass, OperationType, Trigger};
use amplog_domain::*;
use amplog_providers::connector::{Catalog, Connectors, ProviderSettings};
use amplog_providers::egress::Egress;
use amplog_simulator::sim::{SimConfig, Simulator};
use amplog_simulator::Sink;
use anyhow::{Context, Result};
use chrono::{Duration, Utc};
use std::future::Future;
use uuid::Uuid;

fn step(title: &str, outcome: CommandOutcome) -> CommandOutcome {
    println!("{title}{}", if outcome.replayed { "  (idempotent replay: nothing appended)" } else { "" });
    appended(title, &outcome.events);
    outcome
}

fn id_of<A: Aggregate>(outcome: &CommandOutcome) -> Result<Uuid> {
    outcome.id_of(A::TYPE).with_context(|| format!("the command appended no {} event", A::TYPE))
}

fn object(name: &str, schedule: &str, backfill: Backfill, fields: &[&str]) -> ObjectDecl {
    ObjectDecl {
        optional: false,
        name: name.into(),
        schedule: Some(schedule.into()),
        backfill,
        fields: fields.iter().map(|f| f.to_string()).collect(),
        destination: None,
        subscribe: vec![],
    }
}

/// One read: start under a lease, record pages, succeed.
async fn read(
    service: &CommandService,
    ctx: &CommandContext,
    installation: InstallationId,
    name: &str,
    pages: &[u64],
    trigger: Trigger,
) -> Result<OperationId> {
    let new = NewOperation { op_type: OperationType::Read, object: name.into(), since: None, until: None, trigger };
    let op = OperationId(id_of::<Operation>(&step(
        &format!("request read of {name}"),
        service.request_operation(ctx, installation, &new).await?,
    ))?);
    let lease = LeaseId(Uuid::now_v7());
    step("start", service.start_operation(ctx, op, lease, Duration::minutes(5)).await?);
    for (i, records) in pages.iter().enumerate() {
        let cursor = Cursor {
            watermark: Some(Utc::now()),
            page_token: (i + 1 < pages.len()).then(|| format!("after-{}", (i + 1) * 100)),
        };
        step(&format!("page {}", i + 1), service.record_page(ctx, op, lease, *records, records * 512, &cursor).await?);
    }
    step("succeed", service.succeed_operation(ctx, op, lease).await?);
    Ok(op)
}

pub async fn run(service: &CommandService) -> Result<()> {
    let ctx = CommandContext::new(ProjectId(Uuid::now_v7()), "demo@amplog");
    step("create project", service.create_project(&ctx, "Acme Analytics").await?);

    let integration = IntegrationId(id_of::<Integration>(&step(
        "declare integration",
        service.declare_integration(&ctx, "crm-sync", "hubspot").await?,
    ))?);
    let manifest = Manifest {
        objects: vec![
            object("contacts", "@every 15m", Backfill::Days(30), &["email", "firstname", "lastname"]),
            object("companies", "@every 1h", Backfill::Full, &["name", "domain"]),
            object("deals", "0 */6 * * *", Backfill::None, &["amount", "stage"]),
        ],
    };
    step("deploy revision 1", service.deploy_revision(&ctx, integration, &manifest).await?);

    let token = |n: u32| Secret(format!(r#"{{"access_token":"demo-at-{n}","refresh_token":"demo-rt-{n}"}}"#));
    let conn_a = ConnectionId(id_of::<Connection>(&step(
        "connect customer-42",
        service.create_connection(&ctx, integration, "customer-42", &token(1)).await?,
    ))?);
    let conn_b = ConnectionId(id_of::<Connection>(&step(
        "connect customer-77",
        service.create_connection(&ctx, integration, "customer-77", &token(2)).await?,
    ))?);

    let install = |group: &str, consumer: &str, connection_id| NewInstallation {
        integration_id: integration,
        revision: None,
        group_ref: group.into(),
        consumer_ref: consumer.into(),
        connection_id,
        objects: None,
    };
    let inst_a = InstallationId(id_of::<Installation>(&step(
        "install for customer-42",
        service.create_installation(&ctx, &install("customer-42", "alice@customer42.example", conn_a)).await?,
    ))?);
    let inst_b = InstallationId(id_of::<Installation>(&step(
        "install for customer-77",
        service.create_installation(&ctx, &install("customer-77", "bob@customer77.example", conn_b)).await?,
    ))?);

    read(service, &ctx, inst_a, "contacts", &[100, 100, 37], Trigger::Backfill).await?;
    step("token refresh", service.refresh_token(&ctx, conn_a, &token(3), Some(Utc::now() + Duration::hours(1))).await?);

    // A read that fails with a transient provider error, then is retried and succeeds.
    let new = NewOperation {
        op_type: OperationType::Read,
        object: "companies".into(),
        since: None,
        until: None,
        trigger: Trigger::Scheduled,
    };
    let op = OperationId(id_of::<Operation>(&step(
        "request read of companies",
        service.request_operation(&ctx, inst_a, &new).await?,
    ))?);
    let lease = LeaseId(Uuid::now_v7());
    step("start", service.start_operation(&ctx, op, lease, Duration::minutes(5)).await?);
    step(
        "page 1",
        service
            .record_page(
                &ctx,
                op,
                lease,
                50,
                25_600,
                &Cursor { watermark: Some(Utc::now()), page_token: Some("after-50".into()) },
            )
            .await?,
    );
    step(
        "fail: provider 503",
        service.fail_operation(&ctx, op, lease, ErrorClass::Provider5xx, "503 Service Unavailable", true).await?,
    );
    step("retry", service.retry_operation(&ctx, op).await?);
    let lease = LeaseId(Uuid::now_v7());
    step("start (attempt 2)", service.start_operation(&ctx, op, lease, Duration::minutes(5)).await?);
    step(
        "page 2",
        service
            .record_page(&ctx, op, lease, 12, 6_144, &Cursor { watermark: Some(Utc::now()), page_token: None })
            .await?,
    );
    step("succeed", service.succeed_operation(&ctx, op, lease).await?);

    // Pause: reads are refused with a typed error until unpaused.
    step("pause customer-77", service.pause_installation(&ctx, inst_b).await?);
    let deals = NewOperation {
        op_type: OperationType::Read,
        object: "deals".into(),
        since: None,
        until: None,
        trigger: Trigger::Triggered,
    };
    match service.request_operation(&ctx, inst_b, &deals).await {
        Err(CommandError::Domain(e)) => {
            println!("read while paused is refused: {} ({e})", e.code())
        }
        other => anyhow::bail!("a read on a paused installation should be refused, got {other:?}"),
    }
    step("unpause customer-77", service.unpause_installation(&ctx, inst_b).await?);

    // A retried request with the same idempotency key appends once.
    let keyed = ctx.clone().with_idempotency_key(format!("demo-{}", Uuid::now_v7()));
    let first =
        step("request read of deals (idempotency key)", service.request_operation(&keyed, inst_b, &deals).await?);
    let again = step("same request again (retry)", service.request_operation(&keyed, inst_b, &deals).await?);
    anyhow::ensure!(first.events == again.events, "an idempotent retry must return the first result");

    let synced = real_read(service, &ctx).await?;

    // Project the log into the read models and show what builders will query.
    let runner = amplog_projections::Runner::new(service.pool().clone(), service.store().clone(), "demo");
    if runner.catch_up().await? {
        let query = amplog_projections::queries::InstallationQuery { limit: 1_000, ..Default::default() };
        let mut conn = service.pool().acquire().await?;
        let rows = amplog_projections::queries::installations(&mut conn, ctx.project_id.0, &query).await?;
        println!();
        println!("read models (projected from the log):");
        for (id, doc) in rows {
            let last = doc.last_operation.map(|op| op.status).unwrap_or_default();
            println!("  installation {id}: health {}, paused {}, last operation {last}", doc.health, doc.paused);
        }
    }

    println!();
    println!("installations: {inst_a} (customer-42), {inst_b} (customer-77), {synced} (customer-99, synced)");
    println!("next: amplog history --installation {inst_a}");
    println!("      amplog verify --installation {inst_a}");
    println!("      amplog serve --demo    (three customers syncing continuously, with the API)");
    Ok(())
}

/// A real read: the provider simulator and a webhook sink on loopback, a customer connected
/// through OAuth, one read job run by a sync worker (pages fetched, delivered signed,
/// recorded with their cursors).
async fn real_read(service: &CommandService, ctx: &CommandContext) -> Result<InstallationId> {
    use amplog_providers::worker::Worker;
    use amplog_streams::jobs::{Job, JobMessage};
    println!();
    println!("a real read, from the provider simulator to a webhook sink:");
    let sandbox = Sandbox::start(service, ctx.project_id, SimConfig::default()).await?;
    let manifest = Manifest { objects: vec![object("contacts", "@every 15m", Backfill::Full, &["email"])] };
    let integration = IntegrationId(id_of::<Integration>(&step(
        "declare integration (provider: simulator)",
        service.declare_integration_with(ctx, "crm-live", "simulator", Some(&manifest)).await?,
    ))?);
    let connector = sandbox.connector()?;
    let (connection, installation) =
        amplog_simulator::sim::install_customer(service, ctx, integration, &connector, "customer-99").await?;
    println!("connect customer-99 through OAuth (code exchanged; tokens stored encrypted) and install");
    let new = NewOperation {
        op_type: OperationType::Read,
        object: "contacts".into(),
        since: None,
        until: None,
        trigger: Trigger::Backfill,
    };
    let outcome = step("request read of contacts", service.request_operation(ctx, installation, &new).await?);
    let requested = outcome.events.iter().find(|e| e.event_type == "Requested").context("no Requested event")?;
    let message = JobMessage {
        project: ctx.project_id,
        job: Job {
            operation_id: OperationId(requested.aggregate_id.parse()?),
            installation_id: installation,
            connection_id: connection,
            op_type: OperationType::Read,
            object: "contacts".into(),
            since: None,
            until: None,
            trigger: Trigger::Backfill,
        },
        event_id: requested.event_id,
        time: Utc::now(),
        traceparent: None,
    };
    let handler =
        std::sync::Arc::new(amplog_providers::sync::SyncHandler::new(service.clone(), sandbox.connectors.clone()));
    let disposition = Worker::new(service.clone(), handler, "demo-worker").process(&message).await?;
    let state = service.load::<Operation>(ctx, message.job.operation_id.0).await?.state;
    let report = sandbox.sink.report();
    println!(
        "worker: {disposition:?}; {} records in {} pages; the sink verified {} signed deliveries of {} records",
        state.records, state.pages, report.deliveries, report.distinct_records
    );
    sandbox.stop().await;
    Ok(installation)
}

/// The demo's fixed project, so a second `serve --demo` picks up where the first stopped.
pub const DEMO_PROJECT: Uuid = Uuid::from_u128(0x0000_0000_0000_7000_8000_0000_00de_0001);
const DEMO_CUSTOMERS: [&str; 3] = ["acme", "globex", "initech"];

/// What both demos run beside the log: the provider simulator and a webhook sink on free
/// loopback ports, the connectors pointed at the simulator, and the project's `default`
/// destination at the sink.
pub struct Sandbox {
    pub sim: Simulator,
    pub sink: Sink,
    sink_addr: std::net::SocketAddr,
    sink_task: tokio::task::JoinHandle<()>,
    pub connectors: Connectors,
}

impl Sandbox {
    pub async fn start(service: &CommandService, project: ProjectId, config: SimConfig) -> Result<Sandbox> {
        let sim = Simulator::start("127.0.0.1:0".parse()?, config).await?;
        let secret = destinations::new_secret();
        let sink = Sink::new(&secret.0);
        let (sink_addr, sink_task) = sink.serve("127.0.0.1:0".parse()?).await?;
        let url = format!("http://{sink_addr}/hooks/default");
        let ctx = CommandContext::new(project, "demo");
        service.put_destination(&ctx, "default", &url, Some(secret)).await?;
        let settings =
            [("simulator".to_string(), ProviderSettings { base_url: Some(sim.url()), ..Default::default() })]
                .into_iter()
                .collect();
        let connectors = Connectors::with_egress(&Catalog::builtin(), &settings, Egress::private());
        Ok(Sandbox { sim, sink, sink_addr, sink_task, connectors })
    }

    pub fn connector(&self) -> Result<std::sync::Arc<amplog_providers::connector::Connector>> {
        self.connectors.get("simulator").context("the simulator connector")
    }

    /// Where the sink answers its report (`GET`) and takes deliveries (`POST /{name}`).
    pub fn sink_url(&self) -> String {
        format!("http://{}/hooks", self.sink_addr)
    }

    pub fn stop(self) -> impl Future<Output = ()> {
        self.sink_task.abort();
        self.sim.stop()
    }
}

/// `serve --demo`: the sandbox and the demo project: an integration of the simulator
/// (contacts with a full backfill, companies with 30 days, deals without), three customers
/// connected through OAuth and installed. On a second run the customers reconnect (the
/// simulator forgot them).
pub async fn start_for_serve(service: &CommandService) -> Result<(Sandbox, IntegrationId)> {
    let ctx = CommandContext::new(ProjectId(DEMO_PROJECT), "demo");
    if !service.load::<amplog_domain::project::Project>(&ctx, DEMO_PROJECT).await?.state.exists {
        service.create_project(&ctx, "demo").await?;
    }
    let sandbox = Sandbox::start(service, ctx.project_id, SimConfig::default()).await?;
    let connector = sandbox.connector()?;
    let existing: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM events WHERE aggregate_type = 'connection' AND event_type = 'Created' AND project_id = $1",
    )
    .bind(DEMO_PROJECT)
    .fetch_all(service.pool())
    .await?;
    let integration = if existing.is_empty() {
        let manifest = Manifest {
            objects: vec![
                object("contacts", "@every 1m", Backfill::Full, &[]),
                object("companies", "@every 1m", Backfill::Days(30), &[]),
                object("deals", "@every 1m", Backfill::None, &[]),
            ],
        };
        let outcome = service.declare_integration_with(&ctx, "crm-sync", "simulator", Some(&manifest)).await?;
        let integration = IntegrationId(id_of::<Integration>(&outcome)?);
        for customer in DEMO_CUSTOMERS {
            amplog_simulator::sim::install_customer(service, &ctx, integration, &connector, customer).await?;
        }
        integration
    } else {
        let mut integration = IntegrationId::default();
        for id in existing {
            let id = ConnectionId(id.parse()?);
            let state = service.load::<Connection>(&ctx, id.0).await?.state;
            integration = state.integration_id;
            let tokens = amplog_simulator::sim::connect_customer(&connector, &state.group_ref).await?;
            service.reconnect(&ctx, id, &Secret(serde_json::to_string(&tokens)?)).await?;
        }
        integration
    };
    // The project's OAuth client at the simulator, for connect links.
    if service.provider_client(&ctx, "simulator").await?.is_none() {
        let config = SimConfig::default();
        let settings = amplog_commands::service::AppSettings {
            client_id: config.client_id,
            secret: Some(Secret(config.client_secret)),
            scopes: vec!["crm.objects.read".into()],
            return_urls: vec![],
        };
        service.create_provider_app(&ctx, "simulator", &settings).await?;
    }
    println!("demo: provider simulator on {}, webhook sink on {}", sandbox.sim.url(), sandbox.sink_url());
    println!("demo: project {DEMO_PROJECT}, customers {}", DEMO_CUSTOMERS.join(", "));
    Ok((sandbox, integration))
}

/// A connect link for one more demo customer: its end user approves at the simulator's
/// consent page and lands on an installation.
pub async fn connect_link(service: &CommandService, integration: IntegrationId, public_url: &str) -> Result<String> {
    let ctx = CommandContext::new(ProjectId(DEMO_PROJECT), "demo");
    let id = Uuid::now_v7();
    let (token, digest) = amplog_api::connect::new_link_token(ctx.project_id, id);
    let request = amplog_domain::connect_session::SessionRequest {
        integration_id: integration,
        provider: "simulator".into(),
        group_ref: format!("umbrella-{}", &id.simple().to_string()[24..]),
        consumer_ref: "admin@umbrella.example".into(),
        return_url: None,
        reconnect: None,
    };
    service.create_connect_session(&ctx, id, &request, &digest, Utc::now() + Duration::hours(1)).await?;
    Ok(format!("{public_url}/connect/{token}"))
}

/// Logs what the sink received every few seconds, until `stop`.
pub async fn report(sink: Sink, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let mut last = 0;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(3)) => {}
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
