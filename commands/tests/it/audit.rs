//! Auditors: an installation's timeline, and hash chains that reveal any alteration.

use amplog_commands::testing::{read_of, seed, start_read, test_db};
use amplog_log::audit::{
    installation_history, installation_history_in, installation_streams, verify, BreakKind, HistoryRange,
};

#[tokio::test]
async fn history_is_the_installation_its_connection_and_its_operations_in_log_order() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let other = seed(&service).await;
    let (op, lease) = start_read(&service, &s, "contacts").await;
    service.request_operation(&other.ctx, other.installation, &read_of("contacts")).await.unwrap();
    service.record_refresh_failure(&s.ctx, s.connection, "invalid_grant").await.unwrap();
    service
        .fail_operation(&s.ctx, op, lease, amplog_domain::operation::ErrorClass::AuthInvalidated, "401", false)
        .await
        .unwrap();

    let mut conn = db.pool.acquire().await.unwrap();
    let history = installation_history(&mut conn, &s.installation.to_string()).await.unwrap();
    let got: Vec<(String, String)> = history.iter().map(|e| (e.aggregate_type.clone(), e.event_type.clone())).collect();
    let want = [
        ("connection", "Created"),
        ("installation", "Created"),
        ("installation", "OperationRequested"),
        ("operation", "Requested"),
        ("operation", "Started"),
        ("connection", "RefreshFailed"),
        ("operation", "Failed"),
    ];
    assert_eq!(got, want.map(|(a, b)| (a.to_string(), b.to_string())));
    assert!(history.windows(2).all(|w| w[0].cursor() < w[1].cursor()));
    assert!(history.iter().all(|e| e.project_id == Some(s.ctx.project_id.0)));
    assert!(history.iter().all(|e| e.metadata["actor"] == "test" && e.hash.as_ref().is_some_and(|h| h.len() == 32)));
    let streams = installation_streams(&mut conn, &s.installation.to_string()).await.unwrap();
    assert_eq!(streams.len(), 3);
    let report = verify(&mut conn, Some(&streams), |_| {}).await.unwrap();
    assert!(report.is_intact());
    assert_eq!((report.streams, report.events), (3, 7));
}

/// The timeline as a plain join of every stream of the installation, from `from` on.
async fn timeline(
    conn: &mut sqlx::PgConnection,
    id: &str,
    from: Option<chrono::DateTime<chrono::Utc>>,
) -> Vec<(i64, i64)> {
    sqlx::query_as(
        "WITH inst AS (SELECT event_type, payload FROM events WHERE aggregate_type = 'installation' AND aggregate_id = $1),
              streams AS (SELECT 'installation' AS t, $1 AS id
                          UNION SELECT 'connection', payload->>'connection_id' FROM inst WHERE event_type = 'Created'
                          UNION SELECT 'operation', payload->>'operation_id' FROM inst WHERE event_type = 'OperationRequested')
         SELECT transaction_id::text::bigint, position FROM events e JOIN streams s
             ON e.aggregate_type = s.t AND e.aggregate_id = s.id
         WHERE $2::timestamptz IS NULL OR e.recorded_at >= $2
         ORDER BY transaction_id, position",
    )
    .bind(id)
    .bind(from)
    .fetch_all(conn)
    .await
    .unwrap()
}

