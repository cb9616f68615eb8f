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
use serde_json::{json, Value};
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
            // As deployed (deploy/k8s): info spans live, JSON logs (here into a file).
            .env("AMPLOG_LOG", "info,sqlx=warn")
            .env("AMPLOG_LOG_FORMAT", "json")
            .stderr(std::fs::File::create(std::env::temp_dir().join("amplog-bench-serve.log"))?)
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

    fn p99_ms(&self) -> f64 {
        ms(self.percentile(0.99))
    }

    fn passed(&self) -> bool {
        self.errors == 0 && self.percentile(0.99) < Duration::from_millis(100)
    }

    fn describe(&self) -> String {
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, errors {}/{} ({:.0}/s achieved)",
            ms(self.percentile(0.5)),
            self.p99_ms(),
            self.errors,
            self.sent,
            self.latencies.len() as f64 / self.elapsed.as_secs_f64()
        )
    }
}

/// One request of a side: its answer, reduced to what the sides must agree on (`None`: an
/// error or a missing result).
type Request = Arc<dyn Fn(u64) -> BoxFuture<'static, Result<Option<Value>>> + Send + Sync>;

/// Sends `request(i)` at `rate` per second for `duration`, each at its scheduled time.
/// A request that answers `None` or fails is an error.
pub async fn open_loop(rate: u64, duration: Duration, request: Request) -> Load {
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
                if !matches!(ok, Ok(Ok(Some(_)))) {
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

/// The two queries measured: what a builder's dashboard asks most.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// One installation with its connection's status and its 10 newest operations.
    Installation,
    /// The first 50 installations with their health and connection status.
    List,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Installation => "installation with its connection and 10 operations",
            Kind::List => "installations(first: 50) with health and connection status",
        }
    }

    fn query(self) -> &'static str {
        match self {
            Kind::Installation => {
                "query($id: UUID!) { installation(id: $id) { id health paused groupRef
                 connection { status } operations(first: 10) { nodes { id status object requestedAt } } } }"
            }
            Kind::List => "query { installations(first: 50) { nodes { id health connection { status } } } }",
        }
    }
}

fn pick(seeded: &Seeded, i: u64) -> (&ProjectId, &str, InstallationId) {
    // A cheap deterministic scatter over projects and installations.
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let (project, key, ids) = &seeded.projects[(h % seeded.projects.len() as u64) as usize];
    (project, key.as_str(), ids[((h >> 16) % ids.len() as u64) as usize])
}

/// The API's answer, reduced: ids, statuses and health in the order given.
fn api_answer(kind: Kind, body: &Value) -> Option<Value> {
    if body.get("errors").is_some() {
        return None;
    }
    match kind {
        Kind::Installation => {
            let i = &body["data"]["installation"];
            let ops: Vec<Value> = i["operations"]["nodes"]
                .as_array()?
                .iter()
                .map(|o| json!([o["id"], o["status"], o["object"]]))
                .collect();
            Some(json!([i["id"], i["health"], i["paused"], i["groupRef"], i["connection"]["status"], ops]))
        }
        Kind::List => {
            let nodes = body["data"]["installations"]["nodes"].as_array()?;
            Some(Value::Array(nodes.iter().map(|n| json!([n["id"], n["health"], n["connection"]["status"]])).collect()))
        }
    }
}

