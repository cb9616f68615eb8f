//! Test support (feature `testing`): a server on port 0 over a fresh test database, with
//! the read-model projector running in-process, and a small GraphQL client.

use crate::auth::{Keys, Scope};
use crate::server::Server;
use crate::state::ServerConfig;
use amplog_commands::testing::{test_db_with, TestDb};
use amplog_commands::{CommandContext, CommandService};
use amplog_domain::ProjectId;
use amplog_projections::Runner;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

pub struct TestApp {
    pub db: TestDb,
    pub service: CommandService,
    pub keys: Keys,
    pub server: Option<Server>,
    pub base: String,
    projector: Option<tokio::task::JoinHandle<()>>,
}

/// A project with one key of each scope.
pub struct TestProject {
    pub ctx: CommandContext,
    pub admin: String,
    pub write: String,
    pub read: String,
}

impl TestApp {
    /// A server with the default (production) configuration and a running projector.
    pub async fn spawn() -> TestApp {
        Self::spawn_with(ServerConfig::default(), true).await
    }

    pub async fn spawn_with(mut config: ServerConfig, projector: bool) -> TestApp {
        let db = test_db_with(24).await;
        let service = db.service();
        let keys = Keys::new(&service);
        config.listen = "127.0.0.1:0".parse().expect("an address");
        let server = Server::start(config, service.clone(), keys.clone()).await.expect("start the server");
        let base = format!("http://{}", server.addr);
        let projector = projector.then(|| {
            let runner = Runner::new(db.pool.clone(), service.store().clone(), "test-projector");
            tokio::spawn(async move {
                runner.run(std::future::pending()).await.expect("the projector runs");
            })
        });
        TestApp { db, service, keys, server: Some(server), base, projector }
    }

    /// Creates a project and a key of each scope.
    pub async fn project(&self, name: &str) -> TestProject {
        let ctx = CommandContext::new(ProjectId(Uuid::now_v7()), "test");
        self.service.create_project(&ctx, name).await.expect("create the project");
        let key = |scope| async move { self.keys.create(ctx.project_id, scope, None).await.expect("a key").1 };
        TestProject {
            admin: key(Scope::Admin).await,
            write: key(Scope::Write).await,
            read: key(Scope::Read).await,
            ctx,
        }
    }

    /// POSTs a GraphQL request; returns the HTTP status and the JSON body.
    pub async fn gql(&self, key: &str, query: &str, variables: Value) -> (u16, Value) {
        self.gql_with(key, query, variables, &[]).await
    }

    pub async fn gql_with(&self, key: &str, query: &str, variables: Value, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut request = amplog_providers::connector::http_client()
            .build()
            .expect("an HTTP client")
            .post(format!("{}/graphql", self.base))
            .header("x-api-key", key)
            .json(&json!({"query": query, "variables": variables}));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("the server answers");
        let status = response.status().as_u16();
        (status, response.json().await.expect("a JSON body"))
    }

    /// Runs a query that must succeed; returns its `data`.
    pub async fn data(&self, key: &str, query: &str, variables: Value) -> Value {
        let (status, body) = self.gql(key, query, variables).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.get("errors").is_none(), "unexpected errors: {body}");
        body["data"].clone()
    }

    /// Waits until the projector has applied everything committed so far.
    pub async fn projected(&self) {
        let reader = amplog_log::LogReader::new(self.db.pool.clone());
        let end = reader.end().await.expect("the log's end");
        for _ in 0..3000 {
            let mut conn = self.db.pool.acquire().await.expect("a connection");
            let checkpoint = amplog_log::LogReader::checkpoint(&mut conn, amplog_projections::READ_MODELS)
                .await
                .expect("the checkpoint");
            if reader.committed_after(checkpoint, end).await.expect("count") == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the projector did not catch up within 30 s");
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.expect("a graceful stop");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(projector) = self.projector.take() {
            projector.abort();
        }
    }
}

/// The first error's `extensions.code` of a GraphQL body.
pub fn error_code(body: &Value) -> &str {
    body["errors"][0]["extensions"]["code"].as_str().unwrap_or("<no error code>")
}
