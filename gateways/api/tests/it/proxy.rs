//! The proxy: `/v1/proxy/{installationId}/{path}` against the provider simulator, over real
//! HTTP on loopback. Methods, bodies and headers pass through (amplog's credentials and
//! hop-by-hop headers do not); hostile paths, other tenants and other groups answer 4xx and
//! record nothing; a refused token is refreshed once; a 429 is passed on or waited out;
//! 50 MB stream both ways with the server's memory bounded; every call is one `Proxied`
//! event, committed before the response ends (so a test reads a body before it looks),
//! counted in usage.

use amplog_api::{Keys, Scope, Server, ServerConfig};
use amplog_simulator::sim::SimConfig;
use amplog_simulator::testing::SyncWorld;
use futures::StreamExt;
use serde_json::{json, Value};
use sha2::Digest;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

struct ProxyWorld {
    world: SyncWorld,
    server: Server,
    keys: Keys,
    write: String,
    http: reqwest::Client,
}

impl ProxyWorld {
    async fn start(body_limit: u64) -> ProxyWorld {
        let world = SyncWorld::start(SimConfig { records: 40, ..SimConfig::default() }).await;
        let keys = Keys::new(&world.service);
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            connectors: world.connectors.clone(),
            proxy_body_limit: body_limit,
            ..ServerConfig::default()
        };
        let server = Server::start(config, world.service.clone(), keys.clone()).await.unwrap();
        let (_, write) = keys.create(world.ctx.project_id, Scope::Write, None).await.unwrap();
        let http = amplog_providers::connector::streaming_http_client().build().unwrap();
        ProxyWorld { world, server, keys, write, http }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/v1/proxy/{}/{path}", self.server.addr, self.world.installation)
    }

    fn call(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).header("x-api-key", &self.write)
    }

    /// The `Proxied` event of an operation (the stream's only event).
    async fn proxied(&self, operation: &str) -> Value {
        let events = self.world.events_of("operation", operation.parse().unwrap()).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].0, "Proxied");
        events[0].1.clone()
    }

    async fn proxied_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'Proxied'")
            .fetch_one(&self.world.db.pool)
            .await
            .unwrap()
    }
}

fn operation_id(response: &reqwest::Response) -> String {
    response.headers()["x-amplog-operation-id"].to_str().unwrap().to_string()
}