/// The same reads as plain SQL, on `conn`, reduced like `api_answer`.
async fn raw_answer(
    kind: Kind,
    conn: &mut sqlx::PgConnection,
    project: Uuid,
    installation: Uuid,
) -> Result<Option<Value>> {
    let doc = |text: &str| serde_json::from_str::<Value>(text);
    match kind {
        Kind::Installation => {
            let key = installation.to_string();
            let inst: Option<String> =
                sqlx::query_scalar("SELECT doc::text FROM installations WHERE key = $1 AND project_id = $2")
                    .bind(&key)
                    .bind(project)
                    .fetch_optional(&mut *conn)
                    .await?;
            let Some(inst) = inst else { return Ok(None) };
            let inst = doc(&inst)?;
            let connection: Option<String> =
                sqlx::query_scalar("SELECT doc::text FROM connections WHERE key = $1 AND project_id = $2")
                    .bind(inst["connection_id"].as_str())
                    .bind(project)
                    .fetch_optional(&mut *conn)
                    .await?;
            let connection = doc(&connection.unwrap_or_else(|| "null".into()))?;
            let ops: Vec<String> = sqlx::query_scalar(
                "SELECT doc::text FROM operations WHERE project_id = $1 AND installation_id = $2 ORDER BY key DESC LIMIT 11",
            )
            .bind(project)
            .bind(&key)
            .fetch_all(&mut *conn)
            .await?;
            let mut nodes = Vec::new();
            for op in ops.iter().take(10) {
                let op = doc(op)?;
                nodes.push(json!([op["operation_id"], op["status"], op["object"]]));
            }
            Ok(Some(json!([
                inst["installation_id"],
                inst["health"],
                inst["paused"],
                inst["group_ref"],
                connection["status"],
                nodes
            ])))
        }
        Kind::List => {
            let rows: Vec<String> = sqlx::query_scalar(
                "SELECT doc::text FROM installations WHERE project_id = $1 AND (doc->>'deleted')::boolean IS NOT TRUE
                 ORDER BY key LIMIT 51",
            )
            .bind(project)
            .fetch_all(&mut *conn)
            .await?;
            let docs = rows.iter().take(50).map(|r| doc(r)).collect::<Result<Vec<_>, _>>()?;
            let keys: Vec<&str> = docs.iter().filter_map(|d| d["connection_id"].as_str()).collect();
            let connections: Vec<(String, String)> =
                sqlx::query_as("SELECT key, doc::text FROM connections WHERE project_id = $1 AND key = ANY($2)")
                    .bind(project)
                    .bind(&keys)
                    .fetch_all(&mut *conn)
                    .await?;
            let status: std::collections::HashMap<String, Value> = connections
                .iter()
                .map(|(k, d)| Ok((k.clone(), doc(d)?["status"].clone())))
                .collect::<Result<_, serde_json::Error>>()?;
            Ok(Some(Value::Array(
                docs.iter()
                    .map(|d| {
                        let s = d["connection_id"].as_str().and_then(|c| status.get(c)).cloned().unwrap_or(Value::Null);
                        json!([d["installation_id"], d["health"], s])
                    })
                    .collect(),
            )))
        }
    }
}

/// The three sides of a query: amplog's API, the same reads as plain SQL on one pool, and
/// the same reads in the tenancy a correct service needs (one transaction as the
/// application role with the project set: row-level security on).
struct Sides {
    api: Request,
    raw: Request,
    tenant: Request,
}

fn sides(kind: Kind, seeded: &Arc<Seeded>, pool: &PgPool, client: &reqwest::Client, base: &str) -> Sides {
    let api: Request = {
        let (seeded, client, endpoint) = (seeded.clone(), client.clone(), format!("{base}/graphql"));
        Arc::new(move |i| {
            let (_, key, installation) = pick(&seeded, i);
            let body = match kind {
                Kind::Installation => json!({"query": kind.query(), "variables": {"id": installation.0}}),
                Kind::List => json!({"query": kind.query()}),
            };
            let request = client.post(&endpoint).header("x-api-key", key).json(&body);
            Box::pin(async move {
                let response = request.send().await?;
                if response.status() != 200 {
                    return Ok(None);
                }
                Ok(api_answer(kind, &response.json().await?))
            })
        })
    };
    let raw: Request = {
        let (seeded, pool) = (seeded.clone(), pool.clone());
        Arc::new(move |i| {
            let (project, _, installation) = pick(&seeded, i);
            let (project, pool) = (project.0, pool.clone());
            Box::pin(async move {
                let mut conn = pool.acquire().await?;
                raw_answer(kind, &mut conn, project, installation.0).await
            })
        })
    };
    let tenant: Request = {
        let (seeded, pool) = (seeded.clone(), pool.clone());
        Arc::new(move |i| {
            let (project, _, installation) = pick(&seeded, i);
            let (project, pool) = (*project, pool.clone());
            Box::pin(async move {
                let db = amplog_api::tenant::TenantDb::new(pool, project, STATEMENT_TIMEOUT_MS);
                let answer = raw_answer(kind, &mut *db.conn().await?, project.0, installation.0).await;
                db.release().await;
                answer
            })
        })
    };
    Sides { api, raw, tenant }
}

/// `serve`'s default statement timeout, which the tenant side sets too.
const STATEMENT_TIMEOUT_MS: u64 = 5_000;

/// The sides answer alike: the same reduced answer for a sample of requests (none missing).
async fn same_answers(kind: Kind, sides: &Sides) -> Result<()> {
    for i in (0..2_000u64).step_by(37) {
        let api = (sides.api)(i).await?;
        let raw = (sides.raw)(i).await?;
        let tenant = (sides.tenant)(i).await?;
        if api.is_none() || api != raw || api != tenant {
            bail!(
                "{}: the sides answered request {i} differently:\napi {api:?}\nraw {raw:?}\ntenant {tenant:?}",
                kind.name()
            );
        }
    }
    Ok(())
}

/// The highest rate with p99 < 100 ms and no errors, stepped up until a step fails.
async fn highest_rate(request: &Request, secs: u64) -> Option<Load> {
    let mut best = None;
    for rate in [500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000, 8000] {
        let load = open_loop(rate, Duration::from_secs(secs), request.clone()).await;
        eprintln!("  {rate}/s: {}", load.describe());
        if !load.passed() {
            break;
        }
        best = Some(load);
    }
    best
}

