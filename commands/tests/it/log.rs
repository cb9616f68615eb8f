//! The write side against a real PostgreSQL: atomic appends, typed conflicts, idempotency,
//! snapshots, upcasting of old rows, append-only storage, tenancy, secrets kept out.

use amplog_commands::credentials::Secret;
use amplog_commands::testing::{read_of, seed, start_read, test_db, test_db_with, SEED_SECRET};
use amplog_commands::{CommandContext, CommandError};
use amplog_domain::installation::{Installation, InstallationError};
use amplog_domain::operation::{Cursor, Operation, OperationError, OperationStatus};
use amplog_domain::*;
use amplog_log::EventStore;
use sqlx::Row;
use uuid::Uuid;

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn a_command_appends_all_its_events_or_none() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let before = count(&db.pool, "SELECT count(*) FROM events").await;

    // A read request writes two streams in one transaction.
    let outcome = service.request_operation(&s.ctx, s.installation, &read_of("contacts")).await.unwrap();
    let types: Vec<_> = outcome.events.iter().map(|e| (e.aggregate_type.as_str(), e.event_type.as_str())).collect();
    assert_eq!(types, [("installation", "OperationRequested"), ("operation", "Requested")]);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM events").await, before + 2);

    // A refused command appends nothing at all.
    service.pause_installation(&s.ctx, s.installation).await.unwrap();
    let err = service.request_operation(&s.ctx, s.installation, &read_of("contacts")).await.unwrap_err();
    assert!(matches!(err, CommandError::Domain(DomainError::Installation(InstallationError::Paused))), "{err:?}");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM events").await, before + 3);

    // The second stream's sequence is already taken by another writer: the first stream's
    // event must not be written either.
    service.unpause_installation(&s.ctx, s.installation).await.unwrap();
    let installation_seq: i64 = sqlx::query_scalar("SELECT max(sequence) FROM events WHERE aggregate_id = $1")
        .bind(s.installation.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let mut tx = amplog_log::tx::begin(&db.pool).await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('installation', $1, $2, 'Paused', '1.0', '{\"at\":\"2026-01-01T00:00:00Z\"}', '{}')",
    )
    .bind(s.installation.to_string())
    .bind(installation_seq + 1)
    .execute(&mut *tx)
    .await
    .unwrap();
    let racing = {
        let service = service.clone();
        let ctx = s.ctx.clone();
        let installation = s.installation;
        tokio::spawn(async move { service.request_operation(&ctx, installation, &read_of("contacts")).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    tx.commit().await.unwrap();
    let err = racing.await.unwrap().unwrap_err();
    assert!(matches!(&err, CommandError::Conflict { stream } if stream.contains("installation")), "{err:?}");
    let operations: i64 = count(&db.pool, "SELECT count(*) FROM events WHERE aggregate_type = 'operation'").await;
    assert_eq!(operations, 1, "the operation stream of the conflicting command was not written");
}

#[tokio::test]
async fn a_stale_writer_gets_a_typed_conflict_never_a_lost_update() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let (op, lease) = start_read(&service, &s, "contacts").await;
    // 16 writers record a page at once: every one either lands or gets Conflict.
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let (service, ctx) = (service.clone(), s.ctx.clone());
        tasks.push(tokio::spawn(async move {
            service
                .record_page(&ctx, op, lease, i + 1, 0, &Cursor { watermark: None, page_token: Some(format!("p{i}")) })
                .await
        }));
    }
    let mut landed = 0u64;
    let mut records = 0u64;
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(_) => {
                landed += 1;
                records += i as u64 + 1;
            }
            Err(CommandError::Conflict { .. }) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(landed >= 1);
    let state = service.load::<Operation>(&s.ctx, op.0).await.unwrap().state;
    assert_eq!(state.pages, landed, "every accepted page is in the state, no other");
    assert_eq!(state.records, records);
}

