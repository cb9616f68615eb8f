//! The `amplog` binary end to end: the embedded PostgreSQL, and demo → history → verify on a
//! real database.

use amplog_commands::testing::{test_db, TEST_KEY};
use base64::Engine;
use std::path::Path;
use std::process::{Command, Output};

fn amplog(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_amplog"));
    command.args(args).env_remove("DATABASE_URL").env_remove("AMPLOG_CREDENTIALS_KEY").env("AMPLOG_LOG", "warn");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run amplog")
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "amplog failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn installation_of(demo: &str) -> String {
    let line = demo.lines().find(|l| l.starts_with("installations: ")).expect("the demo names its installations");
    line["installations: ".len()..].split_whitespace().next().unwrap().to_string()
}

#[tokio::test]
async fn demo_history_and_verify_on_a_database_url() {
    let db = test_db().await;
    let key = base64::engine::general_purpose::STANDARD.encode(TEST_KEY);
    let env = [("DATABASE_URL", db.url.as_str()), ("AMPLOG_CREDENTIALS_KEY", key.as_str())];
    let demo = ok(amplog(&["demo"], &env));
    assert!(demo.contains("read while paused is refused: installation.paused"), "{demo}");
    assert!(demo.contains("(idempotent replay: nothing appended)"), "{demo}");
    let installation = installation_of(&demo);

    let history = ok(amplog(&["history", "--installation", &installation, "--json"], &env));
    let events: Vec<serde_json::Value> = history.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let count = |t: &str, e: &str| events.iter().filter(|v| v["aggregate_type"] == t && v["event_type"] == e).count();
    assert_eq!(count("installation", "Created"), 1);
    assert_eq!(count("installation", "OperationRequested"), 2);
    assert_eq!(count("operation", "Succeeded"), 2);
    assert_eq!(count("operation", "Failed"), 1);
    assert_eq!(count("operation", "PageRecorded"), 5);
    assert_eq!(count("connection", "TokenRefreshed"), 1);
    assert!(events.iter().all(|v| v["actor"] == "demo@amplog" && v["hash"].as_str().unwrap().len() == 64));
    let positions: Vec<i64> = events.iter().map(|v| v["position"].as_i64().unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "log order");
    // No secret in what an auditor sees.
    assert!(!history.contains("demo-at-") && !history.contains("demo-rt-"));

    let verified = ok(amplog(&["verify", "--installation", &installation], &env));
    assert!(verified.contains("intact: 19 events in 4 streams, 0 break(s)"), "{verified}");

    // An altered row makes `verify` fail, naming it.
    let mut tx = amplog_log::tx::begin(&db.pool).await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut *tx).await.unwrap();
    sqlx::query("UPDATE events SET metadata = '{\"actor\":\"mallory\"}' WHERE aggregate_id = $1 AND sequence = 1")
        .bind(&installation)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let broken = amplog(&["verify"], &env);
    assert_eq!(broken.status.code(), Some(1));
    let out = String::from_utf8_lossy(&broken.stdout);
    assert!(out.contains(&format!("BROKEN  installation/{installation} #1: hash mismatch")), "{out}");

    // Bad input: a clear error, not a panic.
    let missing = amplog(&["history", "--installation", "00000000-0000-0000-0000-000000000000"], &env);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("has no events"));
    let no_key = amplog(&["demo"], &[("DATABASE_URL", db.url.as_str())]);
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("AMPLOG_CREDENTIALS_KEY"));
}

#[test]
fn the_embedded_default_starts_its_own_postgres_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    // As root, the server runs as `postgres`, which must be able to traverse the folder.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    let data_dir = data.to_str().unwrap();
    let env = [("AMPLOG_DATA_DIR", data_dir)];
    ok(amplog(&["migrate"], &env));
    assert!(Path::new(data_dir).join("pg/PG_VERSION").exists(), "the cluster lives in the data folder");
    let demo = ok(amplog(&["demo"], &env));
    let installation = installation_of(&demo);
    let key_file = Path::new(data_dir).join("credentials.key");
    assert!(key_file.exists(), "the embedded default generates its credential key once");
    let key_before = std::fs::read_to_string(&key_file).unwrap();
    // The server was stopped on exit, and the next run finds the data again.
    let history = ok(amplog(&["history", "--installation", &installation], &env));
    assert!(history.contains("OperationRequested"));
    ok(amplog(&["demo"], &env));
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), key_before);
    let verified = ok(amplog(&["verify"], &env));
    assert!(verified.starts_with("head") && verified.contains("intact: "), "{verified}");
    // No server is left running.
    assert!(!Path::new(data_dir).join("pg/postmaster.pid").exists(), "the embedded server was stopped");
}

