//! Proxy throughput: 32 concurrent clients fetching one record at a time through
//! `/v1/proxy/...` (amplog serving in this process, every call recorded in the durable log)
//! beside the same clients calling the simulator directly with the customer's token, in
//! the same run; with the simulator answering at once (amplog's cost laid bare) and after
//! a provider-like 50 ms. The added p50 is reported beside one commit's time on this disk.
//! The bench refuses to report when a sample of answers differs between the two sides.

use crate::{drive, ms, Report, Stats};
use amplog_api::{Keys, Scope, Server, ServerConfig};
use amplog_commands::CommandContext;
use amplog_domain::integration::{Manifest, ObjectDecl};
use amplog_domain::{IntegrationId, ProjectId};
use amplog_providers::connector::{Catalog, Connectors, ProviderSettings};
use amplog_simulator::sim::{Faults, SimConfig, Simulator};
use anyhow::{Context, Result};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const CLIENTS: usize = 32;
const RECORDS: u64 = 200;

/// One commit's time on this disk: p50 of 200 one-row INSERT transactions.
async fn commit_time(pool: &PgPool) -> Result<Duration> {
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS bench_commit (n bigint)").execute(pool).await?;
    let mut times = Vec::new();
    for n in 0..200i64 {
        let t0 = Instant::now();
        sqlx::query("INSERT INTO bench_commit VALUES ($1)").bind(n).execute(pool).await?;
        times.push(t0.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// A successful answer's body, read to its end.
async fn fetch(request: reqwest::RequestBuilder) -> Result<Vec<u8>> {
    let response = request.send().await?;
    let status = response.status();
    let body = response.bytes().await?;
    anyhow::ensure!(status.is_success(), "HTTP {status}: {}", String::from_utf8_lossy(&body));
    Ok(body.to_vec())
}

pub async fn run(report: &mut Report, pool: &PgPool, seconds: u64) -> Result<()> {
    let service = crate::service(pool);
    let commit = commit_time(pool).await?;
    for latency_ms in [0u64, 50] {
        let faults = Faults { slow: if latency_ms > 0 { 1.0 } else { 0.0 }, slow_ms: latency_ms, ..Faults::default() };
        let config = SimConfig { records: RECORDS as usize, faults, ..SimConfig::default() };
        let sim = Simulator::start("127.0.0.1:0".parse()?, config).await?;
        let settings =
            [("simulator".to_string(), ProviderSettings { base_url: Some(sim.url()), ..Default::default() })]
                .into_iter()
                .collect();
        let connectors =
            Connectors::with_egress(&Catalog::builtin(), &settings, amplog_providers::egress::Egress::private());
        let ctx = CommandContext::new(ProjectId(Uuid::now_v7()), "bench");
        service.create_project(&ctx, "proxy-bench").await?;
        let decl = ObjectDecl::named("contacts");
        let manifest = Manifest { objects: vec![decl] };
        let outcome = service.declare_integration_with(&ctx, "crm", "simulator", Some(&manifest)).await?;
        let integration = IntegrationId(outcome.id_of("integration").context("integration")?);
        let connector = connectors.get("simulator").context("connector")?;
        let (_, installation) =
            amplog_simulator::sim::install_customer(&service, &ctx, integration, &connector, "proxy-customer").await?;
        let direct_token = amplog_simulator::sim::connect_customer(&connector, "direct-customer").await?.access_token;
        let keys = Keys::new(&service);
        let (_, key) = keys.create(ctx.project_id, Scope::Write, None).await?;
        let server_config =
            ServerConfig { listen: "127.0.0.1:0".parse()?, connectors: connectors.clone(), ..ServerConfig::default() };
        let server = Server::start(server_config, service.clone(), keys).await?;
        let http = amplog_providers::connector::streaming_http_client().pool_max_idle_per_host(CLIENTS).build()?;
        let proxy_url = Arc::new(format!("http://{}/v1/proxy/{installation}/crm/v3/objects/contacts", server.addr));
        let direct_url = Arc::new(format!("{}/crm/v3/objects/contacts", sim.url()));
        // Both sides answer alike.
        for id in 1..=5 {
            let through = fetch(http.get(format!("{proxy_url}/{id}")).header("x-api-key", &key)).await?;
            let direct = fetch(http.get(format!("{direct_url}/{id}")).bearer_auth(&direct_token)).await?;
            anyhow::ensure!(through == direct, "record {id}: the proxy's answer differs from the provider's");
        }
        let duration = Duration::from_secs(seconds);
        let side = |proxied: bool| {
            let (http, key, token) = (http.clone(), key.clone(), direct_token.clone());
            let url = if proxied { proxy_url.clone() } else { direct_url.clone() };
            move |w: usize, i: u64| {
                let (http, key, token, url) = (http.clone(), key.clone(), token.clone(), url.clone());
                async move {
                    let id = (w as u64 * 7 + i) % RECORDS + 1;
                    let request = http.get(format!("{url}/{id}"));
                    let request = if proxied { request.header("x-api-key", key) } else { request.bearer_auth(token) };
                    fetch(request).await?;
                    Ok(1)
                }
            }
        };
        eprintln!("proxy: {CLIENTS} clients, provider latency {latency_ms} ms: direct...");
        let direct: Stats = drive(CLIENTS, duration, side(false)).await?;
        eprintln!("proxy: {CLIENTS} clients, provider latency {latency_ms} ms: through amplog...");
        let through: Stats = drive(CLIENTS, duration, side(true)).await?;
        let recorded: i64 =
            sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'Proxied' AND project_id = $1")
                .bind(ctx.project_id.0)
                .fetch_one(pool)
                .await?;
        let commits: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT transaction_id::text) FROM events WHERE event_type = 'Proxied' AND project_id = $1",
        )
        .bind(ctx.project_id.0)
        .fetch_one(pool)
        .await?;
        anyhow::ensure!(recorded as u64 >= through.ops, "{recorded} calls recorded of {}", through.ops);
        report.pair(
            &format!(
                "proxy GETs, {CLIENTS} clients, provider latency {latency_ms} ms ({recorded} calls in {commits} commits; \
                 added p50 {:.2} ms, one commit {:.2} ms) (vs the same clients calling the simulator directly)",
                ms(through.percentile(0.5)) - ms(direct.percentile(0.5)),
                ms(commit)
            ),
            "req/s",
            &through,
            &direct,
            false,
        );
        server.stop().await?;
        sim.stop().await;
    }
    Ok(())
}
