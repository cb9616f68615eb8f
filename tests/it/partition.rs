//! A partitioned leader: a projector in a network namespace of its own (`ip netns`, a veth
//! pair to PostgreSQL) leads, and the link is cut while commands keep coming. PostgreSQL's
//! keepalive probes end its session (and its advisory lock) within seconds, a projector
//! outside takes over, and the cut-off one commits nothing after that: its fencing token is
//! stale. When the link comes back it rejoins as a follower, and takes over in turn when
//! the other one dies. The read models equal the log: no batch applied twice or skipped.
//! Needs root (network namespaces); elsewhere it says so and passes.

use crate::cli::{log_truth, projected};
use crate::pg::Cluster;
use crate::process::Process;
use amplog_commands::database::{Database, Hosts};
use amplog_projections::{status, READ_MODELS};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The namespace and its veth pair, removed when dropped.
struct Namespace {
    name: String,
}

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("ip (iproute2)");
    assert!(output.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

impl Namespace {
    /// `10.231.{n}.2` inside, `10.231.{n}.1` on the host side.
    fn create(n: u32) -> Self {
        let name = format!("amplog-{n}");
        let (host, inside) = (format!("avh{n}"), format!("avn{n}"));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Namespace { name };
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &inside]);
        ip(&["link", "set", &inside, "netns", &ns.name]);
        ip(&["addr", "add", &format!("10.231.{n}.1/24"), "dev", &host]);
        ip(&["link", "set", &host, "up"]);
        ns.exec_ip(&["addr", "add", &format!("10.231.{n}.2/24"), "dev", &inside]);
        ns.exec_ip(&["link", "set", &inside, "up"]);
        ns.exec_ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn exec_ip(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    fn link(&self, n: u32, up: bool) {
        self.exec_ip(&["link", "set", &format!("avn{n}"), if up { "up" } else { "down" }]);
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn projector(url: &str, log: &std::path::Path, netns: Option<&str>) -> Process {
    let binary = env!("CARGO_BIN_EXE_amplog");
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, binary]);
            c
        }
        None => Command::new(binary),
    };
    command
        .args(["projections", "run", "--batch-size", "5"])
        .env("DATABASE_URL", url)
        .env("AMPLOG_LOG", "info,sqlx=error")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    Process(Some(command.spawn().unwrap()))
}

/// The pid in the leader's holder name (`…:{host}:{pid}`).
async fn leader_pid(pool: &sqlx::PgPool) -> Option<u32> {
    let leader = status(pool, READ_MODELS).await.ok()?.leader?;
    leader.rsplit(':').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_projector_is_fenced_and_rejoins_as_a_follower() {
    if !String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap().trim().eq("0") {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let n = std::process::id() % 200 + 20;
    let ns = Namespace::create(n);
    let cluster = Cluster::primary_on(&format!("127.0.0.1,10.231.{n}.1"), Some(&format!("10.231.{n}.0/24")));
    let admin = sqlx::PgPool::connect(&cluster.url("postgres")).await.unwrap();
    sqlx::query("CREATE DATABASE amplog").execute(&admin).await.unwrap();
    admin.close().await;
    let local = cluster.url("amplog");
    let database = Database::connect(Hosts::parse(&local).unwrap(), 8).await.unwrap();
    let pool = database.pool.clone();
    let key = amplog_commands::credentials::CredentialKey::from_bytes(&amplog_commands::testing::TEST_KEY).unwrap();
    let service = amplog_commands::CommandService::new(
        pool.clone(),
        amplog_log::EventStore::default(),
        amplog_commands::credentials::CredentialStore::new(key),
    );
    let s = amplog_commands::testing::seed(&service).await;
    let logs = tempfile::tempdir().unwrap();

    // The cut-off one first, so it leads.
    let remote = format!("postgres://postgres@10.231.{n}.1:{}/amplog", cluster.port);
    let inside = projector(&remote, &logs.path().join("inside.log"), Some(&ns.name));
    let deadline = Instant::now() + Duration::from_secs(30);
    while leader_pid(&pool).await != Some(inside.pid()) {
        assert!(Instant::now() < deadline, "the namespaced projector did not lead");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outside = projector(&local, &logs.path().join("outside.log"), None);
    let token = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT token FROM projector_leases WHERE name = $1")
            .bind(READ_MODELS)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let first_token = token(pool.clone()).await;

    // Commands all along: each a read requested, started and one page of 7 records.
    let writing = {
        let (service, ctx, installation) = (service.clone(), s.ctx.clone(), s.installation);
        tokio::spawn(async move {
            for _ in 0..150 {
                crate::cli::read_one_page_of_seven(&service, &ctx, installation).await;
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    ns.link(n, false);
    let cut = Instant::now();
    let deadline = cut + Duration::from_secs(60);
    while leader_pid(&pool).await != Some(outside.pid()) {
        assert!(Instant::now() < deadline, "nobody took over from the partitioned leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let takeover = cut.elapsed();
    // The lock is taken first, the token moved right after it.
    let token_above = |floor: i64| {
        let pool = pool.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let now = token(pool.clone()).await;
                if now > floor {
                    return now;
                }
                assert!(Instant::now() < deadline, "the takeover did not move the fencing token past {floor}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let second_token = token_above(first_token).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ns.link(n, true);
    writing.await.unwrap();

    // The cut-off process lives on, a follower: when the new leader dies, it leads again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&pool, READ_MODELS).await.unwrap().lag_events > 0 {
        assert!(Instant::now() < deadline, "the new leader did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(projected(&pool).await, log_truth(&pool).await, "no batch applied twice or skipped");
    assert_eq!(leader_pid(&pool).await, Some(outside.pid()), "the old leader did not take the lead back");
    let rejoin = Instant::now();
    drop(outside);
    let deadline = Instant::now() + Duration::from_secs(60);
    while leader_pid(&pool).await != Some(inside.pid()) {
        assert!(Instant::now() < deadline, "the healed projector did not take over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rejoined = rejoin.elapsed();
    token_above(second_token).await;
    drop(inside);
    assert_eq!(projected(&pool).await, log_truth(&pool).await);
    assert_eq!(log_truth(&pool).await, (150, 150 * 7));
    let inside_log = std::fs::read_to_string(logs.path().join("inside.log")).unwrap();
    assert!(inside_log.contains("stopped leading"), "the cut-off leader knew it lost the lead: {inside_log}");
    println!(
        "partitioned leader: taken over {takeover:?} after the cut (PostgreSQL's keepalives ended its session); \
         after healing it followed, and led again {rejoined:?} after the new leader died"
    );
}
