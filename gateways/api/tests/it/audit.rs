//! What auditors get over the API: the timeline, past states by replay, chain verification,
//! the NDJSON export; and builders' live operation updates over WebSocket.

use amplog_api::testing::{error_code, TestApp};
use amplog_commands::testing::{read_of, seed, start_read};
use amplog_domain::operation::{Cursor, PageRecord};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const HISTORY: &str = "query($id: UUID!, $after: String, $first: Int!, $to: DateTime) {
    installationHistory(id: $id, after: $after, first: $first, to: $to) {
        events { eventId aggregateType aggregateId sequence eventType position transactionId hash actor recordedAt }
        endCursor hasNextPage } }";

#[tokio::test(flavor = "multi_thread")]
async fn an_auditor_reads_the_timeline_replays_the_past_verifies_and_exports() {
    let app = TestApp::spawn().await;
    let s = seed(&app.service).await;
    let (_, key) = app.keys.create(s.ctx.project_id, amplog_api::Scope::Read, None).await.unwrap();
    let (op, lease) = start_read(&app.service, &s, "contacts").await;
    let pages: Vec<PageRecord> = (0..1100)
        .map(|i| PageRecord {
            records: 10,
            bytes: 100,
            cursor: Cursor { watermark: None, page_token: Some(format!("p{i}")) },
            reread: 0,
        })
        .collect();
    let recorded = app.service.record_pages(&s.ctx, op, lease, &pages).await.unwrap();
    let before_success = recorded.last_position().unwrap();
    app.service.succeed_operation(&s.ctx, op, lease).await.unwrap();
    app.service.pause_installation(&s.ctx, s.installation).await.unwrap();
    let id = s.installation.0.to_string();

    // The whole timeline, in pages, equals the log's own order.
    let mut events: Vec<Value> = Vec::new();
    let mut after = Value::Null;
    loop {
        let data = app.data(&key, HISTORY, json!({"id": id, "after": after, "first": 400})).await;
        let page = &data["installationHistory"];
        events.extend(page["events"].as_array().unwrap().iter().cloned());
        if page["hasNextPage"] == false {
            break;
        }
        after = page["endCursor"].clone();
    }
    let expected: Vec<String> = sqlx::query_scalar(
        "SELECT event_id::text FROM events WHERE project_id = $1
           AND (aggregate_type, aggregate_id) IN (('installation', $2), ('connection', $3), ('operation', $4))
         ORDER BY transaction_id, position",
    )
    .bind(s.ctx.project_id.0)
    .bind(&id)
    .bind(s.connection.0.to_string())
    .bind(op.0.to_string())
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    let got: Vec<&str> = events.iter().map(|e| e["eventId"].as_str().unwrap()).collect();
    assert_eq!(got, expected);
    assert_eq!(
        events.len(),
        1 + 1 + 2 + 1 + 1100 + 1 + 1,
        "connection, installation, request (2), start, pages, success, pause"
    );
    assert!(events.iter().all(|e| e["hash"].as_str().unwrap().len() == 64 && e["actor"] == "test"));
    let early = app.data(&key, HISTORY, json!({"id": id, "first": 10, "to": "2000-01-01T00:00:00Z"})).await;
    assert_eq!(early["installationHistory"]["events"], json!([]));

    // The past by replay: before the success the read was running and nothing was paused.
    let as_of = "query($id: UUID!, $p: Int) { installationAsOf(id: $id, position: $p) {
        installation connection operations events lastPosition } }";
    let then = app.data(&key, as_of, json!({"id": id, "p": before_success})).await;
    let then = &then["installationAsOf"];
    assert_eq!(then["installation"]["paused"], false);
    assert_eq!(then["operations"][0]["status"], "running");
    assert_eq!(then["operations"][0]["pages"], 1100);
    assert_eq!(then["connection"]["group_ref"], "group-1");
    assert_eq!(then["lastPosition"], before_success);
    let now = app.data(&key, as_of, json!({"id": id, "p": i64::MAX})).await;
    assert_eq!(now["installationAsOf"]["installation"]["paused"], true);
    assert_eq!(now["installationAsOf"]["operations"][0]["status"], "succeeded");
    assert_eq!(now["installationAsOf"]["events"], events.len());
    let (_, body) = app
        .gql(
            &key,
            "query($id: UUID!) { installationAsOf(id: $id, at: \"2000-01-01T00:00:00Z\") { events } }",
            json!({"id": id}),
        )
        .await;
    assert_eq!(error_code(&body), "not_found", "nothing existed then: {body}");

    // The export streams the same events as NDJSON (more than one page of them).
    let response = amplog_providers::connector::http_client()
        .build()
        .unwrap()
        .get(format!("{}/v1/audit/installations/{id}/events", app.base))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let text = response.text().await.unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let exported: Vec<&str> = lines.iter().map(|l| l["event_id"].as_str().unwrap()).collect();
    assert_eq!(exported, expected);
    assert_eq!(lines[0]["hash"], events[0]["hash"]);
    // The line's shape is a contract: these keys, with numbers as JSON numbers.
    let keys: Vec<&str> = lines[0].as_object().unwrap().keys().map(String::as_str).collect();
    let expected_keys = [
        "aggregate_id",
        "aggregate_type",
        "event_id",
        "event_type",
        "event_version",
        "hash",
        "metadata",
        "payload",
        "position",
        "recorded_at",
        "sequence",
        "transaction_id",
    ];
    assert_eq!(keys, expected_keys, "{}", lines[0]);
    assert!(lines[0]["sequence"].is_i64() && lines[0]["position"].is_i64() && lines[0]["transaction_id"].is_string());
    let response = amplog_providers::connector::http_client()
        .build()
        .unwrap()
        .get(format!("{}/v1/audit/installations/{id}/events?from=not-a-time", app.base))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    // Verification: intact, then broken by an owner-level edit.
    let verify = "query($id: UUID!) { verifyInstallation(id: $id) { intact streams events heads { aggregateType sequence hash } breaks } }";
    let report = app.data(&key, verify, json!({"id": id})).await;
    assert_eq!(report["verifyInstallation"]["intact"], true);
    assert_eq!(report["verifyInstallation"]["streams"], 3);
    assert_eq!(report["verifyInstallation"]["events"], events.len());
    let mut tx = amplog_log::tx::begin(&app.db.pool).await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut *tx).await.unwrap();
    sqlx::query("UPDATE events SET payload = '{\"forged\": true}' WHERE aggregate_type = 'operation' AND sequence = 3")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let report = app.data(&key, verify, json!({"id": id})).await;
    assert_eq!(report["verifyInstallation"]["intact"], false);
    assert_eq!(report["verifyInstallation"]["breaks"][0]["kind"], "hash_mismatch");
    assert_eq!(report["verifyInstallation"]["breaks"][0]["sequence"], 3);
    app.stop().await;
}

