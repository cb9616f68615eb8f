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

/// A statement's values: in place (literals), or as parameters of a prepared statement
/// (their types and literals kept apart).
struct Values {
    prepared: bool,
    types: Vec<&'static str>,
    literals: Vec<String>,
}

impl Values {
    fn add(&mut self, ty: &'static str, literal: String) -> String {
        if !self.prepared {
            return literal;
        }
        self.types.push(ty);
        self.literals.push(literal);
        format!("${}", self.types.len())
    }
}

/// The statement for `reads` of `project`: with its values in place, or (`prepared`) with
/// parameters, their types and their literals.
fn statement(project: Uuid, reads: &[InstallationRead], prepared: bool) -> (String, Values) {
    let mut v = Values { prepared, types: Vec::new(), literals: Vec::new() };
    let p = v.add("uuid", uuid_text(project));
    let numbered = nodes(reads);
    let (mut ctes, mut selects) = (Vec::new(), Vec::new());
    for (read, nodes) in reads.iter().zip(&numbered) {
        let root = format!("n{}", nodes.installations);
        let selection = match &read.installations {
            Installations::ById(id) => {
                let id = v.add("text", uuid_text(*id));
                format!("SELECT key, doc FROM installations WHERE project_id = {p} AND key = {id}")
            }
            Installations::Page { after, integration_id, group_ref, health, paused, include_deleted, limit } => {
                let mut sql = format!("SELECT key, doc FROM installations WHERE project_id = {p}");
                if let Some(after) = after {
                    let _ = write!(sql, " AND key > {}", v.add("text", uuid_text(*after)));
                }
                if let Some(integration) = integration_id {
                    let _ = write!(sql, " AND integration_id = {}", v.add("text", uuid_text(*integration)));
                }
                if let Some(group) = group_ref {
                    let _ = write!(sql, " AND group_ref = {}", v.add("text", text(group)));
                }
                if let Some(health) = health {
                    let _ = write!(sql, " AND health = {}", v.add("text", text(health)));
                }
                if let Some(paused) = paused {
                    let _ = write!(sql, " AND paused = {}", v.add("boolean", paused.to_string()));
                }
                if !include_deleted {
                    sql.push_str(" AND (doc->>'deleted')::boolean IS NOT TRUE");
                }
                let _ = write!(sql, " ORDER BY key LIMIT {}", v.add("int8", limit.to_string()));
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
                let _ = write!(filter, " AND key < {}", v.add("text", uuid_text(after)));
            }
            if let Some(status) = &page.status {
                let _ = write!(filter, " AND status = {}", v.add("text", text(status)));
            }
            if let Some(op_type) = &page.op_type {
                let _ = write!(filter, " AND op_type = {}", v.add("text", text(op_type)));
            }
            let limit = v.add("int8", page.limit.to_string());
            selects.push(format!(
                "SELECT {node}, i.key, o.key, o.doc::text FROM {root} i CROSS JOIN LATERAL (
                     SELECT key, doc FROM operations
                     WHERE project_id = {p} AND installation_id = i.key{filter}
                     ORDER BY key DESC LIMIT {limit}) o"
            ));
        }
    }
    (format!("WITH {} {}", ctes.join(", "), selects.join(" UNION ALL ")), v)
}

/// Statement shapes prepared on the pool's connections, at most `MAX_PREPARED` (a tenant
/// choosing shapes must not grow every session's memory without bound); beyond them a
/// statement is sent with its values in place, planned each time.
static PREPARED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<u64>>> =
    std::sync::LazyLock::new(Default::default);
const MAX_PREPARED: usize = 256;

fn may_prepare(shape: u64) -> bool {
    let mut prepared = PREPARED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    prepared.contains(&shape) || (prepared.len() < MAX_PREPARED && prepared.insert(shape))
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
    use std::hash::{Hash, Hasher};
    let (template, values) = statement(project, reads, true);
    let mut hasher = std::hash::DefaultHasher::new();
    template.hash(&mut hasher);
    let shape = hasher.finish();
    if !may_prepare(shape) {
        return read_statement(conn, format!("{prefix} {}", statement(project, reads, false).0)).await;
    }
    // Prepared once per connection (the first EXECUTE on a connection without it fails
    // alone, before anything is read), planned by PostgreSQL's plan cache after that.
    let name = format!("amplog_read_{shape:016x}");
    let execute = format!("{prefix} EXECUTE {name}({});", values.literals.join(", "));
    match read_statement(conn, execute.clone()).await {
        Err(ProjectionError::Database(sqlx::Error::Database(e))) if e.code().as_deref() == Some("26000") => {
            use sqlx::Executor;
            conn.execute(format!("PREPARE {name}({}) AS {template}", values.types.join(", ")).as_str()).await?;
            read_statement(conn, execute).await
        }
        read => read,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The prepared statement with its literals put back is the statement sent in place.
    #[test]
    fn prepared_and_in_place_statements_agree() {
        let reads = [
            InstallationRead {
                installations: Installations::ById(Uuid::now_v7()),
                connection: true,
                operations: vec![
                    OperationsPage { after: None, status: None, op_type: None, limit: 11 },
                    OperationsPage {
                        after: Some(Uuid::now_v7()),
                        status: Some("fa'iled".into()),
                        op_type: None,
                        limit: 3,
                    },
                ],
            },
            InstallationRead {
                installations: Installations::Page {
                    after: Some(Uuid::now_v7()),
                    integration_id: Some(Uuid::now_v7()),
                    group_ref: Some("g'); DROP TABLE events; --".into()),
                    health: Some("healthy".into()),
                    paused: Some(false),
                    include_deleted: false,
                    limit: 51,
                },
                connection: false,
                operations: vec![],
            },
        ];
        let project = Uuid::now_v7();
        let (template, values) = statement(project, &reads, true);
        let (in_place, _) = statement(project, &reads, false);
        let mut filled = template.clone();
        for (i, literal) in values.literals.iter().enumerate().rev() {
            filled = filled.replace(&format!("${}", i + 1), literal);
        }
        assert_eq!(filled, in_place);
        assert_eq!(values.types.len(), values.literals.len());
        assert!(!in_place.contains("DROP TABLE"), "tenant text reaches the statement hex-encoded only");
    }
}
