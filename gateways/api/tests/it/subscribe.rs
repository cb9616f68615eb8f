//! Provider webhooks in: the simulator pushes record changes HubSpot-style (batches signed
//! v3, retried until acknowledged, some sent twice, some reversed) to
//! `/v1/providers/simulator/webhooks`; forged, stale and oversized deliveries are refused
//! with nothing stored; 1,000 changes arrive while the API is stopped and started twice;
//! each is recorded once and delivered once per `webhook-id`, with the record, in order per
//! record, to the installation's destination.

use amplog_api::{Keys, Server, ServerConfig};
use amplog_domain::change::ChangeKind;
use amplog_domain::integration::{Manifest, ObjectDecl};
use amplog_simulator::sim::{hubspot_signature, SimConfig};
use amplog_simulator::testing::SyncWorld;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

async fn changes_recorded(world: &SyncWorld) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'change'")
        .fetch_one(&world.db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_changes_are_verified_recorded_once_and_delivered_in_order_per_record() {
    let world = SyncWorld::start(SimConfig { records: 200, ..SimConfig::default() }).await;
    let (service, ctx) = (&world.service, &world.ctx);
    let subscribe = vec![ChangeKind::Created, ChangeKind::Updated, ChangeKind::Deleted];
    let contacts = ObjectDecl { subscribe, ..ObjectDecl::named("contacts") };
    let manifest = Manifest { objects: vec![contacts] };
    let outcome = service.declare_integration_with(ctx, "crm-live", "simulator", Some(&manifest)).await.unwrap();
    let integration = amplog_domain::IntegrationId(outcome.id_of("integration").unwrap());
    let connector = world.connectors.get("simulator").unwrap();
    let (_, installation) =
        amplog_simulator::sim::install_customer(service, ctx, integration, &connector, "initech").await.unwrap();

    let keys = Keys::new(service);
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        connectors: world.connectors.clone(),
        ..ServerConfig::default()
    };
    let mut server = Server::start(config.clone(), service.clone(), keys.clone()).await.unwrap();
    config.listen = server.addr;
    config.public_url = Some(format!("http://{}", server.addr));
    let url = format!("http://{}/v1/providers/simulator/webhooks", server.addr);
    let mut notifier = amplog_providers::notify::Notifier::new(service.clone(), world.connectors.clone(), "notifier");
    notifier.policy.poll = Duration::from_millis(100);
    notifier.policy.backoff = Duration::from_millis(50);
    notifier.policy.max_backoff = Duration::from_millis(300);
    let notifying = tokio::spawn(async move { notifier.run(std::future::pending()).await });

    // Hostile deliveries: refused with a code, nothing stored.
    let http = reqwest::Client::new();
    let now = chrono::Utc::now().timestamp_millis();
    let body = serde_json::to_vec(&json!([{"eventId": 1, "portalId": "initech", "objectId": "1",
        "subscriptionType": "contact.propertyChange", "occurredAt": now}]))
    .unwrap();
    let send = |body: Vec<u8>, signature: Option<String>, timestamp: i64| {
        let mut request = http.post(&url).header("content-type", "application/json").body(body);
        if let Some(signature) = signature {
            request = request
                .header("x-hubspot-signature-v3", signature)
                .header("x-hubspot-request-timestamp", timestamp.to_string());
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let code = |answer: &(u16, Value)| answer.1["errors"][0]["extensions"]["code"].as_str().unwrap_or("").to_string();
    let signed = |body: &[u8], timestamp: i64| hubspot_signature("amplog-demo-secret", "POST", &url, body, timestamp);
    let forged = send(body.clone(), Some(hubspot_signature("not-the-secret", "POST", &url, &body, now)), now).await;
    assert_eq!((forged.0, code(&forged)), (401, "webhook_signature".to_string()), "{forged:?}");
    let stale_at = now - 10 * 60 * 1000;
    let stale = send(body.clone(), Some(signed(&body, stale_at)), stale_at).await;
    assert_eq!((stale.0, code(&stale)), (401, "webhook_stale".to_string()));
    let unsigned = send(body.clone(), None, now).await;
    assert_eq!(unsigned.0, 401);
    let altered = send(b"[]".to_vec(), Some(signed(&body, now)), now).await;
    assert_eq!(altered.0, 401, "a signature over another body");
    // Refused from its Content-Length, before a byte of the body is read: sent over raw TCP,
    // headers first, so the answer is read before the (unread) body could reset the
    // connection under a client still writing it.
    let huge = vec![b' '; 2 * 1024 * 1024];
    let head = format!(
        "POST /v1/providers/simulator/webhooks HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
         x-hubspot-signature-v3: {}\r\nx-hubspot-request-timestamp: {now}\r\ncontent-length: {}\r\n\r\n",
        server.addr,
        signed(&huge, now),
        huge.len()
    );
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 1024];
    let read = tokio::io::AsyncReadExt::read(&mut tcp, &mut answer);
    let n = tokio::time::timeout(Duration::from_secs(10), read).await.expect("answered from the headers").unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Undeclared (chunked) and past the limit: refused once the limit is read; a client still
    // writing may see its write cut off instead of the answer.
    let chunks = || futures::stream::iter((0..32).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024])));
    let streamed = http
        .post(&url)
        .header("content-type", "application/json")
        .header("x-hubspot-signature-v3", signed(&vec![b' '; 2 * 1024 * 1024], now))
        .header("x-hubspot-request-timestamp", now.to_string())
        .body(reqwest::Body::wrap_stream(chunks()))
        .send()
        .await;
    match streamed {
        Ok(response) => {
            assert_eq!(response.status(), 413);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["errors"][0]["extensions"]["code"], "payload_too_large", "{body}");
        }
        Err(error) => assert!(error.is_request() && !error.is_connect(), "{error}"),
    }
    let garbage = b"{\"not\": \"a list\"}".to_vec();
    let refused = send(garbage.clone(), Some(signed(&garbage, now)), now).await;
    assert_eq!((refused.0, code(&refused)), (400, "invalid_webhook".to_string()));
    let many: Vec<Value> = (0..1001)
        .map(|i| {
            json!({"eventId": i, "portalId": "x", "objectId": "1",
        "subscriptionType": "contact.creation", "occurredAt": now})
        })
        .collect();
    let many = serde_json::to_vec(&many).unwrap();
    assert_eq!(send(many.clone(), Some(signed(&many, now)), now).await.0, 400);
    // Authentic but unusable changes (a control character in an id, an unknown portal, a
    // kind not delivered): acknowledged, so the provider stops retrying, and skipped.
    let odd = serde_json::to_vec(&json!([
        {"eventId": "a\u{1}", "portalId": "initech", "objectId": "1", "subscriptionType": "contact.creation", "occurredAt": now},
        {"eventId": 5, "portalId": "nobody", "objectId": "1", "subscriptionType": "contact.creation", "occurredAt": now},
        {"eventId": 6, "portalId": "initech", "objectId": "1", "subscriptionType": "contact.merge", "occurredAt": now},
    ]))
    .unwrap();
    let acknowledged = send(odd.clone(), Some(signed(&odd, now)), now).await;
    assert_eq!(acknowledged, (200, json!({"received": 3, "recorded": 0, "ignored": 3})));
    assert_eq!(changes_recorded(&world).await, 0, "nothing refused is stored");

    // 1,000 changes (10 touches of 100 of the 200 contacts), the API stopped twice meanwhile.
    world.sim_control("/_sim/webhooks", Some(json!({"url": url, "duplicate": 0.3, "reorder": 0.3, "batch": 25}))).await;
    for round in 0..10 {
        world.sim_control("/_sim/touch/contacts/100?customer=initech", None).await;
        if round == 3 || round == 6 {
            server.stop().await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            server = Server::start(config.clone(), service.clone(), keys.clone()).await.unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while changes_recorded(&world).await < 1000 {
        assert!(
            Instant::now() < deadline,
            "{} of 1,000 changes recorded: {:?}",
            changes_recorded(&world).await,
            world.sim_stats().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = world.sim_stats().await;
    println!("simulator: {stats:?}");
    assert!(stats.webhook_duplicates > 0 && stats.webhook_failures > 0, "{stats:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(changes_recorded(&world).await, 1000, "each change once, duplicates and retries included");

    // Delivered: each change once per webhook-id, with its record, in order per record.
    let deadline = Instant::now() + Duration::from_secs(90);
    let deliveries = loop {
        let got: Vec<(String, Value)> = world
            .sink
            .notifications()
            .iter()
            .map(|d| (d.headers["webhook-id"].clone(), serde_json::from_slice::<Value>(&d.body).unwrap()))
            .filter(|(_, b)| b["type"] == "record.changed")
            .collect();
        let distinct: BTreeSet<&String> = got.iter().map(|(id, _)| id).collect();
        if distinct.len() >= 1000 {
            break got;
        }
        assert!(Instant::now() < deadline, "{} of 1,000 changes delivered", distinct.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    notifying.abort();
    let mut first_seen = BTreeSet::new();
    let mut by_record: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, body) in &deliveries {
        if !first_seen.insert(id.clone()) {
            continue;
        }
        let data = &body["data"];
        assert_eq!(data["installation_id"], json!(installation));
        assert_eq!((data["object"].as_str(), data["kind"].as_str()), (Some("contacts"), Some("updated")));
        assert_eq!(data["record"]["id"], data["record_id"], "{body}");
        let record = data["record_id"].as_str().unwrap().to_string();
        by_record.entry(record).or_default().push(data["occurred_at"].as_str().unwrap().to_string());
    }
    assert_eq!(first_seen.len(), 1000);
    assert_eq!(by_record.len(), 200);
    for (record, times) in &by_record {
        let parsed: Vec<chrono::DateTime<chrono::Utc>> = times.iter().map(|t| t.parse().unwrap()).collect();
        assert!(parsed.windows(2).all(|w| w[0] <= w[1]), "record {record} out of order: {times:?}");
        assert_eq!(times.len(), 5, "record {record}");
    }
    server.stop().await.unwrap();
}