async fn next_message(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("the socket is open")
            .expect("a frame");
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["type"] != "ping" && value["type"] != "pong" {
                return value;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn operation_updates_arrive_over_websocket_for_the_keys_project_only() {
    let app = TestApp::spawn().await;
    let s = seed(&app.service).await;
    let other = seed(&app.service).await;
    let (_, key) = app.keys.create(s.ctx.project_id, amplog_api::Scope::Read, None).await.unwrap();
    app.projected().await;

    let mut request =
        format!("ws://{}/graphql/ws", app.base.trim_start_matches("http://")).into_client_request().unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::text(json!({"type": "connection_init", "payload": {"apiKey": key}}).to_string())).await.unwrap();
    assert_eq!(next_message(&mut ws).await["type"], "connection_ack");
    let subscribe = |id: &str, installation: String| {
        Message::text(
            json!({"type": "subscribe", "id": id, "payload": {
                "query": "subscription($id: UUID!) { operationUpdates(installationId: $id) { id object status version } }",
                "variables": {"id": installation}}})
            .to_string(),
        )
    };
    // Another project's installation: not found, as for any unknown id.
    ws.send(subscribe("foreign", other.installation.0.to_string())).await.unwrap();
    let refused = next_message(&mut ws).await;
    assert_eq!((&refused["type"], &refused["id"]), (&json!("next"), &json!("foreign")), "{refused}");
    assert_eq!(refused["payload"]["errors"][0]["extensions"]["code"], "not_found");
    assert_eq!(refused["payload"]["data"], Value::Null);
    assert_eq!(next_message(&mut ws).await, json!({"id": "foreign", "type": "complete"}));

    ws.send(subscribe("mine", s.installation.0.to_string())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // the subscription takes its snapshot
    let requested = app.service.request_operation(&s.ctx, s.installation, &read_of("deals")).await.unwrap();
    let op = requested.id_of("operation").unwrap().to_string();
    let update = next_message(&mut ws).await;
    assert_eq!(update["type"], "next", "{update}");
    assert_eq!(update["id"], "mine");
    assert_eq!(
        update["payload"]["data"]["operationUpdates"],
        json!({"id": op, "object": "deals", "status": "pending", "version": 1})
    );
    let lease = amplog_domain::LeaseId(uuid::Uuid::now_v7());
    app.service
        .start_operation(
            &s.ctx,
            amplog_domain::OperationId(requested.id_of("operation").unwrap()),
            lease,
            chrono::Duration::minutes(5),
        )
        .await
        .unwrap();
    let update = next_message(&mut ws).await;
    assert_eq!(update["payload"]["data"]["operationUpdates"]["status"], "running", "{update}");
    assert_eq!(update["payload"]["data"]["operationUpdates"]["version"], 2);
    // The other project's activity never shows up here.
    start_read(&app.service, &other, "contacts").await;
    app.projected().await;
    let quiet = tokio::time::timeout(Duration::from_millis(1500), ws.next()).await;
    assert!(quiet.is_err() || matches!(quiet, Ok(Some(Ok(Message::Ping(_) | Message::Pong(_))))), "{quiet:?}");
    ws.send(Message::text(json!({"type": "complete", "id": "mine"}).to_string())).await.unwrap();
    // A socket without a valid key is refused at connection_init.
    let mut request =
        format!("ws://{}/graphql/ws", app.base.trim_start_matches("http://")).into_client_request().unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse().unwrap());
    let (mut bad, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    bad.send(Message::text(json!({"type": "connection_init", "payload": {"apiKey": "amp_nope"}}).to_string()))
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), bad.next()).await.unwrap();
    assert!(matches!(closed, Some(Ok(Message::Close(_)) | Err(_)) | None), "{closed:?}");
    app.stop().await;
}

