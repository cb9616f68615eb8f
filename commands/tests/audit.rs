//! Auditors: an installation's timeline, and hash chains that reveal any alteration.

use amplog_commands::audit::{installation_history, installation_streams, verify, BreakKind};
use amplog_commands::testing::{read_of, seed, start_read, test_db};

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

/// Alters the log as an attacker with table-owner rights would (triggers off).
async fn tamper(pool: &sqlx::PgPool, sql: &str, id: &str) {
    let mut tx = pool.begin().await.unwrap();
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
    let forged = amplog_commands::hash::chain(
        row.5.as_deref(),
        &amplog_commands::hash::Canonical {
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