#[tokio::test]
async fn an_idempotency_key_appends_once_and_returns_the_first_result() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let keyed = s.ctx.clone().with_idempotency_key("req-1");
    let before = count(&db.pool, "SELECT count(*) FROM events").await;

    // Concurrent retries of the same request: one appends, all see its result.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (service, ctx, inst) = (service.clone(), keyed.clone(), s.installation);
        tasks.push(tokio::spawn(
            async move { service.request_operation(&ctx, inst, &read_of("contacts")).await.unwrap() },
        ));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    assert_eq!(count(&db.pool, "SELECT count(*) FROM events").await, before + 2);
    assert_eq!(outcomes.iter().filter(|o| !o.replayed).count(), 1);
    for o in &outcomes {
        assert_eq!(o.events, outcomes[0].events);
    }

    // A later retry too.
    let again = service.request_operation(&keyed, s.installation, &read_of("contacts")).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.events, outcomes[0].events);

    // The same key for a different request is refused, and appends nothing.
    let err = service.request_operation(&keyed, s.installation, &read_of("deals")).await.unwrap_err();
    assert!(matches!(&err, CommandError::IdempotencyKeyReused(k) if k == "req-1"), "{err:?}");
    // Keys are per project: another project may use the same key.
    let other = seed(&service).await;
    let other_keyed = other.ctx.clone().with_idempotency_key("req-1");
    let fresh = service.request_operation(&other_keyed, other.installation, &read_of("contacts")).await.unwrap();
    assert!(!fresh.replayed);
    // A refused command does not burn its key: after fixing the cause, the retry runs.
    let paused_key = s.ctx.clone().with_idempotency_key("req-2");
    service.pause_installation(&s.ctx, s.installation).await.unwrap();
    assert!(service.request_operation(&paused_key, s.installation, &read_of("contacts")).await.is_err());
    service.unpause_installation(&s.ctx, s.installation).await.unwrap();
    assert!(!service.request_operation(&paused_key, s.installation, &read_of("contacts")).await.unwrap().replayed);
}

#[tokio::test]
async fn a_snapshot_plus_its_tail_equals_a_full_replay() {
    let db = test_db().await;
    let service = amplog_commands::CommandService::new(
        db.pool.clone(),
        EventStore::new(10),
        amplog_commands::testing::credential_store(),
    );
    let s = seed(&service).await;
    let (op, lease) = start_read(&service, &s, "contacts").await;
    for i in 0..33u64 {
        let cursor = Cursor { watermark: None, page_token: Some(format!("page-{i}")) };
        service.record_page(&s.ctx, op, lease, i, i * 10, &cursor).await.unwrap();
    }
    // 35 events, snapshots every 10: the stored snapshot is at sequence 30.
    let row = sqlx::query(
        "SELECT sequence FROM aggregate_snapshots WHERE aggregate_type = 'operation' AND aggregate_id = $1",
    )
    .bind(op.to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(row.get::<i64, _>("sequence"), 30);

    // Fresh stores (no cache), as another process would load.
    let mut conn = db.pool.acquire().await.unwrap();
    let via_snapshot = EventStore::new(10).load::<Operation>(&mut conn, &op.to_string()).await.unwrap();
    let full = EventStore::new(i64::MAX).load::<Operation>(&mut conn, &op.to_string()).await.unwrap();
    sqlx::query("DELETE FROM aggregate_snapshots").execute(&db.pool).await.unwrap();
    let replayed = EventStore::new(10).load::<Operation>(&mut conn, &op.to_string()).await.unwrap();
    let cached = service.load::<Operation>(&s.ctx, op.0).await.unwrap();
    drop(conn);
    for other in [&full, &replayed, &cached] {
        assert_eq!(via_snapshot.state, other.state);
        assert_eq!(via_snapshot.sequence, other.sequence);
        assert_eq!(via_snapshot.hash, other.hash);
    }
    assert_eq!(via_snapshot.sequence, 35);
    assert_eq!(via_snapshot.state.pages, 33);
    assert_eq!(via_snapshot.state.records, (0..33).sum::<u64>());
    // And the next append chains from the right hash.
    service.succeed_operation(&s.ctx, op, lease).await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let report = amplog_log::audit::verify(&mut conn, None, |_| {}).await.unwrap();
    assert!(report.is_intact(), "{:?}", report.breaks);
}

#[tokio::test]
async fn a_v1_row_written_by_raw_sql_is_upcast_on_read() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let (op, lease) = start_read(&service, &s, "contacts").await;
    // What a release before PageRecorded 2.0 wrote.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, project_id)
         VALUES ('operation', $1, 3, 'PageRecorded', '1.0', $2::json, '{\"actor\":\"v1\"}', $3)",
    )
    .bind(op.to_string())
    .bind(format!(r#"{{"lease_id":"{}","count":250,"cursor":"after-250","at":"2026-01-01T00:00:00Z"}}"#, lease.0))
    .bind(s.ctx.project_id.0)
    .execute(&db.pool)
    .await
    .unwrap();
    let state = service.load::<Operation>(&s.ctx, op.0).await.unwrap().state;
    assert_eq!(state.records, 250);
    assert_eq!(state.pages, 1);
    assert_eq!(state.cursor, Cursor { watermark: None, page_token: Some("after-250".into()) });
    // The log itself is not rewritten.
    let stored: String =
        sqlx::query_scalar("SELECT event_version FROM events WHERE aggregate_id = $1 AND sequence = 3")
            .bind(op.to_string())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored, "1.0");
    // And the stream goes on after it.
    service.record_page(&s.ctx, op, lease, 10, 0, &Cursor::default()).await.unwrap();
    assert_eq!(service.load::<Operation>(&s.ctx, op.0).await.unwrap().state.records, 260);
}

