//! The API load harness: seeds installations and operations through the command service,
//! projects them, starts `amplog serve` as its own process, and drives it open-loop (each
//! request is sent at its scheduled time whether or not earlier ones have answered, and its
//! latency counts from that time, so a stalled server cannot hide its queue). The raw
//! baseline sends the same reads as plain SQL to the same PostgreSQL at the same rates.

use crate::{ms, service, Report};
use amplog_commands::credentials::Secret;
use amplog_commands::service::{NewInstallation, NewOperation};
use amplog_commands::CommandContext;
use amplog_domain::integration::{Backfill, Manifest, ObjectDecl};
use amplog_domain::operation::{OperationType, Trigger};
use amplog_domain::*;
use anyhow::{bail, Context, Result};
use futures::future::BoxFuture;
use sqlx::PgPool;
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub struct Seeded {
    /// Per project: its id, a read key and its installations.
    pub projects: Vec<(ProjectId, String, Vec<InstallationId>)>,
}

const PROJECTS: usize = 10;
const WRITERS: usize = 32;

/// `installations` installations over ten projects, `operations` read requests spread
/// evenly over them, all through the command service; then the projector catches up.
pub async fn seed(pool: &PgPool, seed_pool: &PgPool, installations: usize, operations: usize) -> Result<Seeded> {
    let svc = service(seed_pool);
    let keys = amplog_api::Keys::new(&svc);
    let started = Instant::now();
    let mut projects = Vec::new();
    for p in 0..PROJECTS {
        let ctx = CommandContext::new(ProjectId(Uuid::now_v7()), "bench");
        svc.create_project(&ctx, &format!("bench-{p}")).await?;
        let objects = ["contacts", "companies", "deals"].map(|name| ObjectDecl {
            optional: false,
            name: name.into(),
            schedule: None,
            backfill: Backfill::Days(30),
            fields: vec![],
            destination: None,
            subscribe: vec![],
        });
        let manifest = Manifest { objects: objects.to_vec() };
        let integration = IntegrationId(
            svc.declare_integration_with(&ctx, "crm", "hubspot", Some(&manifest))
                .await?
                .id_of("integration")
                .context("id")?,
        );
        let connection = ConnectionId(
            svc.create_connection(&ctx, integration, "g", &Secret("token".into()))
                .await?
                .id_of("connection")
                .context("id")?,
        );
        let per_project = installations / PROJECTS;
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (svc, ctx) = (svc.clone(), ctx.clone());
                tokio::spawn(async move {
                    let mut made = Vec::new();
                    for i in (w..per_project).step_by(WRITERS) {
                        let new = NewInstallation {
                            integration_id: integration,
                            revision: None,
                            group_ref: "g".into(),
                            consumer_ref: format!("consumer-{i}"),
                            connection_id: connection,
                            objects: None,
                        };
                        made.push(InstallationId(
                            svc.create_installation(&ctx, &new).await?.id_of("installation").context("id")?,
                        ));
                    }
                    Ok::<_, anyhow::Error>(made)
                })
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            ids.extend(t.await??);
        }
        let (_, key) = keys.create(ctx.project_id, amplog_api::Scope::Read, Some("bench")).await?;
        projects.push((ctx.project_id, key, ids));
    }
    eprintln!("seeded {installations} installations in {:.0} s", started.elapsed().as_secs_f64());
    // Operations: each writer owns a slice of the installations, so no two write one stream.
    let all: Arc<Vec<(CommandContext, InstallationId)>> = Arc::new(
        projects.iter().flat_map(|(p, _, ids)| ids.iter().map(|i| (CommandContext::new(*p, "bench"), *i))).collect(),
    );
    let per_installation = operations / all.len().max(1);
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (svc, all, done) = (svc.clone(), all.clone(), done.clone());
            tokio::spawn(async move {
                for round in 0..per_installation {
                    for (ctx, installation) in all.iter().skip(w).step_by(WRITERS) {
                        let object = ["contacts", "companies", "deals"][round % 3];
                        let new = NewOperation {
                            op_type: OperationType::Read,
                            object: object.into(),
                            since: None,
                            until: None,
                            trigger: Trigger::Scheduled,
                        };
                        svc.request_operation(ctx, *installation, &new).await?;
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    let bar = indicatif::ProgressBar::new((per_installation * all.len()) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("seeding operations [{bar:30}] {pos}/{len} ({per_sec}, {eta} left)")
            .expect("a valid template"),
    );
    let progress = {
        let (done, bar) = (done.clone(), bar.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                bar.set_position(done.load(std::sync::atomic::Ordering::Relaxed));
            }
        })
    };
    for t in tasks {
        t.await??;
    }
    progress.abort();
    bar.finish_and_clear();
    eprintln!("seeded {} operations; projecting...", done.load(std::sync::atomic::Ordering::Relaxed));
    let runner = amplog_projections::Runner::new(pool.clone(), svc.store().clone(), "bench-seed");
    let projecting = Instant::now();
    anyhow::ensure!(runner.catch_up().await?, "another projector leads");
    eprintln!("projected in {:.0} s", projecting.elapsed().as_secs_f64());
    sqlx::query("VACUUM ANALYZE").execute(pool).await?;
    Ok(Seeded { projects })
}

/// A running `amplog serve`.
pub struct ServerProcess {
    child: std::process::Child,
    pub base: String,
}

impl ServerProcess {
    pub fn start(bin: &str, database_url: &str) -> Result<Self> {
        let key = "YW1wbG9nLWJlbmNoLWtleS0wMTIzNDU2Nzg5YWJjZGU="; // 32 bytes; nothing secret is read
        let mut child = std::process::Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--projectors", "off"])
            .env("DATABASE_URL", database_url)
            .env("AMPLOG_CREDENTIALS_KEY", key)
            .env("AMPLOG_DB_POOL", "32")
            .env("AMPLOG_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let Some(base) = line.trim().strip_prefix("amplog serving on ") else { bail!("unexpected output: {line}") };
        Ok(Self { base: base.to_string(), child })
    }

    /// Resident set size now and at its peak, in MiB.
    pub fn rss_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

pub struct Load {
    pub rate: u64,
    pub sent: u64,
    pub errors: u64,
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
}

impl Load {
    pub fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        sorted.get(((sorted.len() as f64 - 1.0) * p) as usize).copied().unwrap_or_default()
    }

    fn describe(&self) -> String {
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, errors {}/{} ({:.0}/s achieved)",
            ms(self.percentile(0.5)),
            ms(self.percentile(0.99)),
            self.errors,
            self.sent,
            self.latencies.len() as f64 / self.elapsed.as_secs_f64()
        )
    }
}

/// Sends `request(i)` at `rate` per second for `duration`, each at its scheduled time.
/// A request that returns `Ok(false)` or `Err` is an error.
pub async fn open_loop(
    rate: u64,
    duration: Duration,
    request: Arc<dyn Fn(u64) -> BoxFuture<'static, Result<bool>> + Send + Sync>,
) -> Load {
    let start = Instant::now();
    let total = rate * duration.as_secs();
    let results = Arc::new(std::sync::Mutex::new((Vec::with_capacity(total as usize), 0u64)));
    let mut tasks = Vec::with_capacity(total as usize);
    // At most IN_FLIGHT requests on the wire (like wrk2's fixed connections): the rest wait
    // their turn in the harness, their latency still counted from their scheduled time.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut sent = 0u64;
    while sent < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            let scheduled = start + Duration::from_secs_f64(sent as f64 / rate as f64);
            let (request, results, in_flight) = (request.clone(), results.clone(), in_flight.clone());
            let i = sent;
            tasks.push(tokio::spawn(async move {
                let ok = tokio::time::timeout(Duration::from_secs(10), async {
                    let _permit = in_flight.acquire().await.expect("never closed");
                    request(i).await
                })
                .await;
                let latency = scheduled.elapsed();
                let mut r = results.lock().unwrap();
                r.0.push(latency);
                if !matches!(ok, Ok(Ok(true))) {
                    r.1 += 1;
                }
            }));
            sent += 1;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed();
    let (latencies, errors) = std::mem::take(&mut *results.lock().unwrap());
    Load { rate, sent, errors, latencies, elapsed }
}

/// Requests on the wire at once (connections the harness keeps open).
const IN_FLIGHT: usize = 64;

const QUERY: &str = "query($id: UUID!) { installation(id: $id) { id health paused groupRef
    connection { status } operations(first: 10) { nodes { id status object requestedAt } } } }";

