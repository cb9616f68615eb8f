//! The relay against the real broker and PostgreSQL: envelopes, keys, completeness, jobs,
//! a held-open append, leadership, refused settings, and a broker restart.

use amplog_commands::testing::CommitGate;
use amplog_commands::testing::{read_of, seed, test_db};
use amplog_commands::CommandService;
use amplog_log::{EventStore, LogReader};
use amplog_streams::testing::{config_on, kafka_config, order_report, Collector, OwnBroker};
use amplog_streams::{KafkaConfig, Relay, StreamsError, RELAY};
use std::sync::Arc;
use std::time::Duration;

fn relay(service: &CommandService, config: &KafkaConfig) -> Relay {
    Relay::new(service.pool().clone(), EventStore::default(), config.clone(), "test-relay").expect("a safe config")
}

fn aggregate_topics(config: &KafkaConfig) -> Vec<String> {
    amplog_streams::config::AGGREGATE_TYPES.iter().map(|t| config.aggregate_topic(t)).collect()
}

async fn log_count(service: &CommandService) -> usize {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events").fetch_one(service.pool()).await.unwrap() as usize
}

#[tokio::test]
async fn every_event_is_published_as_a_cloudevent_keyed_by_its_aggregate() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let requested = service.request_operation(&s.ctx, s.installation, &read_of("contacts")).await.unwrap();
    let operation = requested.id_of("operation").unwrap();
    let config = kafka_config();
    assert_eq!(
        relay(&service, &config).catch_up().await.unwrap().map(|c| c.events as usize),
        Some(log_count(&service).await)
    );

    let mut collector = Collector::new(&config, &aggregate_topics(&config)).await;
    let total = log_count(&service).await;
    assert!(
        collector.until(Duration::from_secs(30), |r| r.len() >= total).await,
        "{} of {total}",
        collector.received.len()
    );
    let report = order_report(&collector.received);
    assert_eq!((report.distinct, report.duplicates), (total, 0));
    assert!(report.out_of_order.is_empty());

    // The operation's Requested event, field by field against the log.
    let row: (uuid::Uuid, i64, i64, Vec<u8>, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "SELECT event_id, sequence, position, hash, recorded_at FROM events
         WHERE aggregate_type = 'operation' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(operation.to_string())
    .fetch_one(service.pool())
    .await
    .unwrap();
    let message = collector.received.iter().find(|r| r.event.id == row.0.to_string()).expect("published");
    assert_eq!(message.topic, config.aggregate_topic("operation"));
    assert_eq!(message.key, operation.to_string());
    assert_eq!(message.content_type.as_deref(), Some(amplog_streams::envelope::CONTENT_TYPE));
    let event = &message.event;
    assert_eq!(event.specversion, "1.0");
    assert_eq!(event.event_type, "amplog.operation.Requested.v1.0");
    assert_eq!(event.subject, operation.to_string());
    assert_eq!(event.source, format!("/amplog/projects/{}", s.ctx.project_id));
    assert_eq!(event.projectid, Some(s.ctx.project_id.0));
    assert_eq!((event.sequence, event.position), (Some(row.1), Some(row.2)));
    assert_eq!(event.hash.as_deref(), Some(hex::encode(&row.3).as_str()));
    assert_eq!(event.time, row.4);
    assert_eq!(event.data["object"], "contacts");
    assert_eq!(event.actor.as_deref(), Some("test"));
    // Every aggregate's events went to its own topic.
    for r in &collector.received {
        let aggregate = r.event.event_type.split('.').nth(1).unwrap();
        assert_eq!(r.topic, config.aggregate_topic(aggregate));
        assert_eq!(r.key, r.event.subject);
    }

    // The requested operation is a job on the jobs topic, keyed by installation.
    let mut jobs = Collector::new(&config, &[config.jobs_topic()]).await;
    assert!(jobs.until(Duration::from_secs(30), |r| !r.is_empty()).await);
    let job = &jobs.received[0];
    assert_eq!(job.key, s.installation.to_string());
    assert_eq!(job.event.id, row.0.to_string(), "a job's id is its Requested event's");
    assert_eq!(job.event.event_type, "amplog.job.read.v1");
    assert_eq!(job.event.projectid, Some(s.ctx.project_id.0));
    assert_eq!(job.event.data["operation_id"], operation.to_string());
    assert!(job.event.data.get("project_id").is_none(), "the tenant travels in the envelope only");

    // The seed's connection and installation are notifications, keyed by what they are about.
    let mut notices = Collector::new(&config, &[config.notifications_topic()]).await;
    assert!(notices.until(Duration::from_secs(30), |r| r.len() >= 2).await);
    let mut types: Vec<&str> = notices.received.iter().map(|r| r.event.event_type.as_str()).collect();
    types.sort();
    assert_eq!(types, ["amplog.notification.connection.created.v1", "amplog.notification.installation.created.v1"]);
    let installed = notices.received.iter().find(|r| r.event.data["type"] == "installation.created").unwrap();
    assert_eq!(installed.key, s.installation.to_string());
    assert_eq!(installed.event.data["data"]["group_ref"], "group-1");
    assert_eq!(installed.event.projectid, Some(s.ctx.project_id.0));

    // The checkpoint stands at the log's end; a second catch-up publishes nothing.
    let checkpoint = LogReader::checkpoint(&mut service.pool().acquire().await.unwrap(), RELAY).await.unwrap();
    assert_eq!(checkpoint.position, LogReader::new(service.pool().clone()).end().await.unwrap());
    assert_eq!(relay(&service, &config).catch_up().await.unwrap().map(|c| c.events), Some(0));
}