/// The installation query's p99 at 1,000 requests/s on one seed, beside raw-tenant's.
pub struct AtRate {
    pub api: Load,
    pub tenant: Load,
}

/// Measures both queries on one seed (`label`): each at 1,000 requests/s against its raw and
/// raw-tenant baselines, serve's CPU per request, and (with `step`) the highest rate of
/// each side. Returns the installation query's figures at 1,000 requests/s.
/// What one measurement of the API runs against.
pub struct Target<'a> {
    pub bin: &'a str,
    pub url: &'a str,
    pub secs: u64,
    /// The seed's name in the report.
    pub label: &'a str,
    /// Also step each side's rate up to its highest.
    pub step: bool,
}

pub async fn run(report: &mut Report, pool: &PgPool, seeded: Seeded, target: Target<'_>) -> Result<AtRate> {
    let Target { bin, url, secs, label, step } = target;
    let server = ServerProcess::start(bin, url)?;
    let seeded = Arc::new(seeded);
    let client = amplog_providers::connector::http_client().pool_max_idle_per_host(512).build()?;
    let duration = Duration::from_secs(secs);
    let mut installation = None;
    for kind in [Kind::Installation, Kind::List] {
        let sides = sides(kind, &seeded, pool, &client, &server.base);
        same_answers(kind, &sides).await?;
        eprintln!("{label}, {}: warming up...", kind.name());
        open_loop(300, Duration::from_secs(3), sides.api.clone()).await;
        open_loop(300, Duration::from_secs(2), sides.tenant.clone()).await;
        eprintln!("{label}, {}: 1,000 requests/s for {secs} s per side...", kind.name());
        // Per request: serve's CPU, and PostgreSQL's for each side.
        let per = |seconds: f64, load: &Load| seconds * 1000.0 / load.sent as f64;
        let (cpu, pg) = (crate::cpu::process_seconds(server.child.id()), crate::cpu::CpuSnapshot::now());
        let api = open_loop(1000, duration, sides.api.clone()).await;
        let cpu_ms = per(crate::cpu::process_seconds(server.child.id()) - cpu, &api);
        let api_pg = per(pg.used("PostgreSQL"), &api);
        let pg = crate::cpu::CpuSnapshot::now();
        let raw = open_loop(1000, duration, sides.raw.clone()).await;
        let raw_pg = per(pg.used("PostgreSQL"), &raw);
        let pg = crate::cpu::CpuSnapshot::now();
        let tenant = open_loop(1000, duration, sides.tenant.clone()).await;
        let tenant_pg = per(pg.used("PostgreSQL"), &tenant);
        eprintln!(
            "api {} | raw {} | raw-tenant {} | serve CPU {cpu_ms:.3} ms/request; PostgreSQL {api_pg:.3} / {raw_pg:.3} / {tenant_pg:.3}",
            api.describe(),
            raw.describe(),
            tenant.describe()
        );
        report.rows.push(format!(
            "| API ({label}): {} at 1,000 requests/s, open loop {secs} s | {} (serve CPU {cpu_ms:.3} ms/request, PostgreSQL {api_pg:.3}) | raw {} (PostgreSQL {raw_pg:.3}); raw-tenant {} (PostgreSQL {tenant_pg:.3}) | p99 **{:.2}×** raw-tenant ({:.2}× raw) |",
            kind.name(),
            api.describe(),
            raw.describe(),
            tenant.describe(),
            api.p99_ms() / tenant.p99_ms().max(1e-9),
            api.p99_ms() / raw.p99_ms().max(1e-9),
        ));
        if step {
            eprintln!("{label}, {}: stepping the API...", kind.name());
            let api_best = highest_rate(&sides.api, secs).await;
            eprintln!("{label}, {}: stepping raw-tenant...", kind.name());
            let tenant_best = highest_rate(&sides.tenant, secs).await;
            let rate = |l: &Option<Load>| l.as_ref().map_or(0, |l| l.rate);
            let describe = |l: &Option<Load>| {
                l.as_ref().map_or("below 500/s".into(), |l| format!("{}/s: {}", l.rate, l.describe()))
            };
            report.rows.push(format!(
                "| API ({label}): {}, highest rate with p99 < 100 ms and no errors | {} | raw-tenant {} | **{:.2}** |",
                kind.name(),
                describe(&api_best),
                describe(&tenant_best),
                rate(&api_best) as f64 / rate(&tenant_best).max(1) as f64
            ));
        }
        if kind == Kind::Installation {
            installation = Some(AtRate { api, tenant });
        }
    }
    let (_, peak_rss) = server.rss_mib();
    eprintln!("serve RSS peak {peak_rss:.0} MiB");
    installation.context("measured")
}