#[test]
fn the_embedded_default_works_as_a_normal_user() {
    // As root, run the binary as the unprivileged `postgres` user: amplog then runs initdb
    // and the server itself, without runuser. As a normal user, that is what already happens.
    let root = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap().trim() == "0";
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let binary = dir.path().join("amplog");
    std::fs::copy(env!("CARGO_BIN_EXE_amplog"), &binary).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    if root {
        assert!(Command::new("chown").arg("postgres:").arg(&data).status().unwrap().success());
    }
    let run = |args: &[&str]| {
        let mut command = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&binary);
            c
        } else {
            Command::new(&binary)
        };
        command
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("AMPLOG_CREDENTIALS_KEY")
            .env("AMPLOG_LOG", "warn")
            .env("AMPLOG_DATA_DIR", &data)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let demo = ok(run(&["demo"]));
    let installation = installation_of(&demo);
    let verified = ok(run(&["verify", "--installation", &installation]));
    assert!(verified.contains("intact: 19 events in 4 streams"), "{verified}");
    assert!(!data.join("pg/postmaster.pid").exists(), "the embedded server was stopped");
}

/// A read requested, started and given one page of 7 records (what `log_truth` counts).
pub(crate) async fn read_one_page_of_seven(
    service: &amplog_commands::CommandService,
    ctx: &amplog_commands::CommandContext,
    installation: amplog_domain::InstallationId,
) {
    let requested =
        service.request_operation(ctx, installation, &amplog_commands::testing::read_of("contacts")).await.unwrap();
    let op = amplog_domain::OperationId(requested.id_of("operation").unwrap());
    let lease = amplog_domain::LeaseId(uuid::Uuid::now_v7());
    service.start_operation(ctx, op, lease, chrono::Duration::minutes(5)).await.unwrap();
    service.record_page(ctx, op, lease, 7, 70, &Default::default()).await.unwrap();
}

/// Usage and operations as the log says, by SQL over the raw events.
pub(crate) async fn log_truth(pool: &sqlx::PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM events WHERE aggregate_type = 'operation' AND event_type = 'Requested'),
                (SELECT coalesce(sum((e.payload->>'records')::bigint), 0)::bigint FROM events e
                 JOIN events r ON r.aggregate_type = 'operation' AND r.aggregate_id = e.aggregate_id AND r.sequence = 1
                 WHERE e.aggregate_type = 'operation' AND e.event_type = 'PageRecorded' AND r.payload->>'op_type' <> 'write')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