/// Many subscribers of one installation (one feed re-reads for all of them): each gets
/// every change once, and one that leaves does not stop the others.
#[tokio::test(flavor = "multi_thread")]
async fn many_subscribers_of_one_installation_each_get_every_change() {
    let app = TestApp::spawn().await;
    let s = seed(&app.service).await;
    let (_, key) = app.keys.create(s.ctx.project_id, amplog_api::Scope::Read, None).await.unwrap();
    app.projected().await;
    let mut sockets = Vec::new();
    for _ in 0..2 {
        let mut request =
            format!("ws://{}/graphql/ws", app.base.trim_start_matches("http://")).into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        ws.send(Message::text(json!({"type": "connection_init", "payload": {"apiKey": key}}).to_string()))
            .await
            .unwrap();
        assert_eq!(next_message(&mut ws).await["type"], "connection_ack");
        for i in 0..8 {
            let subscribe = json!({"type": "subscribe", "id": format!("s{i}"), "payload": {
                "query": "subscription($id: UUID!) { operationUpdates(installationId: $id) { id status } }",
                "variables": {"id": s.installation.0}}});
            ws.send(Message::text(subscribe.to_string())).await.unwrap();
        }
        sockets.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // the subscriptions take their snapshot
    let (op, _) = start_read(&app.service, &s, "deals").await;
    for ws in &mut sockets {
        let mut got = std::collections::BTreeMap::new();
        while got.len() < 8 {
            let update = next_message(ws).await;
            assert_eq!(update["type"], "next", "{update}");
            assert_eq!(update["payload"]["data"]["operationUpdates"]["id"], op.0.to_string());
            got.insert(
                update["id"].as_str().unwrap().to_string(),
                update["payload"]["data"]["operationUpdates"]["status"].clone(),
            );
        }
        assert!(got.values().all(|status| status == "running" || status == "pending"), "{got:?}");
    }
    drop(sockets.pop());
    app.service.cancel_operation(&s.ctx, op, "enough").await.unwrap();
    let ws = &mut sockets[0];
    let mut cancelled = 0;
    while cancelled < 8 {
        let update = next_message(ws).await;
        if update["payload"]["data"]["operationUpdates"]["status"] == "cancelled" {
            cancelled += 1;
        }
    }
    app.stop().await;
}