#[tokio::test]
async fn an_append_held_open_while_later_events_are_relayed_is_still_published() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    // Later appends go to other streams (the same stream would wait on the held row).
    let other = seed(&service).await;
    let config = kafka_config();
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = {
        let (relay, stop) = (relay(&service, &config), stop.clone());
        tokio::spawn(async move { relay.run(stop.notified()).await })
    };
    // An append that takes a position, then waits before COMMIT.
    let gate = Arc::new(CommitGate::default());
    let gated = service.clone().with_commit_gate(gate.clone());
    let held = {
        let (ctx, installation) = (s.ctx.clone().with_idempotency_key("held"), s.installation);
        tokio::spawn(async move { gated.request_operation(&ctx, installation, &read_of("deals")).await })
    };
    gate.reached.notified().await;
    // Later appends commit and are relayed meanwhile.
    for object in ["contacts", "companies"] {
        service.request_operation(&other.ctx, other.installation, &read_of(object)).await.unwrap();
    }
    let mut collector = Collector::new(&config, &[config.aggregate_topic("operation")]).await;
    collector.drain(Duration::from_secs(2)).await;
    let held_published = |r: &[amplog_streams::testing::Received]| r.iter().any(|m| m.event.data["object"] == "deals");
    assert!(!held_published(&collector.received), "not committed yet");
    gate.release.add_permits(1);
    let outcome = held.await.unwrap().unwrap();
    let held_id = outcome.id_of("operation").unwrap().to_string();
    let all_three = |r: &[amplog_streams::testing::Received]| held_published(r) && r.len() >= 3;
    assert!(collector.until(Duration::from_secs(30), all_three).await, "the held event was published");
    let objects: Vec<_> =
        collector.received.iter().map(|m| m.event.data["object"].as_str().unwrap().to_string()).collect();
    assert_eq!(objects.iter().filter(|o| *o == "deals").count(), 1);
    assert!(objects.contains(&"contacts".into()) && objects.contains(&"companies".into()));
    // The held event has the lowest position of the three: readers did not pass it.
    let positions: Vec<(String, i64)> =
        collector.received.iter().map(|m| (m.event.subject.clone(), m.event.position.unwrap())).collect();
    let held_position = positions.iter().find(|(s, _)| *s == held_id).unwrap().1;
    assert!(positions.iter().all(|(_, p)| *p >= held_position), "{positions:?}");
    stop.notify_one();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn one_relay_leads_at_a_time_and_unsafe_settings_are_refused() {
    let db = test_db().await;
    let service = db.service();
    seed(&service).await;
    let config = kafka_config();
    let leader = amplog_log::leader::Leadership::try_acquire(service.pool(), RELAY, "other").await.unwrap().unwrap();
    assert_eq!(relay(&service, &config).catch_up().await.unwrap().map(|c| c.events), None, "another process leads");
    leader.release().await;
    assert!(relay(&service, &config).catch_up().await.unwrap().is_some());

    for bad in ["acks=1", "enable.idempotence=false", "max.in.flight.requests.per.connection=10"] {
        let error = config.clone().with_properties(&[bad.into()]).unwrap_err();
        assert!(matches!(error, StreamsError::UnsafeSetting { .. }), "{bad}: {error}");
    }
    let mut unsafe_config = config.clone();
    unsafe_config.properties.insert("acks".into(), "0".into());
    let refused = Relay::new(service.pool().clone(), EventStore::default(), unsafe_config, "x").err().unwrap();
    assert_eq!(refused.code(), "unsafe_kafka_setting");
}