#[tokio::test]
async fn the_log_is_append_only() {
    let db = test_db().await;
    let service = db.service();
    seed(&service).await;
    for sql in ["UPDATE events SET payload = '{}'", "DELETE FROM events", "TRUNCATE events"] {
        let err = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
}

#[tokio::test]
async fn another_projects_aggregates_do_not_exist_for_a_caller() {
    let db = test_db().await;
    let service = db.service();
    let a = seed(&service).await;
    let b = seed(&service).await;
    let err = service.pause_installation(&a.ctx, b.installation).await.unwrap_err();
    assert!(matches!(err, CommandError::Domain(DomainError::Installation(InstallationError::NotFound))), "{err:?}");
    let err = service.request_operation(&a.ctx, b.installation, &read_of("contacts")).await.unwrap_err();
    assert!(matches!(err, CommandError::Domain(DomainError::Installation(InstallationError::NotFound))), "{err:?}");
    assert!(!service.load::<Installation>(&a.ctx, b.installation.0).await.unwrap().state.exists);
    assert!(service.load::<Installation>(&b.ctx, b.installation.0).await.unwrap().state.exists);
    let op = OperationId(
        service
            .request_operation(&b.ctx, b.installation, &read_of("contacts"))
            .await
            .unwrap()
            .id_of("operation")
            .unwrap(),
    );
    let err = service.cancel_operation(&a.ctx, op, "no").await.unwrap_err();
    assert!(matches!(err, CommandError::Domain(DomainError::Operation(OperationError::NotFound))), "{err:?}");
    let state = service.load::<Operation>(&b.ctx, op.0).await.unwrap().state;
    assert_eq!(state.status, OperationStatus::Pending);
    // Credentials are scoped too.
    let mut conn = db.pool.acquire().await.unwrap();
    let credential_id: Uuid = sqlx::query_scalar("SELECT id FROM credentials WHERE connection_id = $1")
        .bind(b.connection.0)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let store = service.credentials();
    assert_eq!(store.get(&mut conn, a.ctx.project_id, CredentialId(credential_id)).await.unwrap(), None);
    assert_eq!(
        store.get(&mut conn, b.ctx.project_id, CredentialId(credential_id)).await.unwrap(),
        Some(Secret(SEED_SECRET.into()))
    );
}

#[tokio::test]
async fn no_secret_enters_the_log() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let refreshed = Secret(r#"{"access_token":"refreshed-at-77aa","refresh_token":"refreshed-rt-88bb"}"#.into());
    service.refresh_token(&s.ctx, s.connection, &refreshed, None).await.unwrap();
    let reconnected = Secret("reconnected-api-key-99cc".into());
    service.record_refresh_failure(&s.ctx, s.connection, "invalid_grant").await.unwrap();
    service.reconnect(&s.ctx, s.connection, &reconnected).await.unwrap();

    let everything: String = sqlx::query_scalar("SELECT string_agg(payload::text || metadata::text, '') FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let snapshots: Option<String> = sqlx::query_scalar("SELECT string_agg(state::text, '') FROM aggregate_snapshots")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let stored: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT ciphertext FROM credentials").fetch_all(&db.pool).await.unwrap();
    for token in [
        "seed-access-token-4f1d",
        "seed-refresh-token-9a2c",
        "refreshed-at-77aa",
        "refreshed-rt-88bb",
        "reconnected-api-key-99cc",
    ] {
        assert!(!everything.contains(token), "{token} is in the log");
        assert!(!snapshots.clone().unwrap_or_default().contains(token), "{token} is in a snapshot");
        assert!(stored.iter().all(|c| !String::from_utf8_lossy(c).contains(token)), "{token} is stored in clear");
    }
    // The events carry the reference and fingerprint, and the latest secret decrypts.
    let state = service.load::<connection::Connection>(&s.ctx, s.connection.0).await.unwrap().state;
    let credential = state.credential.expect("a credential reference");
    assert_eq!(credential.fingerprint, service.credentials().key().fingerprint(&reconnected));
    let mut conn = db.pool.acquire().await.unwrap();
    assert_eq!(service.credentials().get(&mut conn, s.ctx.project_id, credential.id).await.unwrap(), Some(reconnected));
    // A ciphertext moved to another row does not decrypt.
    let ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM credentials ORDER BY created_at").fetch_all(&db.pool).await.unwrap();
    sqlx::query("UPDATE credentials SET ciphertext = (SELECT ciphertext FROM credentials WHERE id = $1), nonce = (SELECT nonce FROM credentials WHERE id = $1) WHERE id = $2")
        .bind(ids[0])
        .bind(ids[1])
        .execute(&db.pool)
        .await
        .unwrap();
    let err = service.credentials().get(&mut conn, s.ctx.project_id, CredentialId(ids[1])).await.unwrap_err();
    assert!(matches!(err, CommandError::Credentials(_)), "{err:?}");
}

#[tokio::test]
async fn a_refused_credential_command_stores_no_ciphertext() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    service.revoke_connection(&s.ctx, s.connection).await.unwrap();
    let before = count(&db.pool, "SELECT count(*) FROM credentials").await;
    let err = service.refresh_token(&s.ctx, s.connection, &Secret("x".into()), None).await.unwrap_err();
    assert_eq!(err.code(), "connection.revoked");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM credentials").await, before);
}

