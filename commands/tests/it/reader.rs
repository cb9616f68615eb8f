//! The log reader never skips an event (DESIGN invariant 3), against a real PostgreSQL.

use amplog_commands::testing::CommitGate;
use amplog_commands::testing::{credential_store, test_db_with};
use amplog_commands::{CommandContext, CommandError, CommandOutcome, CommandService};
use amplog_domain::ProjectId;
use amplog_log::{EventStore, LogCursor, LogReader, RecordedEvent, Subscription};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Reads until `want` events arrived or nothing came for `quiet`.
async fn read_until(sub: &mut Subscription, seen: &mut Vec<RecordedEvent>, want: usize, quiet: Duration) {
    while seen.len() < want {
        let batch = sub.next_batch_within(quiet).await.unwrap();
        if batch.is_empty() {
            break;
        }
        seen.extend(batch);
    }
}

async fn all_event_ids(pool: &sqlx::PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT event_id FROM events ORDER BY transaction_id, position").fetch_all(pool).await.unwrap()
}

fn assert_once_in_order(seen: &[RecordedEvent], expected: &[Uuid]) {
    let ids: Vec<Uuid> = seen.iter().map(|e| e.event_id).collect();
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no event is delivered twice");
    assert_eq!(ids, expected, "exactly the committed events, in (transaction_id, position) order");
    assert!(seen.windows(2).all(|w| w[0].cursor() < w[1].cursor()));
}

fn project() -> CommandContext {
    CommandContext::new(ProjectId(Uuid::now_v7()), "reader-test")
}

/// An append held open after its INSERT, before COMMIT (release it through the gate), and
/// a service whose appends commit at once.
async fn append_held_open(
    pool: &sqlx::PgPool,
) -> (CommandService, Arc<CommitGate>, tokio::task::JoinHandle<Result<CommandOutcome, CommandError>>) {
    let fast = CommandService::new(pool.clone(), EventStore::default(), credential_store());
    let gate = Arc::new(CommitGate::default());
    let slow =
        CommandService::new(pool.clone(), EventStore::default(), credential_store()).with_commit_gate(gate.clone());
    let ctx = project().with_idempotency_key("held"); // a keyed command runs in a transaction
    let held = tokio::spawn(async move { slow.create_project(&ctx, "held").await });
    gate.reached.notified().await;
    (fast, gate, held)
}

#[tokio::test]
async fn an_append_held_open_while_1000_later_appends_commit_is_still_delivered() {
    let db = test_db_with(24).await;
    let reader = LogReader::new(db.pool.clone());
    let mut sub = reader.subscribe(LogCursor::default()).await.unwrap();
    let (fast, gate, held) = append_held_open(&db.pool).await;

    // 1,000 later appends commit, 8 at a time.
    let mut writers = Vec::new();
    for w in 0..8 {
        let fast = fast.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..125 {
                fast.create_project(&project(), &format!("later-{w}-{i}")).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let committed_later: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&db.pool).await.unwrap();
    assert_eq!(committed_later, 1000);

    // While the held append is open, the reader delivers nothing past it...
    let mut seen = Vec::new();
    read_until(&mut sub, &mut seen, 1, Duration::from_millis(700)).await;
    assert!(seen.is_empty(), "the reader must wait for the held transaction, got {} events", seen.len());

    // ...although a reader by position alone would already have passed it.
    gate.release.add_permits(1);
    let outcome = held.await.unwrap().unwrap();
    let held_position = outcome.events[0].position;
    let max_position: i64 = sqlx::query_scalar("SELECT max(position) FROM events").fetch_one(&db.pool).await.unwrap();
    assert!(held_position < max_position, "the held event has an early position ({held_position} < {max_position})");

    read_until(&mut sub, &mut seen, 1001, Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 1001);
    assert!(seen.iter().any(|e| e.event_id == outcome.events[0].event_id), "the held event is delivered");
    assert_once_in_order(&seen, &all_event_ids(&db.pool).await);
    // Nothing more arrives.
    assert!(sub.next_batch_within(Duration::from_millis(300)).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_catch_up_ends_only_after_reading_an_append_held_open_below_its_end() {
    let db = test_db_with(16).await;
    let (fast, gate, held) = append_held_open(&db.pool).await;
    for i in 0..50 {
        fast.create_project(&project(), &format!("later-{i}")).await.unwrap();
    }

    // The catch-up's end is the last of the later appends: the held one is below it.
    let mut log = LogReader::new(db.pool.clone()).catch_up(LogCursor::default(), 20).await.unwrap();
    let reading = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(batch) = log.next().await.unwrap() {
            seen.extend(batch);
        }
        (seen, log.cursor())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!reading.is_finished(), "the catch-up must not end while an event below its end is uncommitted");

    gate.release.add_permits(1);
    let outcome = held.await.unwrap().unwrap();
    let (seen, cursor) = reading.await.unwrap();
    assert_eq!(seen.len(), 51);
    assert!(seen.iter().any(|e| e.event_id == outcome.events[0].event_id), "the held event is read");
    assert_once_in_order(&seen, &all_event_ids(&db.pool).await);
    assert_eq!(cursor, seen.last().unwrap().cursor(), "the cursor stands after the last event read");
}

#[tokio::test]
async fn a_rolled_back_append_does_not_stall_the_reader() {
    let db = test_db_with(16).await;
    let service = CommandService::new(db.pool.clone(), EventStore::default(), credential_store());
    let reader = LogReader::new(db.pool.clone());
    let mut sub = reader.subscribe(LogCursor::default()).await.unwrap();

    let mut doomed = amplog_log::tx::begin(&db.pool).await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('project', 'doomed', 1, 'Created', '1.0', '{\"name\":\"doomed\",\"at\":\"2026-01-01T00:00:00Z\"}', '{}')",
    )
    .execute(&mut *doomed)
    .await
    .unwrap();
    for i in 0..100 {
        service.create_project(&project(), &format!("p{i}")).await.unwrap();
    }
    doomed.rollback().await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut sub, &mut seen, 100, Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 100);
    assert!(seen.iter().all(|e| e.aggregate_id != "doomed"));
    assert_once_in_order(&seen, &all_event_ids(&db.pool).await);
    // And it keeps going.
    service.create_project(&project(), "after").await.unwrap();
    read_until(&mut sub, &mut seen, 101, Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 101);
}