#[tokio::test]
async fn the_relay_recovers_from_a_broker_restart_without_losing_an_event() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let mut broker = OwnBroker::start();
    let config = config_on(&broker.address());
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = {
        let (relay, stop) = (relay(&service, &config), stop.clone());
        tokio::spawn(async move { relay.run(stop.notified()).await })
    };
    let request = |n: usize| {
        let (service, ctx, installation) = (service.clone(), s.ctx.clone(), s.installation);
        async move {
            for _ in 0..n {
                service.request_operation(&ctx, installation, &read_of("contacts")).await.unwrap();
            }
        }
    };
    request(50).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.kill();
    // Appends go on while the broker is down, and after it is back.
    request(50).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart();
    request(50).await;

    let total = log_count(&service).await;
    let mut collector = Collector::new(&config, &aggregate_topics(&config)).await;
    let arrived = collector.until_distinct(total, Duration::from_secs(120)).await;
    let report = order_report(&collector.received);
    eprintln!("broker restart: {} distinct of {total}, {} duplicates", report.distinct, report.duplicates);
    assert!(arrived, "{} distinct events of {total} arrived", report.distinct);
    assert_eq!(report.distinct, total);
    assert!(report.out_of_order.is_empty(), "{:?}", report.out_of_order);
    stop.notify_one();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn stored_payloads_go_into_envelopes_as_the_parsed_path_would_put_them() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let requested = service.request_operation(&s.ctx, s.installation, &read_of("contacts")).await.unwrap();
    let operation = requested.id_of("operation").unwrap();
    // A PageRecorded 1.0 row (upcast on the way out), its page token full of characters
    // JSON escapes, and a row spaced unlike serde_json whose metadata names no actor.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, project_id)
         VALUES ('operation', $1, 2, 'PageRecorded', '1.0', $2::json, '{\"actor\":\"v1\"}', $3),
                ('operation', $1, 3, 'Cancelled', '1.0', E' {\"reason\": \"tab\\\\there, quote \\\\\" and é\"}\n', '{}', $3)",
    )
    .bind(operation.to_string())
    .bind(r#"{"lease_id":"00000000-0000-0000-0000-000000000001","count":250,"cursor":"a\"b\\c\u00e9\n","at":"2026-01-01T00:00:00Z"}"#)
    .bind(s.ctx.project_id.0)
    .execute(&db.pool)
    .await
    .unwrap();

    let store = EventStore::default();
    // A catch-up, not one batch: another test's open transaction can hold the xmin back.
    let reader = LogReader::new(db.pool.clone());
    let stored = reader.catch_up(Default::default(), 1000).await.unwrap().rest_stored().await.unwrap();
    assert!(stored.len() >= 5, "{} events", stored.len());
    for event in &stored {
        let fast = amplog_streams::CloudEvent::encode_stored(event, &store).unwrap();
        let parsed = amplog_streams::CloudEvent::from_event(event.clone().parse().unwrap(), &store);
        let as_json = |bytes: &[u8]| serde_json::from_slice::<serde_json::Value>(bytes).unwrap();
        assert_eq!(as_json(&fast), as_json(&parsed.to_bytes()), "{} {}", event.aggregate_type, event.event_type);
        // What amplog wrote (serde_json's compact text) comes out byte for byte the same.
        if event.aggregate_id != operation.to_string() || event.sequence == 1 {
            assert_eq!(String::from_utf8(fast).unwrap(), String::from_utf8(parsed.to_bytes()).unwrap());
        }
    }
    let envelope = |sequence: i64| {
        let event = stored.iter().find(|e| e.aggregate_id == operation.to_string() && e.sequence == sequence).unwrap();
        amplog_streams::CloudEvent::parse(&amplog_streams::CloudEvent::encode_stored(event, &store).unwrap()).unwrap()
    };
    let page = envelope(2);
    // The version the schemas name (cqrs-es's upcaster alone says "2.0.0").
    assert_eq!(page.event_type, "amplog.operation.PageRecorded.v2.0");
    assert_eq!(page.data["records"], 250);
    assert_eq!(page.data["cursor"]["page_token"], "a\"b\\cé\n");
    assert_eq!(page.actor.as_deref(), Some("v1"));
    let cancelled = envelope(3);
    assert_eq!(cancelled.data["reason"], "tab\there, quote \" and é");
    assert_eq!(cancelled.actor, None);
}