/// A request sent byte for byte (no client normalises its path): the status and the body.
async fn raw(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_bodies_and_headers_pass_through_and_every_call_is_in_the_log_and_usage() {
    let p = ProxyWorld::start(64 * 1024 * 1024).await;
    // GET one record, with the provider's answer as it is.
    let response = p.call(reqwest::Method::GET, "crm/v3/objects/contacts/1").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let get = operation_id(&response);
    let record: Value = response.json().await.unwrap();
    assert_eq!(record["id"], "1");
    // A query passes through.
    let response = p.call(reqwest::Method::GET, "crm/v3/objects/contacts?limit=2").send().await.unwrap();
    let page: Value = response.json().await.unwrap();
    assert_eq!(page["results"].as_array().map(Vec::len), Some(2), "{page}");
    // PATCH, then GET sees it; DELETE answers 204.
    let response = p
        .call(reqwest::Method::PATCH, "crm/v3/objects/contacts/1")
        .json(&json!({"properties": {"firstname": "Zed"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let patch = operation_id(&response);
    response.bytes().await.unwrap();
    let again: Value =
        p.call(reqwest::Method::GET, "crm/v3/objects/contacts/1").send().await.unwrap().json().await.unwrap();
    assert_eq!(again["properties"]["firstname"], "Zed");
    let response = p.call(reqwest::Method::DELETE, "crm/v3/objects/contacts/2").send().await.unwrap();
    assert_eq!(response.status(), 204);
    let delete = operation_id(&response);
    // POST and PUT to the echo: headers and bodies as the provider sees them.
    for method in [reqwest::Method::POST, reqwest::Method::PUT] {
        let body = vec![7u8; 3000];
        let response = p
            .call(method.clone(), "_sim/echo/a/b?x=1&y=%20z")
            .header("x-custom", "kept")
            .header("cookie", "session=builder")
            .header("x-amplog-project", "nope")
            .header("connection", "x-hop")
            .header("x-hop", "gone")
            .header("content-type", "application/octet-stream")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let echo: Value = response.json().await.unwrap();
        assert_eq!(echo["method"], method.as_str());
        assert_eq!((echo["path"].as_str(), echo["query"].as_str()), (Some("/_sim/echo/a/b"), Some("x=1&y=%20z")));
        assert_eq!(echo["bytes"], 3000);
        assert_eq!(echo["sha256"], hex::encode(sha2::Sha256::digest(&body)));
        let headers = &echo["headers"];
        assert_eq!(headers["x-custom"], "kept");
        assert_eq!(headers["content-type"], "application/octet-stream");
        for gone in ["cookie", "x-api-key", "x-amplog-project", "x-hop"] {
            assert!(headers.get(gone).is_none(), "{gone} was forwarded: {headers}");
        }
        let authorization = headers["authorization"].as_str().unwrap();
        assert!(authorization.starts_with("Bearer ") && !authorization.contains(&p.write), "{authorization}");
    }
    // A provider's error passes through with its body, and is a failed call.
    let response = p.call(reqwest::Method::GET, "crm/v3/objects/contacts/999999").send().await.unwrap();
    assert_eq!(response.status(), 404);
    let missing = operation_id(&response);
    assert!(response.text().await.unwrap().contains("OBJECT_NOT_FOUND"));

    // In the log: one event per call, with no body, token or query.
    let event = p.proxied(&get).await;
    let call = &event["call"];
    assert_eq!((call["method"].as_str(), call["path"].as_str()), (Some("GET"), Some("/crm/v3/objects/contacts/1")));
    assert_eq!(call["status"], 200);
    assert!(call["response_bytes"].as_u64().unwrap() > 50 && call["error_class"].is_null(), "{event}");
    assert_eq!(event["installation_id"], json!(p.world.installation));
    let patched = serde_json::to_vec(&json!({"properties": {"firstname": "Zed"}})).unwrap().len() as u64;
    assert_eq!(p.proxied(&patch).await["call"]["request_bytes"].as_u64(), Some(patched));
    assert_eq!(p.proxied(&delete).await["call"]["status"], 204);
    let failed = p.proxied(&missing).await;
    assert_eq!(
        (failed["call"]["status"].as_u64(), failed["call"]["error_class"].as_str()),
        (Some(404), Some("bad_request"))
    );
    let text = serde_json::to_string(&failed).unwrap();
    assert!(!text.contains("Bearer") && !text.contains("OBJECT_NOT_FOUND") && !text.contains("limit=2"), "{text}");
    let calls = p.proxied_count().await;
    assert_eq!(calls, 8);

    // Usage and the operations read model count them.
    p.world.project().await;
    let (_, read) = p.keys.create(p.world.ctx.project_id, Scope::Read, None).await.unwrap();
    let query = "query($op: UUID!) { operation(id: $op) { opType status httpStatus object bytes }
                 usage { proxyCalls proxyBytes } }";
    let body: Value = p
        .http
        .post(format!("http://{}/graphql", p.server.addr))
        .header("x-api-key", &read)
        .json(&json!({"query": query, "variables": {"op": missing}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let operation = &body["data"]["operation"];
    assert_eq!(operation["opType"], "proxy", "{body}");
    assert_eq!((operation["status"].as_str(), operation["httpStatus"].as_i64()), (Some("failed"), Some(404)));
    assert_eq!(operation["object"], "GET /crm/v3/objects/contacts/999999");
    let usage = &body["data"]["usage"][0];
    assert_eq!(usage["proxyCalls"], 8, "{body}");
    assert!(usage["proxyBytes"].as_i64().unwrap() > 6000, "{body}");
    // A read key may not proxy; no key is unauthenticated.
    let response = p.http.get(p.url("crm/v3/objects/contacts/1")).header("x-api-key", &read).send().await.unwrap();
    assert_eq!(response.status(), 403);
    let response = p.http.get(p.url("crm/v3/objects/contacts/1")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(p.proxied_count().await, calls, "refused calls record nothing");
    p.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_other_tenants_and_other_groups_are_refused_and_record_nothing() {
    let p = ProxyWorld::start(1024 * 1024).await;
    let addr = p.server.addr;
    let inst = p.world.installation;
    let key = &p.write;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Api-Key: {key}\r\nConnection: close\r\n\r\n");
    for path in [
        format!("/v1/proxy/{inst}/crm/../../oauth/token"),
        format!("/v1/proxy/{inst}/../_sim/stats"),
        format!("/v1/proxy/{inst}/crm/%2e%2e/_sim/stats"),
        format!("/v1/proxy/{inst}/crm/%2E%2e/x"),
        format!("/v1/proxy/{inst}/crm%2f..%2f_sim"),
        format!("/v1/proxy/{inst}//evil.example/x"),
        format!("/v1/proxy/{inst}/http://evil.example/x"),
        format!("/v1/proxy/{inst}/http:%2f%2fevil.example"),
        format!("/v1/proxy/{inst}/crm\\..\\x"),
        format!("/v1/proxy/{inst}/crm/%zz"),
        format!("/v1/proxy/{inst}/crm/%00"),
        format!("/v1/proxy/{inst}/./crm"),
        format!("/v1/proxy/{inst}/"),
        format!("/v1/proxy/{inst}"),
        format!("/v1/proxy/{inst}/{}", "a/".repeat(1100)),
        format!("/v1/proxy/{inst}/{}", "a".repeat(2048)),
        format!("/v1/proxy/{inst}/crm/..;/_sim/stats"),
        format!("/v1/proxy/{inst}/crm/%3b/x"),
        format!("/v1/proxy/{inst}/crm/%+f/x"),
        format!("/v1/proxy/{inst}/crm?{}", "q".repeat(9000)),
    ] {
        let (status, body) = raw(addr, &get(&path)).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("invalid_path"), "{path}: {body}");
    }
    // Methods a proxy does not forward.
    let (status, body) = raw(
        addr,
        &format!(
            "TRACE /v1/proxy/{inst}/_sim/echo/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: {key}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 405, "{body}");
    // A wait budget out of range.
    let response =
        p.call(reqwest::Method::GET, "_sim/echo/x").header("x-amplog-rate-limit-wait", "99").send().await.unwrap();
    assert_eq!(response.status(), 400);
    // Bodies over the limit: declared, or streamed without a length. The server answers 413
    // without reading the rest, so a client still sending may see its write cut off instead.
    let too_large = |sent: reqwest::Result<reqwest::Response>| match sent {
        Ok(response) => assert_eq!(response.status(), 413),
        Err(error) => assert!(error.is_request() && !error.is_connect(), "{error}"),
    };
    too_large(p.call(reqwest::Method::POST, "_sim/echo/x").body(vec![0u8; 2 * 1024 * 1024]).send().await);
    let chunks = futures::stream::iter((0..64).map(|_| Ok::<_, std::io::Error>(vec![1u8; 64 * 1024])));
    too_large(p.call(reqwest::Method::POST, "_sim/echo/x").body(reqwest::Body::wrap_stream(chunks)).send().await);
    let streamed_too_large = p.proxied_count().await;
    assert!(streamed_too_large <= 1, "only the streamed call reached the provider");

    // Another tenant's key, an unknown installation: not found alike.
    let other = amplog_commands::CommandContext::new(amplog_domain::ProjectId(Uuid::now_v7()), "test");
    p.world.service.create_project(&other, "other").await.unwrap();
    let (_, stranger) = p.keys.create(other.project_id, Scope::Admin, None).await.unwrap();
    let response = p.http.get(p.url("crm/v3/objects/contacts/1")).header("x-api-key", &stranger).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let unknown = format!("http://{addr}/v1/proxy/{}/crm/v3/objects/contacts/1", Uuid::now_v7());
    let response = p.http.get(&unknown).header("x-api-key", key).send().await.unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errors"][0]["extensions"]["code"], "not_found");

    // End users: their own group's installation, not another's.
    let (private, public) = crate::jwt::key_pair(&["-algorithm", "ed25519"]);
    let kid = p.keys.create_jwt_key(&p.world.ctx, "EdDSA", &public).await.unwrap();
    let signer = jsonwebtoken::EncodingKey::from_ed_pem(private.as_bytes()).unwrap();
    let token = |group: &str| {
        let header = jsonwebtoken::Header {
            kid: Some(kid.to_string()),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA)
        };
        let claims = json!({"group_ref": group, "exp": chrono::Utc::now().timestamp() + 300});
        jsonwebtoken::encode(&header, &claims, &signer).unwrap()
    };
    let before = p.proxied_count().await;
    let response = p.http.get(p.url("crm/v3/objects/contacts/1")).bearer_auth(token("globex")).send().await.unwrap();
    assert_eq!(response.status(), 404, "another group's installation");
    assert_eq!(p.proxied_count().await, before, "refused calls record nothing");
    let response =
        p.http.get(p.url("crm/v3/objects/contacts/1")).bearer_auth(token(&p.world.customer)).send().await.unwrap();
    assert_eq!(response.status(), 200, "the end user's own installation");
    let own = operation_id(&response);
    response.bytes().await.unwrap();
    let event = p.proxied(&own).await;
    assert_eq!(event["call"]["status"], 200);
    // A revoked connection proxies nothing, whatever token is cached.
    p.world.service.revoke_connection(&p.world.ctx, p.world.connection).await.unwrap();
    let before = p.proxied_count().await;
    let response = p.call(reqwest::Method::GET, "crm/v3/objects/contacts/1").send().await.unwrap();
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errors"][0]["extensions"]["code"], "connection.needs_reauth", "{body}");
    assert_eq!(p.proxied_count().await, before);
    p.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_refreshed_once_and_a_429_is_passed_on_or_waited_out() {
    let p = ProxyWorld::start(1024 * 1024).await;
    // Warm: the token is cached; then the provider expires it.
    assert_eq!(p.call(reqwest::Method::GET, "crm/v3/objects/contacts/1").send().await.unwrap().status(), 200);
    let refreshes = p.world.sim_stats().await.token_refreshes;
    p.world.sim_control("/_sim/expire-tokens", None).await;
    let response = p.call(reqwest::Method::GET, "crm/v3/objects/contacts/1").send().await.unwrap();
    assert_eq!(response.status(), 200, "refreshed and sent again");
    let refreshed = operation_id(&response);
    response.bytes().await.unwrap();
    let event = p.proxied(&refreshed).await;
    assert_eq!((event["call"]["status"].as_u64(), event["call"]["refreshed"].as_bool()), (Some(200), Some(true)));
    assert_eq!(p.world.sim_stats().await.token_refreshes, refreshes + 1);

    // Rate limited: the provider's 429 and Retry-After come back.
    p.world.sim_control("/_sim/faults", Some(json!({"rate_limited": 1.0, "retry_after_secs": 1}))).await;
    let response = p.call(reqwest::Method::GET, "crm/v3/objects/contacts/1").send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    let limited = operation_id(&response);
    response.bytes().await.unwrap();
    let event = p.proxied(&limited).await;
    assert_eq!(event["call"]["error_class"], "rate_limited");
    // Asked to wait: the limit lifts during the wait and the call succeeds.
    let lift = {
        let url = p.world.sim.url();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            reqwest::Client::new().put(format!("{url}/_sim/faults")).json(&json!({})).send().await.unwrap();
        })
    };
    let started = Instant::now();
    let response = p
        .call(reqwest::Method::GET, "crm/v3/objects/contacts/1")
        .header("x-amplog-rate-limit-wait", "5")
        .send()
        .await
        .unwrap();
    lift.await.unwrap();
    assert_eq!(response.status(), 200);
    println!("waited out a 429 in {:?}", started.elapsed());
    p.server.stop().await.unwrap();
}

/// The resident set's high-water mark of this process (server and client both), in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_stream_both_ways_in_bounded_memory_and_a_caller_hanging_up_is_recorded() {
    const SIZE: u64 = 50 * 1024 * 1024;
    const CHUNK: usize = 256 * 1024;
    let p = ProxyWorld::start(64 * 1024 * 1024).await;
    assert_eq!(p.call(reqwest::Method::GET, "crm/v3/objects/contacts/1").send().await.unwrap().status(), 200);
    let before = peak_rss_kib();
    // Upload, streamed without a length.
    let chunks = futures::stream::iter(
        (0..SIZE as usize / CHUNK).map(|i| Ok::<_, std::io::Error>(vec![(i % 251) as u8; CHUNK])),
    );
    let mut digest = sha2::Sha256::new();
    for i in 0..SIZE as usize / CHUNK {
        digest.update(vec![(i % 251) as u8; CHUNK]);
    }
    let response = p
        .call(reqwest::Method::POST, "_sim/echo/upload")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let upload = operation_id(&response);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(
        (echo["bytes"].as_u64(), echo["sha256"].as_str()),
        (Some(SIZE), Some(hex::encode(digest.finalize()).as_str()))
    );
    // Download, checked as it arrives.
    let response = p.call(reqwest::Method::GET, &format!("_sim/echo/download?size={SIZE}")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-length"], SIZE.to_string().as_str());
    let download = operation_id(&response);
    let (mut at, mut body) = (0u64, response.bytes_stream());
    while let Some(chunk) = body.next().await {
        for byte in chunk.unwrap() {
            assert_eq!(byte, (at % 251) as u8, "byte {at}");
            at += 1;
        }
    }
    assert_eq!(at, SIZE);
    let grown = peak_rss_kib().saturating_sub(before);
    println!("peak RSS grew by {grown} KiB over 2 × 50 MiB");
    assert!(grown < 40 * 1024, "the peak resident set grew by {grown} KiB: a body was held whole");
    assert_eq!(p.proxied(&upload).await["call"]["request_bytes"].as_u64(), Some(SIZE));
    assert_eq!(p.proxied(&download).await["call"]["response_bytes"].as_u64(), Some(SIZE));

    // A caller that hangs up mid-download: the call is recorded, aborted, with what was sent.
    let response = p.call(reqwest::Method::GET, &format!("_sim/echo/download?size={SIZE}")).send().await.unwrap();
    let hung_up = operation_id(&response);
    let mut body = response.bytes_stream();
    let mut got = 0;
    while got < 1024 * 1024 {
        got += body.next().await.unwrap().unwrap().len();
    }
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(20);
    let event = loop {
        let events = p.world.events_of("operation", hung_up.parse().unwrap()).await;
        if let Some((_, event)) = events.first() {
            break event.clone();
        }
        assert!(Instant::now() < deadline, "the hung-up call was never recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(event["call"]["aborted"], true, "{event}");
    let sent = event["call"]["response_bytes"].as_u64().unwrap();
    assert!((1024 * 1024..SIZE).contains(&sent), "{event}");
    p.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_commits() {
    let p = ProxyWorld::start(1024 * 1024).await;
    let calls = 32 * 4;
    let results = futures::stream::iter(0..calls)
        .map(|i| {
            let request = p.call(reqwest::Method::GET, &format!("crm/v3/objects/contacts/{}", i % 30 + 1));
            async move {
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                response.bytes().await.unwrap();
                status
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    assert!(results.iter().all(|s| *s == 200), "{results:?}");
    let (events, commits): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT transaction_id::text) FROM events WHERE event_type = 'Proxied'",
    )
    .fetch_one(&p.world.db.pool)
    .await
    .unwrap();
    println!("{events} proxy calls recorded in {commits} commits");
    assert_eq!(events, calls as i64);
    assert!(commits < events, "no two calls shared a commit");
    p.server.stop().await.unwrap();
}