#[tokio::test]
async fn postgres_es_still_reads_and_writes_the_log() {
    use cqrs_es::persist::PersistedEventRepository;
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let repo = postgres_es::PostgresEventRepository::new(db.pool.clone());
    let events = repo.get_events::<CompatProbe>(&s.installation.to_string()).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_type, "Created");
    assert_eq!(events[0].payload["group_ref"], "group-1");
    // postgres-es's own INSERT still works; the row gets a position and a transaction id
    // from the defaults, and chain verification reports it as written around amplog.
    let foreign_id = Uuid::now_v7().to_string();
    let row = cqrs_es::persist::SerializedEvent::new(
        foreign_id.clone(),
        1,
        "installation".into(),
        "Paused".into(),
        "1.0".into(),
        serde_json::json!({"at": "2026-01-01T00:00:00Z"}),
        serde_json::json!({}),
    );
    repo.persist::<CompatProbe>(&[row], None).await.unwrap();
    let stored: (i64, String) =
        sqlx::query_as("SELECT position, transaction_id::text FROM events WHERE aggregate_id = $1")
            .bind(&foreign_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(stored.0 > 0 && !stored.1.is_empty());
    let mut conn = db.pool.acquire().await.unwrap();
    let report = amplog_log::audit::verify(&mut conn, None, |_| {}).await.unwrap();
    assert_eq!(report.breaks.len(), 1);
    assert_eq!(report.breaks[0].aggregate_id, foreign_id);
    assert_eq!(report.breaks[0].kind, amplog_log::audit::BreakKind::Unhashed);
    let missing: i64 =
        count(&db.pool, "SELECT count(*) FROM events WHERE position IS NULL OR transaction_id IS NULL").await;
    assert_eq!(missing, 0);
}