fn pick(seeded: &Seeded, i: u64) -> (&ProjectId, &str, InstallationId) {
    // A cheap deterministic scatter over projects and installations.
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let (project, key, ids) = &seeded.projects[(h % seeded.projects.len() as u64) as usize];
    (project, key.as_str(), ids[((h >> 16) % ids.len() as u64) as usize])
}

pub async fn run(report: &mut Report, pool: &PgPool, seeded: Seeded, bin: &str, url: &str, secs: u64) -> Result<()> {
    let server = ServerProcess::start(bin, url)?;
    let seeded = Arc::new(seeded);
    let client = amplog_providers::connector::http_client().pool_max_idle_per_host(512).build()?;
    let api: Arc<dyn Fn(u64) -> BoxFuture<'static, Result<bool>> + Send + Sync> = {
        let (seeded, client, endpoint) = (seeded.clone(), client.clone(), format!("{}/graphql", server.base));
        Arc::new(move |i| {
            let (_, key, installation) = pick(&seeded, i);
            let body = serde_json::json!({"query": QUERY, "variables": {"id": installation.0}});
            let request = client.post(&endpoint).header("x-api-key", key).json(&body);
            Box::pin(async move {
                let response = request.send().await?;
                let ok = response.status() == 200;
                let body: serde_json::Value = response.json().await?;
                Ok(ok && body.get("errors").is_none() && body["data"]["installation"]["operations"]["nodes"].is_array())
            })
        })
    };
    let raw: Arc<dyn Fn(u64) -> BoxFuture<'static, Result<bool>> + Send + Sync> = {
        let (seeded, pool) = (seeded.clone(), pool.clone());
        Arc::new(move |i| {
            let (project, _, installation) = pick(&seeded, i);
            let (project, pool) = (project.0, pool.clone());
            Box::pin(async move {
                let key = installation.0.to_string();
                let inst: Option<(String, String)> = sqlx::query_as(
                    "SELECT doc::text, doc->>'connection_id' FROM installations WHERE key = $1 AND project_id = $2",
                )
                .bind(&key)
                .bind(project)
                .fetch_optional(&pool)
                .await?;
                let Some((_, connection)) = inst else { return Ok(false) };
                let _: Option<String> =
                    sqlx::query_scalar("SELECT doc::text FROM connections WHERE key = $1 AND project_id = $2")
                        .bind(&connection)
                        .bind(project)
                        .fetch_optional(&pool)
                        .await?;
                let ops: Vec<String> = sqlx::query_scalar(
                    "SELECT doc::text FROM operations WHERE project_id = $1 AND installation_id = $2 ORDER BY key DESC LIMIT 11",
                )
                .bind(project)
                .bind(&key)
                .fetch_all(&pool)
                .await?;
                Ok(!ops.is_empty())
            })
        })
    };
    let duration = Duration::from_secs(secs);
    eprintln!("warming up...");
    open_loop(300, Duration::from_secs(3), api.clone()).await;
    open_loop(300, Duration::from_secs(2), raw.clone()).await;
    eprintln!("installation-with-operations at 1000 requests/s for {secs} s...");
    let at_1000 = open_loop(1000, duration, api.clone()).await;
    let raw_1000 = open_loop(1000, duration, raw.clone()).await;
    let (rss, _) = server.rss_mib();
    eprintln!("api {} | raw {} | rss {rss:.0} MiB", at_1000.describe(), raw_1000.describe());
    report.rows.push(format!(
        "| API: installation with its connection and 10 operations at 1,000 requests/s (open loop, {secs} s) | {} | {} | p99 {:.1}× raw; target p99 < 20 ms |",
        at_1000.describe(),
        raw_1000.describe(),
        ms(at_1000.percentile(0.99)) / ms(raw_1000.percentile(0.99)).max(1e-9)
    ));
    // The highest rate with p99 < 100 ms and no errors, in steps.
    let mut best: Option<Load> = None;
    let mut raw_at_best: Option<Load> = None;
    for rate in [1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000, 8000] {
        eprintln!("stepping: {rate} requests/s for {secs} s...");
        let load = open_loop(rate, duration, api.clone()).await;
        eprintln!("  {}", load.describe());
        let passed = load.errors == 0 && load.percentile(0.99) < Duration::from_millis(100);
        if !passed {
            break;
        }
        raw_at_best = Some(open_loop(rate, duration, raw.clone()).await);
        best = Some(load);
    }
    let (_, peak_rss) = server.rss_mib();
    match (best, raw_at_best) {
        (Some(best), Some(raw)) => report.rows.push(format!(
            "| API: highest rate with p99 < 100 ms and no errors | **{} requests/s**: {} | same rate as SQL: {} | target ≥ 3,000 requests/s; server RSS peak {peak_rss:.0} MiB |",
            best.rate,
            best.describe(),
            raw.describe()
        )),
        _ => report.rows.push(format!(
            "| API: highest rate with p99 < 100 ms and no errors | below 1,500 requests/s | — | target ≥ 3,000 requests/s; server RSS peak {peak_rss:.0} MiB |"
        )),
    }
    Ok(())
}