/// Paging by cursor returns exactly the timeline (checked against a plain join of every
/// stream), whatever the page size and time range: with a long read whose pages interleave
/// with hundreds of short operations after it (a page bound by a few operations holds too
/// few events, and is widened), and another installation's operations in between.
#[tokio::test]
async fn history_pages_by_cursor_are_exactly_the_timeline() {
    use amplog_domain::OperationId;
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let other = seed(&service).await;
    let (long, lease) = start_read(&service, &s, "contacts").await;
    let mut middle = None;
    for i in 0..300u64 {
        let outcome = service.request_operation(&s.ctx, s.installation, &read_of("deals")).await.unwrap();
        let op = OperationId(outcome.id_of("operation").unwrap());
        service.cancel_operation(&s.ctx, op, "test").await.unwrap();
        if i % 10 == 0 {
            let cursor = amplog_domain::operation::Cursor { watermark: None, page_token: Some(format!("p{i}")) };
            service.record_page(&s.ctx, long, lease, 1, 1, &cursor).await.unwrap();
            service.request_operation(&other.ctx, other.installation, &read_of("deals")).await.unwrap();
        }
        if i == 150 {
            middle = Some(chrono::Utc::now());
        }
    }
    service.succeed_operation(&s.ctx, long, lease).await.unwrap();

    let mut conn = db.pool.acquire().await.unwrap();
    let id = s.installation.to_string();
    let everything = timeline(&mut conn, &id, None).await;
    let after_middle = timeline(&mut conn, &id, middle).await;
    assert!(everything.len() > 900, "{} events", everything.len());
    let full = installation_history(&mut conn, &id).await.unwrap();
    let cursors = |events: &[amplog_log::RecordedEvent]| -> Vec<(i64, i64)> {
        events.iter().map(|e| (e.transaction_id as i64, e.position)).collect()
    };
    assert_eq!(cursors(&full), everything);
    for (limit, from, want) in [
        (1, None, &everything),
        (7, None, &everything),
        (100, None, &everything),
        (1000, None, &everything),
        (50, middle, &after_middle),
    ] {
        let mut range = HistoryRange { limit, from, ..HistoryRange::default() };
        let mut paged = Vec::new();
        loop {
            let page = installation_history_in(&mut conn, &id, range).await.unwrap();
            assert!(page.len() as i64 <= limit);
            paged.extend(cursors(&page));
            match page.last() {
                Some(last) if page.len() as i64 == limit => range.after = last.cursor(),
                _ => break,
            }
        }
        assert_eq!(&paged, want, "pages of {limit} from {from:?}");
    }
}

/// Alters the log as an attacker with table-owner rights would (triggers off).
async fn tamper(pool: &sqlx::PgPool, sql: &str, id: &str) {
    let mut tx = amplog_log::tx::begin(pool).await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut *tx).await.unwrap();
    sqlx::query(sql).bind(id).execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn verification_finds_an_altered_a_rehashed_and_a_removed_event() {
    let db = test_db().await;
    let service = db.service();
    let s = seed(&service).await;
    let (op, lease) = start_read(&service, &s, "contacts").await;
    for _ in 0..3 {
        service.record_page(&s.ctx, op, lease, 100, 0, &Default::default()).await.unwrap();
    }
    let op_id = op.to_string();
    let mut conn = db.pool.acquire().await.unwrap();
    assert!(verify(&mut conn, None, |_| {}).await.unwrap().is_intact());

    // 1. A payload changed in place: that event's hash no longer matches.
    tamper(&db.pool, "UPDATE events SET payload = replace(payload::text, '100', '10')::json WHERE aggregate_id = $1 AND sequence = 3", &op_id).await;
    let report = verify(&mut conn, None, |_| {}).await.unwrap();
    assert_eq!(report.breaks.len(), 1);
    assert_eq!((report.breaks[0].aggregate_id.as_str(), report.breaks[0].sequence), (op_id.as_str(), 3));
    assert!(matches!(report.breaks[0].kind, BreakKind::HashMismatch { .. }));

    // 2. The forger also recomputes that event's hash: the next event's link breaks.
    let row: (String, String, String, String, String, Option<Vec<u8>>) = sqlx::query_as(
        "SELECT event_type, event_version, payload::text, metadata::text, aggregate_id, prev_hash FROM events WHERE aggregate_id = $1 AND sequence = 3",
    )
    .bind(&op_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let forged = amplog_log::hash::chain(
        row.5.as_deref(),
        &amplog_log::hash::Canonical {
            aggregate_type: "operation",
            aggregate_id: &row.4,
            sequence: 3,
            event_type: &row.0,
            event_version: &row.1,
            payload: &row.2,
            metadata: &row.3,
        },
    );
    tamper(
        &db.pool,
        &format!("UPDATE events SET hash = '\\x{}' WHERE aggregate_id = $1 AND sequence = 3", hex::encode(forged)),
        &op_id,
    )
    .await;
    let report = verify(&mut conn, None, |_| {}).await.unwrap();
    assert_eq!(report.breaks.len(), 1);
    assert_eq!(report.breaks[0].sequence, 4);
    assert_eq!(report.breaks[0].kind, BreakKind::BrokenLink);

    // 3. An event removed: a gap and a broken link after it.
    tamper(&db.pool, "DELETE FROM events WHERE aggregate_id = $1 AND sequence = 4", &op_id).await;
    let kinds: Vec<(i64, BreakKind)> =
        verify(&mut conn, None, |_| {}).await.unwrap().breaks.into_iter().map(|b| (b.sequence, b.kind)).collect();
    assert_eq!(kinds, [(5, BreakKind::SequenceGap { expected: 4 }), (5, BreakKind::BrokenLink)]);
}