#[tokio::test]
async fn with_32_concurrent_writers_the_reader_sees_exactly_the_committed_set() {
    let db = test_db_with(48).await;
    let service = CommandService::new(db.pool.clone(), EventStore::default(), credential_store());
    let reader = LogReader::new(db.pool.clone());
    let mut sub = reader.subscribe(LogCursor::default()).await.unwrap();
    sub.batch_size = 97; // an odd batch size, so batches end mid-transaction-group
    let collector = tokio::spawn(async move {
        let mut seen = Vec::new();
        read_until(&mut sub, &mut seen, 32 * 35, Duration::from_secs(10)).await;
        seen
    });
    let mut writers = Vec::new();
    for _ in 0..32 {
        let service = service.clone();
        writers.push(tokio::spawn(async move {
            let ctx = project();
            service.create_project(&ctx, "first").await.unwrap();
            for i in 1..40 {
                // Some commands fail (renaming to an invalid name) and append nothing.
                let name = if i % 7 == 0 { String::new() } else { format!("name-{i}") };
                let _ = service.rename_project(&ctx, &name).await;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let committed = all_event_ids(&db.pool).await;
    let seen = collector.await.unwrap();
    assert_eq!(committed.len(), 32 * (40 - 5));
    assert_once_in_order(&seen, &committed);
}

/// Burns transaction ids (subtransactions with a write each) until the next one is `target`.
async fn burn_xids_until(pool: &sqlx::PgPool, target: i64) {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql("CREATE TEMP TABLE IF NOT EXISTS burn (x int)").execute(&mut *conn).await.unwrap();
    loop {
        let next: i64 =
            sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint").fetch_one(&mut *conn).await.unwrap();
        let left = target - next - 1;
        if left <= 0 {
            return;
        }
        let chunk = left.min(200_000);
        sqlx::raw_sql(&format!(
            "DO $$ BEGIN FOR i IN 1..{chunk} LOOP BEGIN INSERT INTO burn VALUES (i); EXCEPTION WHEN others THEN NULL; END; END LOOP; END $$"
        ))
        .execute(&mut *conn)
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn log_order_holds_across_a_transaction_id_digit_boundary() {
    // Transaction ids compared as text would put 100000 before 99999; make the log cross
    // such a boundary and read it back in small batches.
    let db = test_db_with(8).await;
    let service = CommandService::new(db.pool.clone(), EventStore::default(), credential_store());
    let now: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint").fetch_one(&db.pool).await.unwrap();
    let boundary = 10i64.pow((now + 100).to_string().len() as u32);
    assert!(boundary - now < 5_000_000, "the test cluster must be fresh (scripts/test starts one): its transaction ids are too large to burn up to the next digit boundary");
    burn_xids_until(&db.pool, boundary - 30).await;
    for i in 0..60 {
        service.create_project(&project(), &format!("p{i}")).await.unwrap();
    }
    let xids: Vec<String> =
        sqlx::query_scalar("SELECT transaction_id::text AS xid FROM events ORDER BY transaction_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(xids.first().unwrap().len() < xids.last().unwrap().len(), "the log crosses a digit boundary: {xids:?}");

    let reader = LogReader::new(db.pool.clone());
    let mut sub = reader.subscribe(LogCursor::default()).await.unwrap();
    sub.batch_size = 7;
    let mut seen = Vec::new();
    read_until(&mut sub, &mut seen, 60, Duration::from_secs(5)).await;
    assert_once_in_order(&seen, &all_event_ids(&db.pool).await);
}

#[tokio::test]
async fn a_read_cancelled_half_way_leaves_its_connection_usable() {
    // One connection, so whatever a cancelled read leaves on it, the next query meets.
    let db = test_db_with(1).await;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT 'installation', 'i' || g, 1, 'Created', '1.0', '{\"name\":\"x\"}', '{}' FROM generate_series(1, 20000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let reader = LogReader::new(db.pool.clone());
    // Another test's transaction, begun before the insert, can hold the cluster's xmin below
    // it for a while: a catch-up waits that out, and then every read sees all the rows.
    let visible = reader.catch_up(LogCursor::default(), 20_000).await.unwrap().rest_stored().await.unwrap();
    assert_eq!(visible.len(), 20_000);
    let mut cancelled = 0;
    for wait in (0..40).map(|i| Duration::from_micros(250 * i)) {
        match tokio::time::timeout(wait, reader.read_stored_batch(LogCursor::default(), 20_000)).await {
            Ok(batch) => assert_eq!(batch.unwrap().len(), 20_000),
            Err(_) => cancelled += 1,
        }
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&db.pool).await.unwrap();
        assert_eq!(count, 20_000);
    }
    assert!(cancelled > 0, "some reads were cancelled part-way");
    let batch = reader.catch_up(LogCursor::default(), 20_000).await.unwrap().next().await.unwrap().unwrap();
    assert_eq!(batch.len(), 20_000);
    assert_eq!(batch[19_999].payload, serde_json::json!({"name": "x"}));
}
