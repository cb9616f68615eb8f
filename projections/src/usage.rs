//! Billing: monthly rollups of `usage_daily` per project, computed when asked, so they are
//! always exactly the sum of the days the log produced.

use crate::ProjectionError;
use serde::Serialize;
use sqlx::{PgConnection, Row};
use std::collections::BTreeMap;
use uuid::Uuid;

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MonthlyUsage {
    /// `YYYY-MM`, UTC.
    pub month: String,
    pub records_read: i64,
    pub records_written: i64,
    pub bytes: i64,
    pub proxy_calls: i64,
    pub proxy_bytes: i64,
    /// Finished operations by `"<type>.<status>"`.
    pub operations: BTreeMap<String, i64>,
    /// Installations with any activity (records, proxy calls or operations) in the month.
    pub active_installations: i64,
}

/// The project's usage by month, oldest first.
pub async fn monthly(conn: &mut PgConnection, project_id: Uuid) -> Result<Vec<MonthlyUsage>, ProjectionError> {
    let rows = sqlx::query(
        "SELECT left(day, 7) AS month,
                sum((doc->>'records_read')::bigint)::bigint AS records_read,
                sum((doc->>'records_written')::bigint)::bigint AS records_written,
                sum((doc->>'bytes')::bigint)::bigint AS bytes,
                sum((doc->>'proxy_calls')::bigint)::bigint AS proxy_calls,
                coalesce(sum((doc->>'proxy_bytes')::bigint), 0)::bigint AS proxy_bytes,
                count(DISTINCT installation_id) FILTER (WHERE (doc->>'records_read')::bigint > 0
                    OR (doc->>'records_written')::bigint > 0 OR (doc->>'proxy_calls')::bigint > 0
                    OR doc->'operations' <> '{}'::jsonb) AS active
         FROM usage_daily WHERE project_id = $1 GROUP BY 1 ORDER BY 1",
    )
    .bind(project_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut months: Vec<MonthlyUsage> = rows
        .iter()
        .map(|r| MonthlyUsage {
            month: r.get("month"),
            records_read: r.get("records_read"),
            records_written: r.get("records_written"),
            bytes: r.get("bytes"),
            proxy_calls: r.get("proxy_calls"),
            proxy_bytes: r.get("proxy_bytes"),
            operations: BTreeMap::new(),
            active_installations: r.get("active"),
        })
        .collect();
    let ops = sqlx::query(
        "SELECT left(day, 7) AS month, kv.key, sum(kv.value::bigint)::bigint AS n
         FROM usage_daily, jsonb_each_text(doc->'operations') AS kv WHERE project_id = $1 GROUP BY 1, 2",
    )
    .bind(project_id)
    .fetch_all(&mut *conn)
    .await?;
    for r in ops {
        let month: String = r.get("month");
        if let Some(m) = months.iter_mut().find(|m| m.month == month) {
            m.operations.insert(r.get("key"), r.get("n"));
        }
    }
    Ok(months)
}
