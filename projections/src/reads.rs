//! One-statement reads: a tree of read-model fetches (installations, by id or by page,
//! with their connections and pages of their operations) rendered as one SQL statement and
//! sent, after the caller's tenancy settings, in one round trip. The API compiles its
//! common GraphQL queries into these.
//!
//! Values reach the SQL text as literals, since a simple query takes no parameters: UUIDs and
//! integers from typed values, text hex-encoded (`decode('…', 'hex')`), so nothing a
//! tenant sends can end a literal.

use crate::ProjectionError;
use sqlx::{PgConnection, Row};
use std::fmt::Write;
use uuid::Uuid;

/// The installations a root fetch selects.
#[derive(Clone, Debug, PartialEq)]
pub enum Installations {
    ById(Uuid),
    /// In key order after `after`, filtered, at most `limit`.
    Page {
        after: Option<Uuid>,
        integration_id: Option<Uuid>,
        group_ref: Option<String>,
        health: Option<String>,
        paused: Option<bool>,
        include_deleted: bool,
        limit: i64,
    },
}

/// A page of each selected installation's operations, newest first.
#[derive(Clone, Debug, PartialEq)]
pub struct OperationsPage {
    pub after: Option<Uuid>,
    pub status: Option<String>,
    pub op_type: Option<String>,
    pub limit: i64,
}

/// One root fetch and what is fetched under each installation it selects.
#[derive(Clone, Debug, PartialEq)]
pub struct InstallationRead {
    pub installations: Installations,
    pub connection: bool,
    pub operations: Vec<OperationsPage>,
}

/// A fetched document: the node of the plan it answers (roots first, then each root's
/// connection and operations pages in order), the installation it hangs under (for
/// operations), its key and the document.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub node: usize,
    pub parent: Option<String>,
    pub key: String,
    pub doc: String,
}

/// The node numbers of a root fetch's parts.
#[derive(Clone, Debug, PartialEq)]
pub struct Nodes {
    pub installations: usize,
    pub connection: Option<usize>,
    pub operations: Vec<usize>,
}

/// Numbers every fetch of `reads`, in the order `read` tags them.
pub fn nodes(reads: &[InstallationRead]) -> Vec<Nodes> {
    let mut next = 0;
    let mut take = || {
        next += 1;
        next - 1
    };
    reads
        .iter()
        .map(|r| Nodes {
            installations: take(),
            connection: r.connection.then(&mut take),
            operations: r.operations.iter().map(|_| take()).collect(),
        })
        .collect()
}

fn text(s: &str) -> String {
    format!("convert_from(decode('{}', 'hex'), 'UTF8')", hex::encode(s))
}

fn uuid_text(u: Uuid) -> String {
    format!("'{u}'")
}

/// The statement for `reads` of `project`.
pub fn statement(project: Uuid, reads: &[InstallationRead]) -> String {
    let p = uuid_text(project);
    let numbered = nodes(reads);
    let (mut ctes, mut selects) = (Vec::new(), Vec::new());
    for (read, nodes) in reads.iter().zip(&numbered) {
        let root = format!("n{}", nodes.installations);
        let selection = match &read.installations {
            Installations::ById(id) => {
                format!("SELECT key, doc FROM installations WHERE project_id = {p} AND key = {}", uuid_text(*id))
            }
            Installations::Page { after, integration_id, group_ref, health, paused, include_deleted, limit } => {
                let mut sql = format!("SELECT key, doc FROM installations WHERE project_id = {p}");
                if let Some(after) = after {
                    let _ = write!(sql, " AND key > {}", uuid_text(*after));
                }
                if let Some(integration) = integration_id {
                    let _ = write!(sql, " AND integration_id = {}", uuid_text(*integration));
                }
                if let Some(group) = group_ref {
                    let _ = write!(sql, " AND group_ref = {}", text(group));
                }
                if let Some(health) = health {
                    let _ = write!(sql, " AND health = {}", text(health));
                }
                if let Some(paused) = paused {
                    let _ = write!(sql, " AND paused = {paused}");
                }
                if !include_deleted {
                    sql.push_str(" AND (doc->>'deleted')::boolean IS NOT TRUE");
                }
                let _ = write!(sql, " ORDER BY key LIMIT {limit}");
                sql
            }
        };
        ctes.push(format!("{root} AS MATERIALIZED ({selection})"));
        selects.push(format!("SELECT {} AS node, NULL::text, key, doc::text FROM {root}", nodes.installations));
        if let Some(node) = nodes.connection {
            selects.push(format!(
                "SELECT {node}, NULL::text, key, doc::text FROM connections
                 WHERE project_id = {p} AND key IN (SELECT doc->>'connection_id' FROM {root})"
            ));
        }
        for (page, node) in read.operations.iter().zip(&nodes.operations) {
            let mut filter = String::new();
            if let Some(after) = page.after {
                let _ = write!(filter, " AND key < {}", uuid_text(after));
            }
            if let Some(status) = &page.status {
                let _ = write!(filter, " AND status = {}", text(status));
            }
            if let Some(op_type) = &page.op_type {
                let _ = write!(filter, " AND op_type = {}", text(op_type));
            }
            selects.push(format!(
                "SELECT {node}, i.key, o.key, o.doc::text FROM {root} i CROSS JOIN LATERAL (
                     SELECT key, doc FROM operations
                     WHERE project_id = {p} AND installation_id = i.key{filter}
                     ORDER BY key DESC LIMIT {}) o",
                page.limit
            ));
        }
    }
    format!("WITH {} {}", ctes.join(", "), selects.join(" UNION ALL "))
}

/// Runs `prefix` (the caller's tenancy settings, statements ending in `;`) and the reads in
/// one simple query: one round trip, one implicit transaction (the settings are local to it).
/// Rows come back unordered; every fetch is in `Fetched::node`.
pub async fn read(
    conn: &mut PgConnection,
    prefix: &str,
    project: Uuid,
    reads: &[InstallationRead],
) -> Result<Vec<Fetched>, ProjectionError> {
    let sql = format!("{prefix} {}", statement(project, reads));
    read_statement(conn, sql).await
}

/// A `&str` without arguments goes as a simple query (several statements in one message).
async fn read_statement(conn: &mut PgConnection, sql: String) -> Result<Vec<Fetched>, ProjectionError> {
    use sqlx::Executor;
    let rows = conn.fetch_all(sql.as_str()).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows.iter().filter(|r| r.try_column("node").is_ok()) {
        let node: i32 = row.try_get(0)?;
        out.push(Fetched { node: node as usize, parent: row.try_get(1)?, key: row.try_get(2)?, doc: row.try_get(3)? });
    }
    Ok(out)
}