/// postgres-es reads rows of an aggregate type through cqrs-es's `Aggregate`: a probe that
/// only names the type.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct CompatProbe;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct ProbeEvent;

impl cqrs_es::DomainEvent for ProbeEvent {
    fn event_type(&self) -> String {
        "probe".into()
    }
    fn event_version(&self) -> String {
        "1.0".into()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("probe")]
struct ProbeError;

impl cqrs_es::Aggregate for CompatProbe {
    const TYPE: &'static str = "installation";
    type Command = ();
    type Event = ProbeEvent;
    type Error = ProbeError;
    type Services = ();
    async fn handle(&mut self, _: (), _: &(), _: &cqrs_es::event_sink::EventSink<Self>) -> Result<(), ProbeError> {
        Ok(())
    }
    fn apply(&mut self, _: ProbeEvent) {}
}

#[tokio::test]
async fn commands_on_an_unknown_id_are_typed_not_found() {
    let db = test_db().await;
    let service = db.service();
    let ctx = CommandContext::new(ProjectId(Uuid::now_v7()), "test");
    let missing = Uuid::now_v7();
    let codes = [
        service.pause_installation(&ctx, InstallationId(missing)).await.unwrap_err().code(),
        service.retry_operation(&ctx, OperationId(missing)).await.unwrap_err().code(),
        service.revoke_connection(&ctx, ConnectionId(missing)).await.unwrap_err().code(),
        service
            .deploy_revision(&ctx, IntegrationId(missing), &integration::Manifest { objects: vec![] })
            .await
            .unwrap_err()
            .code(),
    ];
    assert_eq!(
        codes,
        ["installation.not_found", "operation.not_found", "connection.not_found", "integration.not_found"]
    );
}

#[tokio::test]
async fn two_processes_writing_one_stream_each_see_the_others_events() {
    let db = test_db().await;
    let (a, b) = (db.service(), db.service()); // separate stores and caches, like two processes
    let s = seed(&a).await;
    let (op, lease) = start_read(&a, &s, "contacts").await;
    for i in 0..10u64 {
        let writer = if i % 2 == 0 { &a } else { &b };
        writer.record_page(&s.ctx, op, lease, i, 0, &Cursor::default()).await.unwrap();
    }
    for service in [&a, &b] {
        let loaded = service.load::<Operation>(&s.ctx, op.0).await.unwrap();
        assert_eq!((loaded.sequence, loaded.state.pages, loaded.state.records), (12, 10, 45));
    }
    b.cancel_operation(&s.ctx, op, "stop").await.unwrap();
    let err = a.record_page(&s.ctx, op, lease, 1, 0, &Cursor::default()).await.unwrap_err();
    assert_eq!(err.code(), "operation.already_finished");
}

/// A migration that builds an index without blocking appends (`CONCURRENTLY`, outside a
/// transaction) and was interrupted — its index left invalid, the migration not recorded —
/// is run again from its start by the next `migrate`, which leaves a valid index.
#[tokio::test]
async fn an_interrupted_concurrent_index_build_is_built_again() {
    let db = test_db().await;
    let valid =
        "SELECT count(*) FROM pg_index WHERE indexrelid = 'events_by_stream_log_order'::regclass AND indisvalid";
    assert_eq!(count(&db.pool, valid).await, 1);
    let version =
        amplog_migrations::MIGRATIONS.iter().find(|m| m.name == "events_by_stream_log_order").unwrap().version;
    sqlx::raw_sql(&format!(
        "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'events_by_stream_log_order'::regclass;
         DELETE FROM amplog_migrations WHERE version = {version}"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(count(&db.pool, valid).await, 0);
    let mut conn = db.pool.acquire().await.unwrap();
    assert_eq!(amplog_migrations::migrate(&mut conn).await.unwrap(), 1);
    assert_eq!(count(&db.pool, valid).await, 1);
    assert!(amplog_migrations::is_current(&mut conn).await.unwrap());
}

/// Migrations build indexes on the log without stopping appends: while `CREATE INDEX
/// CONCURRENTLY` runs over a large log (PostgreSQL reports it in progress before and after
/// each append), commands keep committing.
#[tokio::test]
async fn appends_keep_committing_while_a_migration_builds_an_index() {
    let db = test_db().await;
    let s = seed(&db.service()).await;
    let service = db.service();
    let (op, lease) = start_read(&service, &s, "contacts").await;
    sqlx::raw_sql(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT 'filler', (g / 1000)::text, g % 1000, 'Filled', '1.0', '{}', '{}' FROM generate_series(0, 599999) g;
         DROP INDEX events_by_position;
         DELETE FROM amplog_migrations WHERE version = 7",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let migration = async {
        let applied = amplog_migrations::migrate(&mut conn).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        applied
    };
    let building = "SELECT count(*) FROM pg_stat_progress_create_index WHERE relid = 'events'::regclass";
    let appends = async {
        let (mut during, mut page) = (0, 0u64);
        while !done.load(std::sync::atomic::Ordering::SeqCst) && page < 100_000 {
            let before = count(&db.pool, building).await;
            service.record_page(&s.ctx, op, lease, page, 1, &Cursor::default()).await.unwrap();
            page += 1;
            if before > 0 && count(&db.pool, building).await > 0 {
                during += 1;
            }
        }
        (during, page)
    };
    let (applied, (during, page)) = tokio::join!(migration, appends);
    let applied = applied.unwrap();
    assert_eq!(applied, 1);
    assert!(amplog_migrations::is_current(&mut conn).await.unwrap());
    eprintln!("{during} of {page} appends committed while the index was being built");
    assert!(during >= 3, "only {during} of {page} appends committed while the index was being built");
    let valid = "SELECT count(*) FROM pg_index WHERE indexrelid = 'events_by_position'::regclass AND indisvalid";
    assert_eq!(count(&db.pool, valid).await, 1);
}

/// A database that applied a migration's first text, since rewritten to build its index
/// without blocking, is current; any other change to an applied migration is refused.
#[tokio::test]
async fn a_migration_rewritten_to_build_concurrently_is_still_applied() {
    let db = test_db().await;
    let mut conn = db.pool.acquire().await.unwrap();
    for (version, checksum) in amplog_migrations::REWRITTEN {
        sqlx::query("UPDATE amplog_migrations SET checksum = $2 WHERE version = $1")
            .bind(version)
            .bind(checksum)
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    assert_eq!(amplog_migrations::migrate(&mut conn).await.unwrap(), 0);
    assert!(amplog_migrations::is_current(&mut conn).await.unwrap());
    sqlx::query("UPDATE amplog_migrations SET checksum = 'edited' WHERE version = 7")
        .execute(&mut *conn)
        .await
        .unwrap();
    let err = amplog_migrations::migrate(&mut conn).await.unwrap_err();
    assert!(matches!(err, amplog_migrations::MigrationError::Changed { version: 7, .. }), "{err}");
}

/// During a rolling upgrade the new release migrates first: an old binary on a database
/// with a migration it does not know still migrates (nothing to do) and is current, so its
/// replicas stay ready and can restart until they are replaced.
#[tokio::test]
async fn a_binary_runs_on_a_schema_a_newer_release_migrated() {
    let db = test_db().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let newer = amplog_migrations::MIGRATIONS.last().unwrap().version + 1;
    sqlx::query("INSERT INTO amplog_migrations (version, name, checksum) VALUES ($1, 'from_the_future', 'x')")
        .bind(newer)
        .execute(&mut *conn)
        .await
        .unwrap();
    assert_eq!(amplog_migrations::migrate(&mut conn).await.unwrap(), 0);
    assert!(amplog_migrations::is_current(&mut conn).await.unwrap());
    sqlx::query("DELETE FROM amplog_migrations WHERE version = 7").execute(&mut *conn).await.unwrap();
    assert!(!amplog_migrations::is_current(&mut conn).await.unwrap(), "one of its own is missing");
}

/// Whether the pool's (only) connection is inside a transaction nobody ends: a `SAVEPOINT`
/// is refused outside a transaction block and accepted inside one.
async fn left_in_a_transaction(pool: &sqlx::PgPool) -> bool {
    match sqlx::query("SAVEPOINT leak_probe").execute(pool).await {
        Ok(_) => true,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("25P01") => false,
        Err(e) => panic!("probe: {e}"),
    }
}

/// Polls a future `polls` times, letting the connection's I/O move on between polls, and
/// then drops it: a caller that gives up (a client hanging up, a timeout) at that point.
async fn give_up_after<F: std::future::Future>(polls: usize, future: F) {
    let mut future = std::pin::pin!(future);
    for _ in 0..polls {
        if futures::poll!(future.as_mut()).is_ready() {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// A command or transaction abandoned at any point, `BEGIN`'s round trip included, leaves
/// its connection out of any transaction: otherwise the next borrower's statements run
/// inside it, and its snapshot holds back every log reader of the cluster.
#[tokio::test]
async fn a_command_cancelled_at_any_point_leaves_no_connection_in_a_transaction() {
    // One connection, so whatever an abandoned command leaves on it, the probe meets.
    let db = test_db_with(1).await;
    let service = db.service();
    let s = seed(&service).await;
    for polls in 0..100 {
        give_up_after(polls, async {
            let mut tx = amplog_log::tx::begin(&db.pool).await.unwrap();
            sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
        })
        .await;
        assert!(!left_in_a_transaction(&db.pool).await, "a bare transaction given up after {polls} polls");
        // Unkeyed: loads on a plain connection, then BEGIN on it.
        give_up_after(polls, service.request_operation(&s.ctx, s.installation, &read_of("contacts"))).await;
        assert!(!left_in_a_transaction(&db.pool).await, "an unkeyed command given up after {polls} polls");
        // Keyed: BEGIN first, for the idempotency key.
        let keyed = CommandContext { idempotency_key: Some(format!("cancel-{polls}")), ..s.ctx.clone() };
        give_up_after(polls, service.pause_installation(&keyed, s.installation)).await;
        assert!(!left_in_a_transaction(&db.pool).await, "a keyed command given up after {polls} polls");
    }
    // Whatever was given up committed whole or not at all: the log still verifies.
    let mut conn = db.pool.acquire().await.unwrap();
    let report = amplog_log::audit::verify(&mut conn, None, |_| {}).await.unwrap();
    assert!(report.is_intact(), "{report:?}");
}
