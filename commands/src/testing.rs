//! Test support: a fresh, migrated database per test on the throwaway cluster that
//! `scripts/test` starts (`AMPLOG_TEST_DATABASE_URL` names its maintenance database). The
//! schema is migrated once into a template named after the migrations' digest; each test
//! database is a copy of it.

use crate::credentials::{CredentialKey, CredentialStore};
use crate::service::CommandService;
use amplog_log::store::EventStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use std::str::FromStr;

pub const TEST_KEY: [u8; 32] = *b"amplog-test-key-0123456789abcdef";

/// A database of one test.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    pub name: String,
}

impl TestDb {
    /// The write side on this database, with the test credential key.
    pub fn service(&self) -> CommandService {
        CommandService::new(self.pool.clone(), EventStore::default(), credential_store())
    }
}

pub fn credential_store() -> CredentialStore {
    CredentialStore::new(CredentialKey::from_bytes(&TEST_KEY).expect("32 bytes"))
}

fn server_url() -> String {
    std::env::var("AMPLOG_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "AMPLOG_TEST_DATABASE_URL is not set: run the tests with scripts/test, which starts a throwaway PostgreSQL"
        )
    })
}

fn url_for(database: &str) -> String {
    let options = PgConnectOptions::from_str(&server_url())
        .expect("AMPLOG_TEST_DATABASE_URL is a PostgreSQL URL")
        .database(database);
    options.to_url_lossy().to_string()
}

/// Creates a fresh migrated database and a pool of `max_connections` on it.
pub async fn test_db_with(max_connections: u32) -> TestDb {
    let mut admin = PgConnection::connect(&server_url()).await.expect("connect to the test cluster");
    let template = format!("amplog_tpl_{}", &amplog_migrations::schema_digest()[..16]);
    // Test processes run in parallel: one of them builds the template, under a lock.
    sqlx::query("SELECT pg_advisory_lock(4242)").execute(&mut admin).await.expect("lock");
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&template)
        .fetch_one(&mut admin)
        .await
        .expect("query pg_database");
    if !exists {
        let building = format!("{template}_building");
        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {building}")).execute(&mut admin).await.expect("drop");
        sqlx::raw_sql(&format!("CREATE DATABASE {building}")).execute(&mut admin).await.expect("create template");
        let mut conn = PgConnection::connect(&url_for(&building)).await.expect("connect to template");
        amplog_migrations::migrate(&mut conn).await.expect("migrate template");
        conn.close().await.expect("close");
        sqlx::raw_sql(&format!("ALTER DATABASE {building} RENAME TO {template}"))
            .execute(&mut admin)
            .await
            .expect("rename");
    }
    sqlx::query("SELECT pg_advisory_unlock(4242)").execute(&mut admin).await.expect("unlock");
    let name = format!("amplog_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
        .execute(&mut admin)
        .await
        .expect("create test database");
    admin.close().await.ok();
    let url = url_for(&name);
    let pool =
        PgPoolOptions::new().max_connections(max_connections).connect(&url).await.expect("connect to test database");
    TestDb { pool, url, name }
}

pub async fn test_db() -> TestDb {
    test_db_with(10).await
}

/// A project with a deployed integration, a connection and an installation, ready for
/// operations.
pub struct Seeded {
    pub ctx: crate::CommandContext,
    pub integration: amplog_domain::IntegrationId,
    pub connection: amplog_domain::ConnectionId,
    pub installation: amplog_domain::InstallationId,
}

pub const SEED_SECRET: &str = r#"{"access_token":"seed-access-token-4f1d","refresh_token":"seed-refresh-token-9a2c"}"#;

/// Seeds one project through the command service.
pub async fn seed(service: &CommandService) -> Seeded {
    use amplog_domain::integration::{Backfill, Manifest, ObjectDecl};
    use amplog_domain::*;
    let ctx = crate::CommandContext::new(ProjectId(uuid::Uuid::now_v7()), "test");
    service.create_project(&ctx, "Test project").await.expect("create project");
    let integration = IntegrationId(
        service.declare_integration(&ctx, "crm", "hubspot").await.expect("declare").id_of("integration").expect("id"),
    );
    let object = |name: &str| ObjectDecl {
        optional: false,
        name: name.into(),
        schedule: Some("@every 15m".into()),
        backfill: Backfill::Days(7),
        fields: vec![],
        destination: None,
        subscribe: vec![],
    };
    let manifest = Manifest { objects: vec![object("contacts"), object("companies"), object("deals")] };
    service.deploy_revision(&ctx, integration, &manifest).await.expect("deploy");
    let secret = crate::credentials::Secret(SEED_SECRET.into());
    let connection = ConnectionId(
        service
            .create_connection(&ctx, integration, "group-1", &secret)
            .await
            .expect("connect")
            .id_of("connection")
            .expect("id"),
    );
    let new = crate::service::NewInstallation {
        integration_id: integration,
        revision: None,
        group_ref: "group-1".into(),
        consumer_ref: "consumer-1".into(),
        connection_id: connection,
        objects: None,
    };
    let installation = InstallationId(
        service.create_installation(&ctx, &new).await.expect("install").id_of("installation").expect("id"),
    );
    Seeded { ctx, integration, connection, installation }
}

/// A read request of `object`.
pub fn read_of(object: &str) -> crate::service::NewOperation {
    crate::service::NewOperation {
        op_type: amplog_domain::operation::OperationType::Read,
        object: object.into(),
        since: None,
        until: None,
        trigger: amplog_domain::operation::Trigger::Triggered,
    }
}

/// Requests a read of `object` on the seeded installation and starts it under a new
/// five-minute lease.
pub async fn start_read(
    service: &CommandService,
    s: &Seeded,
    object: &str,
) -> (amplog_domain::OperationId, amplog_domain::LeaseId) {
    use amplog_domain::{LeaseId, OperationId};
    let outcome = service.request_operation(&s.ctx, s.installation, &read_of(object)).await.expect("request a read");
    let op = OperationId(outcome.id_of("operation").expect("an operation"));
    let lease = LeaseId(uuid::Uuid::now_v7());
    service.start_operation(&s.ctx, op, lease, chrono::Duration::minutes(5)).await.expect("start the read");
    (op, lease)
}

/// Holds transactional commands just before COMMIT, their events inserted, so a test can
/// keep an append open while others commit (`CommandService::with_commit_gate`).
pub struct CommitGate {
    /// Signalled when a command reaches the gate.
    pub reached: tokio::sync::Notify,
    /// One permit lets one command commit.
    pub release: tokio::sync::Semaphore,
}

impl Default for CommitGate {
    fn default() -> Self {
        Self { reached: tokio::sync::Notify::new(), release: tokio::sync::Semaphore::new(0) }
    }
}

impl crate::service::BeforeCommit for CommitGate {
    fn before_commit(&self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async {
            self.reached.notify_one();
            self.release.acquire().await.expect("the gate is never closed").forget();
        })
    }
}

impl CommandService {
    /// Commands in a transaction wait at `gate` before they commit.
    pub fn with_commit_gate(self, gate: std::sync::Arc<CommitGate>) -> Self {
        self.with_before_commit(gate)
    }
}