pub(crate) async fn projected(pool: &sqlx::PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM operations),
                (SELECT coalesce(sum((doc->>'records_read')::bigint), 0)::bigint FROM usage_daily)",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn projector_processes_killed_with_sigkill_hand_over_and_lose_nothing() {
    use amplog_commands::testing::seed;
    use amplog_projections::{status, READ_MODELS};
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_amplog"))
            .args(["projections", "run", "--batch-size", "3"])
            .env("DATABASE_URL", &db.url)
            .env("AMPLOG_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let leader_pid =
        |leader: Option<String>| leader.and_then(|h| h.rsplit(':').next().and_then(|p| p.parse::<u32>().ok()));
    let mut children = vec![spawn(), spawn()];
    let workload = |n: usize| {
        let service = service.clone();
        let (ctx, installation) = (s.ctx.clone(), s.installation);
        async move {
            for _ in 0..n {
                read_one_page_of_seven(&service, &ctx, installation).await;
            }
        }
    };
    // Three times: let a leader work, SIGKILL it mid-stream, start a replacement.
    for _ in 0..3 {
        let writing = tokio::spawn(workload(30));
        let mut pid = None;
        for _ in 0..200 {
            pid = leader_pid(status(&db.pool, READ_MODELS).await.unwrap().leader);
            if pid.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        let pid = pid.expect("one process leads");
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        let index = children.iter().position(|c| c.id() == pid).expect("the leader is one of ours");
        let mut killed = children.remove(index);
        killed.kill().unwrap(); // SIGKILL
        killed.wait().unwrap();
        children.push(spawn());
        writing.await.unwrap();
    }
    // The survivors catch up; the read models equal the log.
    let mut caught_up = false;
    for _ in 0..400 {
        let st = status(&db.pool, READ_MODELS).await.unwrap();
        if st.leader.is_some() && st.lag_events == 0 {
            caught_up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    for mut child in children {
        child.kill().ok();
        child.wait().ok();
    }
    assert!(caught_up, "a surviving process took over and caught up");
    assert_eq!(projected(&db.pool).await, log_truth(&db.pool).await);
    assert_eq!(log_truth(&db.pool).await, (90, 90 * 7));
}

/// `amplog projects create`, `keys create|list|revoke` and `amplog serve` as an operator
/// runs them: the API answers, readiness follows the in-process projector, SIGTERM stops it
/// cleanly, and neither keys nor credentials reach the logs (at debug level).
#[tokio::test(flavor = "multi_thread")]
async fn serve_with_projects_and_keys_from_the_cli() {
    use std::io::{BufRead, BufReader};
    let db = test_db().await;
    let key = base64::engine::general_purpose::STANDARD.encode(TEST_KEY);
    let env = [("DATABASE_URL", db.url.as_str()), ("AMPLOG_CREDENTIALS_KEY", key.as_str())];
    let project = ok(amplog(&["projects", "create", "Acme"], &env)).trim().to_string();
    let api_key = ok(amplog(&["keys", "create", "--project", &project, "--scope", "admin", "--label", "ci"], &env));
    let api_key = api_key.trim().to_string();
    assert!(api_key.starts_with("amp_"), "{api_key}");
    let listed = ok(amplog(&["keys", "list", "--project", &project], &env));
    assert!(listed.contains("\"scope\":\"admin\"") && listed.contains("\"label\":\"ci\""), "{listed}");
    assert!(!listed.contains(&api_key[36..]), "a listing shows the secret");
    let refused = amplog(&["keys", "create", "--project", &uuid::Uuid::now_v7().to_string()], &env);
    assert!(!refused.status.success(), "a key for a project that does not exist");

    let log = tempfile::NamedTempFile::new().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_amplog"))
        .args(["serve", "--listen", "127.0.0.1:0", "--projectors", "on"])
        .env_remove("DATABASE_URL")
        .envs(env)
        .env("AMPLOG_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let mut first_line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut first_line).unwrap();
    let base = first_line.trim().strip_prefix("amplog serving on ").expect("the bound address").to_string();
    let client = amplog_providers::connector::http_client().build().unwrap();
    assert_eq!(client.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
    let mut ready = serde_json::Value::Null;
    for _ in 0..100 {
        let response = client.get(format!("{base}/readyz")).send().await.unwrap();
        ready = response.json().await.unwrap();
        if ready["ready"] == true {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(ready, serde_json::json!({"ready": true, "database": true, "migrations": true, "projector": true}));

    let secret = "cli-test-secret-token-5521";
    let manifest =
        "specVersion: 1.0.0\nintegrations: [{name: crm, provider: hubspot, read: {objects: [{objectName: contacts}]}}]";
    let gql = |query: &str, variables: serde_json::Value| {
        client
            .post(format!("{base}/graphql"))
            .header("x-api-key", &api_key)
            .json(&serde_json::json!({"query": query, "variables": variables}))
            .send()
    };
    let body: serde_json::Value =
        gql("mutation($m: String!) { declareIntegrations(manifest: $m) { id } }", serde_json::json!({"m": manifest}))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let integration = body["data"]["declareIntegrations"][0]["id"].as_str().expect("declared").to_string();
    let body: serde_json::Value = gql(
        "mutation($i: UUID!, $s: String!) { createConnection(input: {integrationId: $i, groupRef: \"g\", credentials: {access_token: $s}}, waitForVisibility: true) { visible connection { status } } }",
        serde_json::json!({"i": integration, "s": secret}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(body["data"]["createConnection"]["visible"], true, "{body}");
    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("amplog_connections{"), "{metrics}");

    let key_id = &api_key[4..36];
    let key_id = uuid::Uuid::parse_str(key_id).unwrap().to_string();
    ok(amplog(&["keys", "revoke", &key_id], &env));
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(gql("{ viewer { scope } }", serde_json::json!({})).await.unwrap().status(), 401);

    // SIGTERM: a graceful stop, exit status 0.
    Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    let status = server.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let logged = std::fs::read_to_string(log.path()).unwrap();
    assert!(logged.contains("shutting down"), "{logged}");
    assert!(!logged.contains(&api_key[36..]), "the API key's secret is in the log");
    assert!(!logged.contains(secret), "a credential is in the log");
}

#[tokio::test]
async fn serve_demo_syncs_three_customers_from_the_simulator_to_the_sink() {
    use std::io::{BufRead, BufReader};
    let db = test_db().await;
    let key = base64::engine::general_purpose::STANDARD.encode(TEST_KEY);
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_amplog"))
        .args(["serve", "--demo", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", &db.url)
        .env("AMPLOG_CREDENTIALS_KEY", &key)
        .env("AMPLOG_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap();
    // Killed however the test ends: a failed assertion must not leave a server behind.
    let mut server = KillOnDrop(server);
    let (mut base, mut api_key, mut link) = (None, None, None);
    let mut lines = BufReader::new(stdout).lines();
    while base.is_none() || api_key.is_none() || link.is_none() {
        let line = lines.next().expect("the demo prints its address, a key and a connect link").unwrap();
        if let Some(rest) = line.strip_prefix("amplog serving on ") {
            base = Some(rest.to_string());
        }
        if let Some(rest) = line.strip_prefix("demo: a read key for the demo project: ") {
            api_key = Some(rest.to_string());
        }
        if let Some(rest) = line.strip_prefix("demo: connect one more customer in a browser: ") {
            link = Some(rest.to_string());
        }
    }
    let (base, api_key, link) = (base.unwrap(), api_key.unwrap(), link.unwrap());
    let query = "{ installations(first: 5) { nodes { groupRef health readStates { object watermark recordsRead } } } }";
    let started = std::time::Instant::now();
    let client = amplog_providers::connector::http_client().build().unwrap();
    let mut body = serde_json::Value::Null;
    // Contacts have a full backfill (2,000 records each), companies 30 days, deals none.
    let synced = |body: &serde_json::Value| {
        let nodes = body["data"]["installations"]["nodes"].as_array().cloned().unwrap_or_default();
        nodes.len() == 3
            && nodes.iter().all(|n| {
                n["readStates"].as_array().is_some_and(|states| {
                    states.iter().any(|s| s["object"] == "contacts" && s["recordsRead"].as_u64() >= Some(2_000))
                })
            })
    };
    while !synced(&body) {
        assert!(started.elapsed() < std::time::Duration::from_secs(180), "not synced: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        body = client
            .post(format!("{base}/graphql"))
            .header("x-api-key", &api_key)
            .json(&serde_json::json!({"query": query}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    }
    println!("three customers synced after {:.1} s: {body}", started.elapsed().as_secs_f64());
    let nodes = body["data"]["installations"]["nodes"].as_array().unwrap();
    let mut customers: Vec<&str> = nodes.iter().map(|n| n["groupRef"].as_str().unwrap()).collect();
    customers.sort();
    assert_eq!(customers, ["acme", "globex", "initech"]);
    assert!(nodes.iter().all(|n| n["health"] == "healthy"), "{body}");

    // The printed connect link works: the page, the simulator's consent, back connected.
    let steps = amplog_providers::connector::http_client().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    assert_eq!(steps.get(&link).send().await.unwrap().status(), 200);
    let start = steps.post(&link).send().await.unwrap();
    assert_eq!(start.status(), 303);
    let cookie = start.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    let consent = reqwest::Url::parse(start.headers()["location"].to_str().unwrap()).unwrap();
    let mut form: Vec<(String, String)> = consent.query_pairs().into_owned().collect();
    form.push(("decision".into(), "approve".into()));
    let decided = steps.post(consent.as_str().split('?').next().unwrap()).form(&form).send().await.unwrap();
    let callback = decided.headers()["location"].to_str().unwrap().to_string();
    let done = steps.get(&callback).header("cookie", cookie).send().await.unwrap();
    assert_eq!(done.status(), 200);
    assert!(done.text().await.unwrap().contains("is connected"));
    Command::new("kill").args(["-TERM", &server.0.id().to_string()]).status().unwrap();
    let status = server.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let logged = std::fs::read_to_string(log.path()).unwrap();
    assert!(logged.contains("reads requested"), "{logged}");
    assert!(!logged.contains("whsec_") && !logged.contains(&api_key[36..]), "a secret is in the log");
    let token = link.rsplit('/').next().unwrap();
    assert!(!logged.contains(token), "the connect link's token is in the log");
}

/// A child process killed when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Several processes on one embedded data folder: two started together both work; a
/// command coming and going beside `serve` leaves its PostgreSQL running; the last process
/// to exit stops it, even when the one that started it was killed.
#[tokio::test(flavor = "multi_thread")]
async fn amplog_processes_share_the_embedded_postgres_and_the_last_one_stops_it() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    let data_dir = data.to_str().unwrap();
    let env = [("AMPLOG_DATA_DIR", data_dir)];
    let pid_file = data.join("pg/postmaster.pid");
    let spawn = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_amplog"))
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("AMPLOG_CREDENTIALS_KEY")
            .env("AMPLOG_LOG", "warn")
            .env("AMPLOG_DATA_DIR", data_dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(&["migrate"]), spawn(&["migrate"]));
    ok(first.wait_with_output().unwrap());
    ok(second.wait_with_output().unwrap());
    assert!(!pid_file.exists(), "the last of the two stopped the server");

    let mut serve = spawn(&["serve", "--listen", "127.0.0.1:0", "--workers", "off"]);
    let mut first_line = String::new();
    BufReader::new(serve.stdout.take().unwrap()).read_line(&mut first_line).unwrap();
    let base = first_line.trim().strip_prefix("amplog serving on ").expect("the bound address").to_string();
    ok(amplog(&["migrate"], &env));
    assert!(pid_file.exists(), "a command beside serve left the server running");
    let client = amplog_providers::connector::http_client().build().unwrap();
    let ready: serde_json::Value = client.get(format!("{base}/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["database"], true, "{ready}");
    serve.kill().unwrap(); // SIGKILL: it cannot stop what it started
    serve.wait().unwrap();
    assert!(pid_file.exists(), "the killed process left its server behind");
    ok(amplog(&["migrate"], &env));
    assert!(!pid_file.exists(), "the next last user stopped the server it found");
}

/// The operator's commands: an organization, a project in it, an admin key made (printed
/// once) and revoked; each change an event, the key stored as a digest only.
#[tokio::test]
async fn orgs_projects_and_admin_keys_from_the_cli() {
    let db = test_db().await;
    let key = base64::engine::general_purpose::STANDARD.encode(TEST_KEY);
    let env = [("DATABASE_URL", db.url.as_str()), ("AMPLOG_CREDENTIALS_KEY", key.as_str())];
    let org = ok(amplog(&["orgs", "create", "Acme Group"], &env)).trim().to_string();
    let project = ok(amplog(&["projects", "create", "Acme EU", "--org", &org], &env)).trim().to_string();
    let unknown = uuid::Uuid::now_v7().to_string();
    let refused = amplog(&["projects", "create", "Nowhere", "--org", &unknown], &env);
    assert!(!refused.status.success(), "a project in an unknown organization");
    let admin = ok(amplog(&["admin-keys", "create", "--label", "on-call"], &env)).trim().to_string();
    assert!(admin.starts_with("amk_"), "{admin}");
    let id = admin.trim_start_matches("amk_").split('_').next().unwrap().to_string();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM admin_keys t WHERE t::text LIKE '%' || $1 || '%'")
        .bind(&admin[admin.len() - 20..])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "the admin key itself is stored");
    let id = uuid::Uuid::parse_str(&id).unwrap().to_string();
    ok(amplog(&["admin-keys", "revoke", &id], &env));
    assert!(!amplog(&["admin-keys", "revoke", &id], &env).status.success(), "revoked twice");
    let events: Vec<(String, String)> = sqlx::query_as(
        "SELECT aggregate_type, event_type FROM events WHERE aggregate_id IN ($1, $2, $3) ORDER BY position",
    )
    .bind(&org)
    .bind(&project)
    .bind(&id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let kinds: Vec<String> = events.iter().map(|(a, e)| format!("{a}.{e}")).collect();
    assert_eq!(
        kinds,
        [
            "organization.Created",
            "project.Created",
            "project.JoinedOrganization",
            "organization.ProjectAdded",
            "admin_key.Created",
            "admin_key.Revoked"
        ]
    );
}

/// Operator actions from the CLI: a dead letter listed and replayed, a failed read retried;
/// each an event with the CLI as its actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_failed_operations_from_the_cli() {
    use amplog_domain::operation::ErrorClass;
    let db = test_db().await;
    let key = base64::engine::general_purpose::STANDARD.encode(TEST_KEY);
    let env = [("DATABASE_URL", db.url.as_str()), ("AMPLOG_CREDENTIALS_KEY", key.as_str())];
    let service = db.service();
    let seeded = amplog_commands::testing::seed(&service).await;
    let (letter, lease) = amplog_commands::testing::start_read(&service, &seeded, "contacts").await;
    service.fail_operation(&seeded.ctx, letter, lease, ErrorClass::Provider5xx, "5 attempts: 503", true).await.unwrap();
    let (failed, lease) = amplog_commands::testing::start_read(&service, &seeded, "deals").await;
    service.fail_operation(&seeded.ctx, failed, lease, ErrorClass::BadRequest, "400", false).await.unwrap();
    let project = seeded.ctx.project_id.to_string();
    ok(amplog(&["projections", "rebuild"], &env));
    let listed = ok(amplog(&["dead-letters", "list", "--project", &project], &env));
    let letters: Vec<serde_json::Value> = listed.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(letters.len(), 1, "{listed}");
    assert_eq!(letters[0]["operation_id"], letter.to_string());
    // A failed read that is no dead letter cannot be replayed, but can be retried.
    let refused = amplog(&["dead-letters", "replay", "--project", &project, &failed.to_string()], &env);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not_dead_lettered"), "{refused:?}");
    ok(amplog(&["dead-letters", "replay", "--project", &project, &letter.to_string()], &env));
    ok(amplog(&["operations", "retry", "--project", &project, &failed.to_string()], &env));
    // Another project's id is not found.
    let other =
        amplog(&["operations", "retry", "--project", &uuid::Uuid::now_v7().to_string(), &failed.to_string()], &env);
    assert!(!other.status.success());
    let events: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_type, metadata->>'actor' FROM events WHERE event_type IN ('DeadLetterReplayed', 'Retried')
         ORDER BY position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(events, [("DeadLetterReplayed".to_string(), "cli".to_string()), ("Retried".into(), "cli".into())]);
    ok(amplog(&["projections", "rebuild"], &env));
    assert_eq!(ok(amplog(&["dead-letters", "list", "--project", &project], &env)), "");
}

/// `amplog scheduler` as an operator runs it: its ops endpoints on AMPLOG_OPS_LISTEN
/// (`/healthz`, `/readyz`, `/metrics` that promtool accepts, with its leadership), plain
/// text logs without colour codes when standard error is a file, no trace sent while
/// `OTEL_SDK_DISABLED=true` even with an endpoint set, and a clean stop on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_process_serves_its_ops_endpoints_and_plain_logs() {
    let db = test_db().await;
    let (otlp, collector) = amplog_simulator::collector::Collector::start().await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("scheduler.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_amplog"))
        .arg("scheduler")
        .env("DATABASE_URL", &db.url)
        .env("AMPLOG_CREDENTIALS_KEY", base64::engine::general_purpose::STANDARD.encode(TEST_KEY))
        .env("AMPLOG_OPS_LISTEN", format!("127.0.0.1:{port}"))
        .env("AMPLOG_LOG", "info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        .env("OTEL_SDK_DISABLED", "true")
        .env("AMPLOG_METRICS_TOKEN", "ops-token")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let http = amplog_providers::connector::http_client().build().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let text = loop {
        let scrape = http.get(format!("{base}/metrics")).bearer_auth("ops-token").send().await;
        if let Ok(text) = async { scrape?.text().await }.await {
            if text.contains("amplog_leader{role=\"notifier\"} 1")
                && text.contains("amplog_leader{role=\"scheduler\"} 1")
            {
                break text;
            }
        }
        assert!(std::time::Instant::now() < deadline, "the scheduler never reported leading");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for token in [None, Some("wrong")] {
        let mut request = http.get(format!("{base}/metrics"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        assert_eq!(request.send().await.unwrap().status(), 401, "the ops metrics need the token: {token:?}");
    }
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(format!("{base}/readyz")).send().await.unwrap().status(), 200);
    for series in
        ["amplog_ready 1", "amplog_leader_changes_total{role=\"scheduler\"} 1", "amplog_db_pool_max_connections"]
    {
        assert!(text.contains(series), "{series} in\n{text}");
    }
    let promtool = std::env::var("AMPLOG_TEST_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let written = std::fs::read_to_string(&log).unwrap();
    assert!(written.contains("leading") && written.contains("stopping the scheduler"), "{written}");
    assert!(!written.contains('\u{1b}'), "no terminal colour codes in a file: {written:?}");
    assert!(collector.spans().is_empty(), "OTEL_SDK_DISABLED=true sends nothing");
}
