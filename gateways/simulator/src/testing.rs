//! Test support (feature `testing`): a sync test's world over a fresh test database.

use amplog_commands::testing::{test_db_with, TestDb};
use amplog_commands::{CommandContext, CommandService};
use amplog_domain::ProjectId;
use amplog_projections::Runner;
use amplog_providers::{connector, egress, sync, worker};
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

/// A sync test's world: a database, the provider simulator, a webhook sink, a project with
/// an integration of provider `simulator` (contacts, companies, deals; no backfill), its
/// `default` destination pointing at the sink, and one customer connected through OAuth
/// and installed.
pub struct SyncWorld {
    pub db: TestDb,
    pub service: CommandService,
    pub sim: crate::sim::Simulator,
    pub sink: crate::sink::Sink,
    sink_task: tokio::task::JoinHandle<()>,
    pub connectors: connector::Connectors,
    pub ctx: CommandContext,
    pub integration: amplog_domain::IntegrationId,
    pub connection: amplog_domain::ConnectionId,
    pub installation: amplog_domain::InstallationId,
    pub customer: String,
    http: reqwest::Client,
}

pub const SINK_SECRET: &str = "whsec_c2luay1zZWNyZXQtZm9yLXRlc3RzLTAxMjM0NQ==";

impl SyncWorld {
    pub async fn start(config: crate::sim::SimConfig) -> SyncWorld {
        Self::start_on(test_db_with(16).await, config).await
    }

    /// The same world on a migrated database of the test's own (a cluster it restarts).
    pub async fn start_on(db: TestDb, config: crate::sim::SimConfig) -> SyncWorld {
        use amplog_domain::integration::{Backfill, Manifest, ObjectDecl};
        use connector::{Catalog, Connectors, ProviderSettings};
        let service = db.service();
        let sim = crate::sim::Simulator::start("127.0.0.1:0".parse().expect("addr"), config).await.expect("simulator");
        let sink = crate::sink::Sink::new(SINK_SECRET);
        let (sink_addr, sink_task) = sink.serve("127.0.0.1:0".parse().expect("addr")).await.expect("sink");
        let settings = ["simulator", "simulator-salesforce"]
            .map(|name| (name.to_string(), ProviderSettings { base_url: Some(sim.url()), ..Default::default() }))
            .into_iter()
            .collect();
        let connectors = Connectors::with_egress(&Catalog::builtin(), &settings, egress::Egress::private());
        let ctx = CommandContext::new(ProjectId(Uuid::now_v7()), "test");
        service.create_project(&ctx, "sync").await.expect("project");
        let object = |name: &str| ObjectDecl {
            optional: false,
            name: name.into(),
            schedule: Some("@every 15m".into()),
            backfill: Backfill::None,
            fields: vec![],
            destination: None,
            subscribe: vec![],
        };
        let manifest = Manifest { objects: vec![object("contacts"), object("companies"), object("deals")] };
        let integration = amplog_domain::IntegrationId(
            service
                .declare_integration_with(&ctx, "crm", "simulator", Some(&manifest))
                .await
                .expect("declare")
                .id_of("integration")
                .expect("an integration"),
        );
        service
            .put_destination(
                &ctx,
                "default",
                &format!("http://{sink_addr}/hooks/default"),
                Some(amplog_commands::credentials::Secret(SINK_SECRET.into())),
            )
            .await
            .expect("destination");
        let customer = "acme".to_string();
        let connector = connectors.get("simulator").expect("the simulator connector");
        let (connection, installation) =
            crate::sim::install_customer(&service, &ctx, integration, &connector, &customer).await.expect("install");
        SyncWorld {
            db,
            service,
            sim,
            sink,
            sink_task,
            connectors,
            ctx,
            integration,
            connection,
            installation,
            customer,
            http: connector::http_client().build().expect("an HTTP client"),
        }
    }

    /// A handler with quick retries (tests wait on them).
    pub fn handler(&self) -> sync::SyncHandler {
        let mut handler = sync::SyncHandler::new(self.service.clone(), self.connectors.clone());
        handler.policy.backoff = Duration::from_millis(20);
        handler.policy.delivery.backoff = Duration::from_millis(50);
        handler.policy.delivery.max_backoff = Duration::from_millis(400);
        handler.policy.delivery.max_outage_backoff = Duration::from_millis(800);
        handler
    }

