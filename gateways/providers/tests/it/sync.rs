//! Sync workers end to end: real HTTP to the provider simulator, real webhook deliveries to
//! a verifying sink, real PostgreSQL, the in-process job dispatch.

use amplog_domain::connection::{Connection, ConnectionStatus};
use amplog_domain::operation::{ErrorClass, OperationStatus};
use amplog_simulator::sim::{Faults, SimConfig};
use amplog_simulator::testing::SyncWorld;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

fn config(records: usize) -> SimConfig {
    SimConfig { records, ..SimConfig::default() }
}

fn types(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(t, _)| t.as_str()).collect()
}

fn count(events: &[(String, Value)], kind: &str) -> usize {
    events.iter().filter(|(t, _)| t == kind).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_records_arrive_through_rate_limits_token_expiry_and_5xx() {
    let faults = Faults { rate_limited: 0.10, retry_after_secs: 1, server_error: 0.05, ..Faults::default() };
    let world = SyncWorld::start(SimConfig { faults, ..config(10_000) }).await;
    let op = world.request_read("contacts").await;
    let dispatch = world.spawn_dispatch("worker-1", Duration::from_secs(60));
    // Expire every access token once a third of the pages are delivered.
    while world.sink.report().deliveries < 33 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    world.sim_control("/_sim/expire-tokens", None).await;
    let state = world.finished(op, Duration::from_secs(240)).await;
    dispatch.abort();
    assert_eq!(state.status, OperationStatus::Succeeded);

    // Every record reached the sink, signed; duplicates are counted, not hidden.
    let report = world.sink.report();
    println!("sink: {report:?}");
    assert_eq!(report.distinct_records, 10_000);
    assert_eq!(report.rejected_signatures, 0);
    assert_eq!(report.deliveries, 100, "one delivery per page of 100");
    assert_eq!(report.duplicate_deliveries, 0);
    let stats = world.sim_stats().await;
    println!("simulator: {stats:?}");
    assert!(stats.by_status.get(&429).copied().unwrap_or(0) >= 5, "429s were injected: {stats:?}");
    assert!(stats.by_status.get(&503).copied().unwrap_or(0) >= 1, "5xx were injected: {stats:?}");
    assert!(stats.by_status.get(&401).copied().unwrap_or(0) >= 1, "the expired token was refused: {stats:?}");
    assert_eq!(stats.token_refreshes, 1, "one refresh after the expiry");

    // The operation's events: started once, 100 delivered pages, succeeded with the counts.
    let events = world.events_of("operation", op.0).await;
    assert_eq!(count(&events, "Started"), 1);
    assert_eq!(count(&events, "PageRecorded"), 100);
    assert_eq!(count(&events, "DeliveryAttempted"), 100);
    let (last, payload) = events.last().expect("events");
    assert_eq!(last, "Succeeded");
    assert_eq!(payload["records"], 10_000);
    assert_eq!(payload["pages"], 100);
    let pages: Vec<u64> = events
        .iter()
        .filter(|(t, _)| t == "DeliveryAttempted")
        .map(|(_, p)| p["delivery"]["page"].as_u64().unwrap())
        .collect();
    assert_eq!(pages, (1..=100).collect::<Vec<_>>());
    // The refreshed token set went to the encrypted store, recorded on the connection.
    let connection = world.events_of("connection", world.connection.0).await;
    assert_eq!(types(&connection), ["Created", "TokenRefreshed"]);
    assert!(!connection[1].1.to_string().contains("access_token"), "no secret in the log");

    // The read state ends at the newest record delivered; usage counts what was delivered.
    world.project().await;
    let newest = world.sink.received().iter().filter_map(|r| r.max_updated).max().expect("records");
    let (watermark, mode, records_read): (Option<String>, String, i64) = sqlx::query_as(
        "SELECT doc->>'watermark', doc->>'mode', (doc->>'records_read')::bigint FROM read_states WHERE key = $1",
    )
    .bind(format!("{}/contacts", world.installation))
    .fetch_one(&world.db.pool)
    .await
    .expect("the read state");
    let watermark = chrono::DateTime::parse_from_rfc3339(&watermark.expect("a watermark")).expect("a time");
    assert_eq!(watermark, newest);
    assert_eq!((mode.as_str(), records_read), ("incremental", 10_000));
    let usage: i64 = sqlx::query_scalar(
        "SELECT sum((doc->>'records_read')::bigint)::bigint FROM usage_daily WHERE installation_id = $1",
    )
    .bind(world.installation.to_string())
    .fetch_one(&world.db.pool)
    .await
    .expect("usage");
    assert_eq!(usage as usize, report.records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_read_delivers_only_what_changed_since_the_watermark() {
    let world = SyncWorld::start(config(500)).await;
    let dispatch = world.spawn_dispatch("worker-1", Duration::from_secs(60));
    let first = world.request_read("companies").await;
    assert_eq!(world.finished(first, Duration::from_secs(60)).await.status, OperationStatus::Succeeded);
    assert_eq!(world.sink.report().distinct_records, 500);
    world.project().await;
    // 7 records change at the provider; the next read brings them (and whatever else lies
    // in the overlap window), not the whole object again.
    let touched = world.sim_control("/_sim/touch/companies/7", None).await;
    let touched: Vec<String> = serde_json::from_value(touched["touched"].clone()).unwrap();
    assert_eq!(touched.len(), 7);
    let before = world.sink.report().records;
    let second = world.request_read("companies").await;
    assert_eq!(world.finished(second, Duration::from_secs(60)).await.status, OperationStatus::Succeeded);
    dispatch.abort();
    let second_ids: Vec<String> = world
        .sink
        .received()
        .iter()
        .filter(|r| r.operation_id == second.to_string())
        .flat_map(|r| r.record_ids.clone())
        .collect();
    assert_eq!(world.sink.report().records - before, second_ids.len());
    assert!(second_ids.len() >= 7 && second_ids.len() < 50, "{} records re-read", second_ids.len());
    let read: HashSet<&String> = second_ids.iter().collect();
    assert!(touched.iter().all(|id| read.contains(id)), "{touched:?} not all in {second_ids:?}");
    // What the overlap window read again is not counted again: usage and the read state
    // count 507 records, and a record re-delivered unchanged carries the idempotency key
    // it had the first time (a changed one, a new key).
    world.project().await;
    let usage: i64 = sqlx::query_scalar("SELECT sum((doc->>'records_read')::bigint)::bigint FROM usage_daily")
        .fetch_one(&world.db.pool)
        .await
        .unwrap();
    let state: i64 =
        sqlx::query_scalar("SELECT (doc->>'records_read')::bigint FROM read_states WHERE key LIKE '%/companies'")
            .fetch_one(&world.db.pool)
            .await
            .unwrap();
    assert_eq!((usage, state), (507, 507));
    let keys = |op: amplog_domain::OperationId| -> BTreeMap<String, String> {
        let pages = world.sink.received();
        let pages = pages.iter().filter(|r| r.operation_id == op.to_string());
        pages.flat_map(|r| r.record_ids.clone().into_iter().zip(r.record_keys.clone())).collect()
    };
    let (before, after) = (keys(first), keys(second));
    assert_eq!(before.len(), 500, "every record has a key");
    let reread: Vec<&String> = after.keys().filter(|id| !touched.contains(id)).collect();
    assert!(reread.iter().all(|id| before[*id] == after[*id]), "unchanged records keep their keys");
    assert!(touched.iter().all(|id| before[id] != after[id]), "changed records get new keys");
    println!("{} records re-read unchanged by the overlap", reread.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_read_is_resumed_from_the_recorded_cursor() {
    let faults = Faults { slow: 1.0, slow_ms: 40, ..Faults::default() };
    let world = SyncWorld::start(SimConfig { faults, ..config(3_000) }).await;
    let op = world.request_read("deals").await;
    let first = world.spawn_dispatch("worker-a", Duration::from_secs(2));
    loop {
        let state = world.service.load::<amplog_domain::operation::Operation>(&world.ctx, op.0).await.unwrap().state;
        if state.pages >= 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.abort();
    let _ = first.await;
    let at_kill = world.service.load::<amplog_domain::operation::Operation>(&world.ctx, op.0).await.unwrap().state;
    let served_at_kill = world.sim_stats().await.records_served;
    let second = world.spawn_dispatch("worker-b", Duration::from_secs(2));
    let state = world.finished(op, Duration::from_secs(120)).await;
    second.abort();
    assert_eq!(state.status, OperationStatus::Succeeded);
    assert_eq!(state.records, 3_000, "every record recorded once");

    let events = world.events_of("operation", op.0).await;
    assert_eq!(count(&events, "Started"), 2, "taken over after the lease expired");
    assert!(count(&events, "LeaseRenewed") >= 1, "the live worker renewed its 2 s lease");
    assert_eq!(count(&events, "PageRecorded"), 30);
    // The second worker went on from the recorded page token: the provider served the rest
    // (and at most the two pages in flight at the kill: the one being delivered and the
    // next, prefetched meanwhile), not the object from its start.
    let served = world.sim_stats().await.records_served;
    let resumed = served - served_at_kill;
    println!("killed after {} pages; the second worker read {resumed} records", at_kill.pages);
    assert!(resumed <= 3_000 - at_kill.records + 200, "{resumed} records read after the kill");
    let report = world.sink.report();
    assert_eq!(report.distinct_records, 3_000, "nothing skipped");
    // A page delivered but not recorded at the kill is delivered again under its webhook-id.
    assert!(report.duplicate_deliveries <= 1, "{report:?}");
    let pages = &world.sink.pages_by_stream()[&(world.installation.to_string(), "deals".to_string())];
    let mut distinct: Vec<u64> = pages.iter().map(|(_, p)| *p).collect();
    distinct.dedup();
    assert_eq!(distinct, (1..=30).collect::<Vec<_>>(), "pages in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_refresh_token_turns_the_connection_bad_credentials_and_stops_reads() {
    let world = SyncWorld::start(config(300)).await;
    let dispatch = world.spawn_dispatch("worker-1", Duration::from_secs(60));
    let first = world.request_read("contacts").await;
    assert_eq!(world.finished(first, Duration::from_secs(60)).await.status, OperationStatus::Succeeded);
    // The customer revokes amplog at the provider: the access token stops working and the
    // refresh token is refused.
    world.sim_control(&format!("/_sim/revoke/{}", world.customer), None).await;
    let op = world.request_read("contacts").await;
    let state = world.finished(op, Duration::from_secs(60)).await;
    assert_eq!(state.status, OperationStatus::Failed);
    assert_eq!(state.error_class, Some(ErrorClass::AuthInvalidated));
    assert!(!state.retryable, "re-auth is needed, not a retry");
    let connection = world.service.load::<Connection>(&world.ctx, world.connection.0).await.unwrap().state;
    assert_eq!(connection.status, ConnectionStatus::BadCredentials);
    let stats = world.sim_stats().await;
    assert_eq!(stats.invalid_grants, 1);
    assert_eq!(stats.requests_after_revoke.get(&world.customer), Some(&1), "one call found the token revoked");

    // No further reads: a new request is refused, the scheduler requests none, and the
    // provider sees no call with the connection.
    let refused = world
        .service
        .request_operation(&world.ctx, world.installation, &amplog_commands::testing::read_of("deals"))
        .await;
    assert_eq!(refused.unwrap_err().code(), "installation.needs_reauth");
    world.project().await;
    let scheduler = amplog_providers::scheduler::Scheduler::new(world.service.clone(), "test");
    let tick = scheduler.tick_once(chrono::Utc::now() + chrono::Duration::hours(2)).await.unwrap();
    assert_eq!((tick.scheduled, tick.backfills), (0, 0));
    let health: String = sqlx::query_scalar("SELECT health FROM installations WHERE key = $1")
        .bind(world.installation.to_string())
        .fetch_one(&world.db.pool)
        .await
        .unwrap();
    assert_eq!(health, "needs_reauth");
    tokio::time::sleep(Duration::from_millis(300)).await;
    dispatch.abort();
    assert_eq!(world.sim_stats().await.requests_after_revoke.get(&world.customer), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_endpoint_recovers_and_pages_arrive_in_order() {
    let world = SyncWorld::start(config(450)).await;
    world.sink.fail_next(6);
    let contacts = world.request_read("contacts").await;
    let companies = world.request_read("companies").await;
    let dispatch = world.spawn_dispatch("worker-1", Duration::from_secs(60));
    for op in [contacts, companies] {
        assert_eq!(world.finished(op, Duration::from_secs(60)).await.status, OperationStatus::Succeeded);
    }
    dispatch.abort();
    let report = world.sink.report();
    assert_eq!(report.refused, 6);
    assert_eq!(report.distinct_records, 900);
    // Per installation object, pages arrive in order, each once.
    for (stream, pages) in world.sink.pages_by_stream() {
        let numbers: Vec<u64> = pages.iter().map(|(_, p)| *p).collect();
        assert_eq!(numbers, (1..=5).collect::<Vec<_>>(), "{stream:?}");
    }
    // Every attempt is an event: 6 refused, then delivered, with status and attempt number.
    let mut failed = 0;
    for op in [contacts, companies] {
        for (kind, payload) in world.events_of("operation", op.0).await {
            if kind == "DeliveryAttempted" && payload["delivery"]["delivered"] == json!(false) {
                assert_eq!(payload["delivery"]["status"], 503);
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 6);
    let first = world.events_of("operation", contacts.0).await;
    let attempts: Vec<(u64, u64)> = first
        .iter()
        .filter(|(t, _)| t == "DeliveryAttempted")
        .map(|(_, p)| (p["delivery"]["page"].as_u64().unwrap(), p["delivery"]["attempt"].as_u64().unwrap()))
        .collect();
    assert_eq!(&attempts[..8], &[(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (2, 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_salesforce_shaped_connector_pages_by_next_records_url() {
    let world = SyncWorld::start(config(450)).await;
    let connector = world.connectors.get("simulator-salesforce").unwrap();
    let token = amplog_simulator::sim::connect_customer(&connector, "globex").await.unwrap();
    assert_eq!(token.instance_url.as_deref(), Some(world.sim.url().as_str()));
    let mut ids = Vec::new();
    let mut next: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = connector.read_page(&token, "contacts", None, next.as_deref()).await.unwrap();
        pages += 1;
        ids.extend(page.records.iter().map(|r| r.id.clone()));
        match page.next {
            Some(n) => {
                assert!(n.starts_with("/services/data/v59.0/query/"), "{n}");
                next = Some(n);
            }
            None => break,
        }
    }
    assert_eq!((pages, ids.len()), (3, 450));
    let archived = connector.read_page(&token, "contacts", None, None).await.unwrap();
    assert!(archived.records.iter().any(|r| r.archived), "IsDeleted records are read too");
    // An updated-since filter through SOQL.
    let since = archived.records[150].updated;
    let page = connector.read_page(&token, "contacts", Some(since), None).await.unwrap();
    assert_eq!(page.records[0].id, archived.records[150].id);
    // Data calls go to the org's instance_url, not the login host: a connector whose base
    // URL answers nothing still reads.
    let settings = [(
        "simulator-salesforce".to_string(),
        amplog_providers::connector::ProviderSettings {
            base_url: Some("http://127.0.0.1:9".into()),
            ..Default::default()
        },
    )]
    .into_iter()
    .collect();
    let elsewhere = amplog_providers::connector::Connectors::with_egress(
        &amplog_providers::connector::Catalog::builtin(),
        &settings,
        amplog_providers::egress::Egress::private(),
    );
    let page = elsewhere.get("simulator-salesforce").unwrap().read_page(&token, "contacts", None, None).await.unwrap();
    assert_eq!(page.records.len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_backfills_new_objects_then_requests_each_slot_once() {
    let world = SyncWorld::start(config(10)).await;
    world.project().await;
    let now = chrono::Utc::now();
    let a = amplog_providers::scheduler::Scheduler::new(world.service.clone(), "a");
    let tick = a.tick_once(now).await.unwrap();
    assert_eq!((tick.backfills, tick.scheduled), (0, 3), "no backfill window: first reads since the installation");
    // Open reads are not requested again.
    world.project().await;
    assert_eq!(a.tick_once(now).await.unwrap().busy, 3);
    let ops: Vec<(uuid::Uuid, Value)> = sqlx::query_as::<_, (uuid::Uuid, sqlx::types::Json<Value>)>(
        "SELECT (doc->>'operation_id')::uuid, doc FROM operations",
    )
    .fetch_all(&world.db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, d)| (id, d.0))
    .collect();
    assert!(ops.iter().all(|(_, d)| d["trigger"] == "scheduled" && d["since"].is_string()), "{ops:?}");
    // Nothing changed at the provider since the installation was created: the first reads
    // deliver nothing, but their start becomes the watermark the next reads go on from.
    let dispatch = world.spawn_dispatch("worker-1", Duration::from_secs(60));
    for (id, _) in &ops {
        let state = world.finished(amplog_domain::OperationId(*id), Duration::from_secs(30)).await;
        assert_eq!((state.status, state.records), (OperationStatus::Succeeded, 0));
    }
    world.project().await;
    let watermarks: Vec<Option<String>> =
        sqlx::query_scalar("SELECT doc->>'watermark' FROM read_states").fetch_all(&world.db.pool).await.unwrap();
    assert_eq!(watermarks.len(), 3);
    assert!(watermarks.iter().all(Option::is_some), "{watermarks:?}");
    world.sim_control("/_sim/touch/deals/2", None).await;
    let deals = world.request_read("deals").await;
    assert_eq!(world.finished(deals, Duration::from_secs(30)).await.records, 2, "only the two changed deals");
    dispatch.abort();
    world.project().await;
    // A slot later: one read per object, however many schedulers tick.
    let later = now + chrono::Duration::minutes(15);
    let b = amplog_providers::scheduler::Scheduler::new(world.service.clone(), "b");
    let (ta, tb) = (a.tick_once(later).await.unwrap(), b.tick_once(later).await.unwrap());
    assert_eq!(ta.scheduled + tb.scheduled, 3);
    let per_object: BTreeMap<String, i64> = sqlx::query_as(
        "SELECT payload->>'object', count(*) FROM events WHERE aggregate_type = 'operation' AND event_type = 'Requested' GROUP BY 1",
    )
    .fetch_all(&world.db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    // companies, contacts, deals: the first read and the slot's; deals also the one above.
    assert_eq!(per_object.values().copied().collect::<Vec<_>>(), [2, 2, 3]);
    // A paused installation gets nothing.
    world.service.pause_installation(&world.ctx, world.installation).await.unwrap();
    world.project().await;
    let tick = a.tick_once(later + chrono::Duration::hours(1)).await.unwrap();
    assert_eq!(tick, amplog_providers::scheduler::Tick::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_already_done_by_a_dead_attempt_is_recorded_not_written_again() {
    let world = SyncWorld::start(config(10)).await;
    let records = vec![json!({"email": "a@example.com"}), json!({"email": "b@example.com"})];
    let outcome = world.service.request_write(&world.ctx, world.installation, "contacts", &records).await.unwrap();
    let op = amplog_domain::OperationId(outcome.id_of("operation").unwrap());
    // An earlier attempt wrote them and kept the results, then died before recording.
    let results = json!([{"index": 0, "ok": true, "id": "11", "error": null}, {"index": 1, "ok": true, "id": "12", "error": null}]);
    sqlx::query("UPDATE write_batches SET results = $2 WHERE operation_id = $1")
        .bind(op.0)
        .bind(&results)
        .execute(&world.db.pool)
        .await
        .unwrap();
    let dispatch = world.spawn_dispatch("worker-1", Duration::from_secs(60));
    let state = world.finished(op, Duration::from_secs(60)).await;
    dispatch.abort();
    assert_eq!((state.status, state.records), (OperationStatus::Succeeded, 2));
    assert_eq!(world.sim_stats().await.records_written, 0, "not written twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_last_page_is_recorded_is_finished_without_reading_again() {
    use amplog_domain::operation::Cursor;
    let world = SyncWorld::start(config(10)).await;
    let op = world.request_read("contacts").await;
    // A worker recorded the last page (no next page token), then died before `Succeeded`.
    let lease = amplog_domain::LeaseId(uuid::Uuid::now_v7());
    world.service.start_operation(&world.ctx, op, lease, chrono::Duration::seconds(1)).await.unwrap();
    let cursor = Cursor { watermark: Some(chrono::Utc::now()), page_token: None };
    world.service.record_page(&world.ctx, op, lease, 10, 1_000, &cursor).await.unwrap();
    let dispatch = world.spawn_dispatch("worker-1", Duration::from_secs(60));
    let state = world.finished(op, Duration::from_secs(30)).await;
    dispatch.abort();
    assert_eq!((state.status, state.records, state.pages), (OperationStatus::Succeeded, 10, 1));
    assert_eq!(world.sim_stats().await.data_requests, 0, "nothing read again");
    assert_eq!(world.sink.report().deliveries, 0, "nothing delivered again");
}

/// Standard Webhooks: a 3xx is a failed delivery. A receiver answering 301/302/307 loses no
/// page (a followed redirect would turn the POST into a bodyless GET answered 200), and a
/// 410 Gone stops the read at once, its cursor kept, instead of retrying a dead endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_answering_redirects_loses_nothing_and_gone_stops_the_read() {
    let world = SyncWorld::start(config(450)).await;
    world.sink.answer_next(&[301, 302, 307, 308]);
    let contacts = world.request_read("contacts").await;
    let dispatch = world.spawn_dispatch("worker-1", Duration::from_secs(60));
    assert_eq!(world.finished(contacts, Duration::from_secs(60)).await.status, OperationStatus::Succeeded);
    let report = world.sink.report();
    assert_eq!((report.refused, report.redirected), (4, 0), "{report:?}");
    assert_eq!(report.distinct_records, 450, "{report:?}");
    let statuses: Vec<Value> = world
        .events_of("operation", contacts.0)
        .await
        .into_iter()
        .filter(|(t, p)| t == "DeliveryAttempted" && p["delivery"]["delivered"] == json!(false))
        .map(|(_, p)| p["delivery"]["status"].clone())
        .collect();
    assert_eq!(statuses, vec![json!(301), json!(302), json!(307), json!(308)]);

    world.sink.answer_next(&[410]);
    let companies = world.request_read("companies").await;
    let failed = world.finished(companies, Duration::from_secs(60)).await;
    dispatch.abort();
    assert_eq!(failed.status, OperationStatus::Failed);
    assert_eq!(failed.error_class, Some(ErrorClass::DestinationUnavailable));
    let attempts = count(&world.events_of("operation", companies.0).await, "DeliveryAttempted");
    assert_eq!(attempts, 1, "a 410 is not retried");
    assert_eq!(world.sink.report().redirected, 0);
    // The destination is disabled: the next read fails at once, delivering nothing, until
    // the destination is created again.
    let listed = amplog_commands::destinations::list(&world.db.pool, world.ctx.project_id).await.unwrap();
    assert!(listed[0].2.as_deref().is_some_and(|why| why.contains("410 Gone")), "{listed:?}");
    let deals = world.request_read("deals").await;
    let dispatch = world.spawn_dispatch("worker-1", Duration::from_secs(60));
    let failed = world.finished(deals, Duration::from_secs(60)).await;
    assert_eq!(
        (failed.status, failed.error_class),
        (OperationStatus::Failed, Some(ErrorClass::DestinationUnavailable))
    );
    assert_eq!(count(&world.events_of("operation", deals.0).await, "DeliveryAttempted"), 0);
    let url = listed[0].1.clone();
    let secret = amplog_commands::credentials::Secret(amplog_simulator::testing::SINK_SECRET.into());
    world.service.put_destination(&world.ctx, "default", &url, Some(secret)).await.unwrap();
    let again = world.request_read("deals").await;
    assert_eq!(world.finished(again, Duration::from_secs(60)).await.status, OperationStatus::Succeeded);
    dispatch.abort();
}

/// The Standard Webhooks reference implementation (the `standardwebhooks` package from
/// PyPI, installed by the test command) verifies a delivery byte for byte, and refuses it
/// once the body is altered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_webhooks_reference_library_verifies_deliveries() {
    let world = SyncWorld::start(config(50)).await;
    world.read_once("contacts").await;
    let delivery = world.sink.last_raw().expect("a delivery");
    let verify = |body: &[u8]| {
        let python = std::env::var("AMPLOG_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = "import json, sys\n\
from standardwebhooks.webhooks import Webhook\n\
case = json.load(sys.stdin)\n\
Webhook(case['secret']).verify(case['body'].encode(), case['headers'])\n";
        let case = json!({
            "secret": amplog_simulator::testing::SINK_SECRET,
            "headers": delivery.headers,
            "body": String::from_utf8(body.to_vec()).unwrap(),
        });
        let mut child = std::process::Command::new(&python)
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{python}: {e}"));
        use std::io::Write;
        child.stdin.take().unwrap().write_all(case.to_string().as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let verified = verify(&delivery.body);
    assert!(verified.status.success(), "standardwebhooks refused it: {}", String::from_utf8_lossy(&verified.stderr));
    let mut altered = delivery.body.clone();
    altered.push(b' ');
    let refused = verify(&altered);
    assert!(!refused.status.success(), "an altered body verified");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("WebhookVerificationError"), "{refused:?}");
}

/// SSRF: a tenant's `instance_url`, or a provider's absolute next-page URL, that points at
/// another service is never called (the bearer token stays home) and nothing that service
/// would say reaches the tenant; with private addresses refused (the production default),
/// not even a connector configured at a loopback address is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_calls_go_only_to_the_connectors_hosts() {
    use amplog_providers::connector::{Catalog, Connectors, ProviderSettings, TokenSet};
    use amplog_providers::egress::Egress;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let victim = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            (http::StatusCode::INTERNAL_SERVER_ERROR, "internal-secret-9f2")
        }
    });
    // Another loopback host: not the simulator's (127.0.0.1).
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let victim_addr = listener.local_addr().unwrap();
    let victim_task = tokio::spawn(async move { axum::serve(listener, victim).await.unwrap() });

    let world = SyncWorld::start(config(10)).await;
    let salesforce = world.connectors.get("simulator-salesforce").unwrap();
    let tokens = |instance: Option<String>| TokenSet {
        access_token: "bearer-that-must-stay-home".into(),
        refresh_token: None,
        expires_at: None,
        obtained_at: None,
        instance_url: instance,
        account_id: None,
    };
    let elsewhere = format!("http://{victim_addr}");
    for error in [
        salesforce.read_page(&tokens(Some(elsewhere.clone())), "contacts", None, None).await.unwrap_err(),
        salesforce.read_page(&tokens(None), "contacts", None, Some(&format!("{elsewhere}/next"))).await.unwrap_err(),
    ] {
        assert_eq!(error.class, ErrorClass::BadRequest, "{error:?}");
        assert!(error.message.contains("is not a host of provider"), "{error:?}");
        assert!(!error.message.contains("internal-secret"), "{error:?}");
    }
    // Production's rule: private addresses are refused even for a configured connector.
    let settings = [("hubspot".to_string(), ProviderSettings { base_url: Some(elsewhere), ..Default::default() })]
        .into_iter()
        .collect();
    let strict = Connectors::with_egress(&Catalog::builtin(), &settings, Egress::default());
    let error = strict.get("hubspot").unwrap().read_page(&tokens(None), "contacts", None, None).await.unwrap_err();
    assert_eq!(error.class, ErrorClass::BadRequest, "{error:?}");
    assert!(error.message.contains("private"), "{error:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the other service was called");
    victim_task.abort();
}

/// A destination that is down is not a failed read: the read parks (its worker renewing
/// the lease by itself, however long it waits), keeps its cursor, and goes on when the
/// receiver recovers; every record arrives, and the job's own retries are not spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_outage_parks_the_read_and_nothing_is_dropped() {
    let world = SyncWorld::start(config(450)).await;
    world.sink.fail_next(20);
    let mut worker = world.worker("worker-1", Duration::from_secs(2));
    worker.policy.max_attempts = 1; // an outage must not need the job's retries
    let dispatch = amplog_providers::worker::InProcessDispatch::new(
        std::sync::Arc::new(worker),
        world.service.store().clone(),
        "worker-1",
    );
    let dispatch = tokio::spawn(async move { dispatch.run(std::future::pending()).await.unwrap() });
    let contacts = world.request_read("contacts").await;
    let finished = world.finished(contacts, Duration::from_secs(90)).await;
    dispatch.abort();
    assert_eq!(finished.status, OperationStatus::Succeeded, "{finished:?}");
    let report = world.sink.report();
    assert_eq!((report.refused, report.distinct_records), (20, 450), "{report:?}");
    let events = world.events_of("operation", contacts.0).await;
    assert_eq!(count(&events, "Started"), 1, "never taken over: {:?}", types(&events));
    assert_eq!(count(&events, "Failed") + count(&events, "Retried"), 0, "{:?}", types(&events));
    assert!(count(&events, "LeaseRenewed") >= 3, "the parked worker renewed its lease: {:?}", types(&events));
}

/// One installation whose job cannot run (its operation leased by a worker that died)
/// delays no other installation's reads; and the dead worker's operation is taken over
/// once its lease (the default, 10 s) runs out, not after a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_installation_delays_no_other_and_a_dead_lease_is_taken_over() {
    let world = SyncWorld::start(config(100)).await;
    let lease_for = amplog_providers::worker::WorkerPolicy::default().lease_for;
    let connector = world.connectors.get("simulator").unwrap();
    let (_, other) =
        amplog_simulator::sim::install_customer(&world.service, &world.ctx, world.integration, &connector, "globex")
            .await
            .unwrap();
    // A worker took this read and died holding its lease.
    let stuck = world.request_read("contacts").await;
    let dead = amplog_domain::LeaseId(uuid::Uuid::now_v7());
    let dead_for = chrono::TimeDelta::from_std(lease_for).unwrap();
    world.service.start_operation(&world.ctx, stuck, dead, dead_for).await.unwrap();
    let dispatch = world.spawn_dispatch("worker-1", lease_for);
    tokio::time::sleep(Duration::from_millis(500)).await; // the stuck job is being dispatched
    let outcome = world
        .service
        .request_operation(&world.ctx, other, &amplog_commands::testing::read_of("contacts"))
        .await
        .unwrap();
    let fine = amplog_domain::OperationId(outcome.id_of("operation").unwrap());
    assert_eq!(world.finished(fine, lease_for / 2).await.status, OperationStatus::Succeeded);
    let still = world.service.load::<amplog_domain::operation::Operation>(&world.ctx, stuck.0).await.unwrap().state;
    assert_eq!(still.status, OperationStatus::Running, "the other read did not wait for this one");
    assert_eq!(world.finished(stuck, lease_for * 3).await.status, OperationStatus::Succeeded);
    dispatch.abort();
    let events = world.events_of("operation", stuck.0).await;
    assert_eq!(count(&events, "Started"), 2, "taken over once: {:?}", types(&events));
}

/// A provider whose tokens live 20 s: a short read refreshes at most once, not on every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_are_not_refreshed_on_every_call() {
    let world =
        SyncWorld::start(SimConfig { records: 600, token_ttl: Duration::from_secs(20), ..SimConfig::default() }).await;
    world.read_once("contacts").await;
    let stats = world.sim_stats().await;
    assert!(stats.token_refreshes <= 1, "{} refreshes for a 6-page read", stats.token_refreshes);
}