    /// A worker running that handler, with a short lease.
    pub fn worker(&self, name: &str, lease: Duration) -> worker::Worker<sync::SyncHandler> {
        let mut worker = worker::Worker::new(self.service.clone(), std::sync::Arc::new(self.handler()), name);
        worker.policy.lease_for = lease;
        worker.policy.backoff = Duration::from_millis(50);
        worker
    }

    /// Requests a read of `object` on the customer's installation.
    pub async fn request_read(&self, object: &str) -> amplog_domain::OperationId {
        let outcome = self
            .service
            .request_operation(&self.ctx, self.installation, &amplog_commands::testing::read_of(object))
            .await
            .expect("request a read");
        amplog_domain::OperationId(outcome.id_of("operation").expect("an operation"))
    }

    /// Applies everything logged so far to the read models.
    pub async fn project(&self) {
        let runner = Runner::new(self.db.pool.clone(), self.service.store().clone(), "test-projector");
        assert!(runner.catch_up().await.expect("project"), "no other projector leads here");
    }

    pub async fn sim_stats(&self) -> crate::sim::SimStats {
        let url = format!("{}/_sim/stats", self.sim.url());
        self.http.get(url).send().await.expect("stats").json().await.expect("stats JSON")
    }

    /// POSTs (or PUTs, with a body) to a simulator control endpoint.
    pub async fn sim_control(&self, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.sim.url());
        let request = match body {
            Some(body) => self.http.put(url).json(&body),
            None => self.http.post(url),
        };
        let response = request.send().await.expect("control");
        assert!(response.status().is_success(), "{path}");
        response.json().await.expect("a JSON answer")
    }

    /// The operation's events: type and payload, in order.
    pub async fn events_of(&self, aggregate: &str, id: Uuid) -> Vec<(String, Value)> {
        sqlx::query_as::<_, (String, sqlx::types::Json<Value>)>(
            "SELECT event_type, payload FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
        )
        .bind(aggregate)
        .bind(id.to_string())
        .fetch_all(&self.db.pool)
        .await
        .expect("events")
        .into_iter()
        .map(|(t, p)| (t, p.0))
        .collect()
    }
}

impl Drop for SyncWorld {
    fn drop(&mut self) {
        self.sink_task.abort();
    }
}

impl SyncWorld {
    /// Runs the in-process job dispatch (the embedded default's transport) with a worker
    /// named `name`, until the task is aborted.
    pub fn spawn_dispatch(&self, name: &str, lease: Duration) -> tokio::task::JoinHandle<()> {
        let worker = std::sync::Arc::new(self.worker(name, lease));
        let dispatch = worker::InProcessDispatch::new(worker, self.service.store().clone(), name);
        tokio::spawn(async move {
            dispatch.run(std::future::pending()).await.expect("the dispatch runs");
        })
    }

    /// Reads `object` once with a dispatch of its own and waits until the read succeeded.
    pub async fn read_once(&self, object: &str) -> amplog_domain::OperationId {
        let op = self.request_read(object).await;
        let dispatch = self.spawn_dispatch("worker-1", Duration::from_secs(10));
        let state = self.finished(op, Duration::from_secs(60)).await;
        dispatch.abort();
        assert_eq!(state.status, amplog_domain::operation::OperationStatus::Succeeded, "{state:?}");
        op
    }

    /// Waits (up to `within`) until the operation has finished; returns its state.
    pub async fn finished(
        &self,
        op: amplog_domain::OperationId,
        within: Duration,
    ) -> amplog_domain::operation::Operation {
        let deadline = std::time::Instant::now() + within;
        loop {
            let state =
                self.service.load::<amplog_domain::operation::Operation>(&self.ctx, op.0).await.expect("load").state;
            if state.status.is_terminal() {
                return state;
            }
            assert!(std::time::Instant::now() < deadline, "operation {op} still {:?} after {within:?}", state.status);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
