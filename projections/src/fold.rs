//! The read-model fold: a batch of log events → changed documents, written with one upsert
//! per table. Documents a batch needs are fetched first (two rounds: what the events name,
//! then what those documents point to), folded in memory in log order, then flushed.

use crate::docs::*;
use crate::ProjectionError;
use amplog_domain::connection::{Connection, ConnectionEvent};
use amplog_domain::installation::{Installation, InstallationEvent};
use amplog_domain::integration::{Integration, IntegrationEvent};
use amplog_domain::operation::{Operation, OperationEvent, OperationType, Trigger};
use amplog_log::{EventStore, RecordedEvent};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::{PgConnection, Row};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// The read-model tables, by their base names.
pub const TABLES: &[&str] = &[
    "integrations",
    "installations",
    "connections",
    "operations",
    "read_states",
    "usage_daily",
    "installation_streams",
];

/// The names of one set of read-model tables: the live ones, or a rebuild's shadows.
#[derive(Clone, Debug)]
pub struct Tables {
    suffix: String,
}

impl Tables {
    pub fn live() -> Self {
        Self { suffix: String::new() }
    }

    pub fn shadow() -> Self {
        Self { suffix: "__rebuild".into() }
    }

    pub fn name(&self, base: &str) -> String {
        format!("{base}{}", self.suffix)
    }
}

/// One table's documents touched by a batch. `BTreeMap`s keep the write order stable.
struct Docs<D> {
    table: &'static str,
    rows: BTreeMap<String, (Uuid, D)>,
    dirty: BTreeSet<String>,
}

impl<D: Serialize + DeserializeOwned + Default + Clone> Docs<D> {
    fn new(table: &'static str) -> Self {
        Self { table, rows: BTreeMap::new(), dirty: BTreeSet::new() }
    }

    async fn fetch(
        &mut self,
        conn: &mut PgConnection,
        tables: &Tables,
        keys: BTreeSet<String>,
    ) -> Result<(), ProjectionError> {
        let missing: Vec<String> =
            keys.iter().map(|k| stored_key(k).into_owned()).filter(|k| !self.rows.contains_key(k)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let sql =
            format!("SELECT key, project_id, doc::text AS doc FROM {} WHERE key = ANY($1)", tables.name(self.table));
        for row in sqlx::query(&sql).bind(&missing).fetch_all(conn).await? {
            self.insert_row(&row)?;
        }
        Ok(())
    }

    fn insert_row(&mut self, row: &sqlx::postgres::PgRow) -> Result<(), ProjectionError> {
        let doc: String = row.get("doc");
        let doc = serde_json::from_str(&doc).map_err(|e| ProjectionError::Corrupt(format!("{}: {e}", self.table)))?;
        self.rows.insert(row.get("key"), (row.get("project_id"), doc));
        Ok(())
    }

    fn get(&mut self, key: &str) -> Option<&mut D> {
        let key = &*stored_key(key);
        let doc = self.rows.get_mut(key).map(|(_, d)| d)?;
        self.dirty.insert(key.to_string());
        Some(doc)
    }

    fn get_or_default(&mut self, key: &str, project_id: Uuid) -> &mut D {
        let key = &*stored_key(key);
        self.dirty.insert(key.to_string());
        &mut self.rows.entry(key.to_string()).or_insert_with(|| (project_id, D::default())).1
    }

    fn peek(&self, key: &str) -> Option<&D> {
        self.rows.get(&*stored_key(key)).map(|(_, d)| d)
    }

    async fn flush(&mut self, conn: &mut PgConnection, tables: &Tables) -> Result<(), ProjectionError> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let mut keys = Vec::with_capacity(self.dirty.len());
        let mut projects = Vec::with_capacity(self.dirty.len());
        let mut docs = Vec::with_capacity(self.dirty.len());
        for key in std::mem::take(&mut self.dirty) {
            let (project, doc) = &self.rows[&key];
            docs.push(jsonb_text(serde_json::to_string(doc).expect("documents serialise")));
            projects.push(*project);
            keys.push(key);
        }
        let sql = format!(
            "INSERT INTO {} (key, project_id, doc)
             SELECT k, p, d::jsonb FROM UNNEST($1::text[], $2::uuid[], $3::text[]) AS t(k, p, d)
             ON CONFLICT (key) DO UPDATE SET doc = EXCLUDED.doc",
            tables.name(self.table)
        );
        sqlx::query(&sql).bind(&keys).bind(&projects).bind(&docs).execute(conn).await?;
        Ok(())
    }
}

/// A read-model key as stored: text columns refuse U+0000, so it becomes U+FFFD (the log
/// may hold such text from before commands refused it; every event it holds must project).
fn stored_key(key: &str) -> std::borrow::Cow<'_, str> {
    if key.contains('\0') {
        key.replace('\0', "\u{FFFD}").into()
    } else {
        key.into()
    }
}

/// A document's JSON text as `jsonb` takes it: each escaped U+0000 (`\u0000`, as serde_json
/// writes it) becomes U+FFFD. An escaped backslash before `u0000` is left alone.
pub fn jsonb_text(json: String) -> String {
    if !json.contains("\\u0000") {
        return json;
    }
    let mut out = String::with_capacity(json.len());
    let mut rest = json.as_str();
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let escape = &rest[at..];
        if let Some(after) = escape.strip_prefix("\\u0000") {
            out.push_str("\\ufffd");
            rest = after;
        } else {
            // Any other escape is two characters (`\uXXXX` keeps its digits as text).
            let len = escape[1..].chars().next().map_or(1, |c| 1 + c.len_utf8());
            out.push_str(&escape[..len]);
            rest = &escape[len..];
        }
    }
    out.push_str(rest);
    out
}

enum Decoded {
    Integration(IntegrationEvent),
    Installation(InstallationEvent),
    Connection(ConnectionEvent),
    Operation(OperationEvent),
    Other,
}

/// What a batch changes, held until it is flushed.
pub struct Fold {
    integrations: Docs<IntegrationDoc>,
    installations: Docs<InstallationDoc>,
    connections: Docs<ConnectionDoc>,
    operations: Docs<OperationDoc>,
    read_states: Docs<ReadStateDoc>,
    usage: Docs<UsageDoc>,
    streams: Docs<StreamDoc>,
}

impl Default for Fold {
    fn default() -> Self {
        Self {
            integrations: Docs::new("integrations"),
            installations: Docs::new("installations"),
            connections: Docs::new("connections"),
            operations: Docs::new("operations"),
            read_states: Docs::new("read_states"),
            usage: Docs::new("usage_daily"),
            streams: Docs::new("installation_streams"),
        }
    }
}

fn name_of<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn at_of(event: &OperationEvent) -> DateTime<Utc> {
    use OperationEvent as E;
    match event {
        E::Requested { at, .. }
        | E::Started { at, .. }
        | E::PageRecorded { at, .. }
        | E::DeliveryAttempted { at, .. }
        | E::LeaseRenewed { at, .. }
        | E::LeaseReleased { at, .. }
        | E::Succeeded { at, .. }
        | E::Failed { at, .. }
        | E::Retried { at, .. }
        | E::DeadLetterReplayed { at, .. }
        | E::Proxied { at, .. }
        | E::Cancelled { at, .. } => *at,
    }
}

fn usage_key(installation: Uuid, at: DateTime<Utc>) -> String {
    format!("{installation}/{}", at.date_naive())
}

impl Fold {
    /// Folds `events` (in log order) into `tables` inside the caller's transaction.
    pub async fn apply_batch(
        conn: &mut PgConnection,
        tables: &Tables,
        store: &EventStore,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let decoded = events.iter().map(|e| decode(store, e)).collect::<Result<Vec<_>, _>>()?;
        let mut fold = Fold::default();
        fold.prefetch(conn, tables, events, &decoded).await?;
        for (event, decoded) in events.iter().zip(&decoded) {
            fold.apply(event, decoded);
        }
        fold.integrations.flush(conn, tables).await?;
        fold.installations.flush(conn, tables).await?;
        fold.connections.flush(conn, tables).await?;
        fold.operations.flush(conn, tables).await?;
        fold.read_states.flush(conn, tables).await?;
        fold.usage.flush(conn, tables).await?;
        fold.streams.flush(conn, tables).await?;
        Ok(())
    }

    async fn prefetch(
        &mut self,
        conn: &mut PgConnection,
        tables: &Tables,
        events: &[RecordedEvent],
        decoded: &[Decoded],
    ) -> Result<(), ProjectionError> {
        // Round 1: the documents the events name.
        let (mut inst, mut conns, mut ops) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        let mut integrations = BTreeSet::new();
        for (event, d) in events.iter().zip(decoded) {
            match d {
                Decoded::Integration(_) => {
                    integrations.insert(event.aggregate_id.clone());
                }
                Decoded::Installation(e) => {
                    inst.insert(event.aggregate_id.clone());
                    if let InstallationEvent::Created { connection_id, .. } = e {
                        conns.insert(connection_id.to_string());
                    }
                }
                Decoded::Connection(_) => {
                    conns.insert(event.aggregate_id.clone());
                }
                Decoded::Operation(_) => {
                    ops.insert(event.aggregate_id.clone());
                }
                Decoded::Other => {}
            }
        }
        self.integrations.fetch(conn, tables, integrations).await?;
        self.connections.fetch(conn, tables, conns.clone()).await?;
        self.operations.fetch(conn, tables, ops).await?;
        // Installations on a changed connection show its status.
        if !conns.is_empty() {
            let keys: Vec<String> = conns.into_iter().collect();
            let sql = format!(
                "SELECT key, project_id, doc::text AS doc FROM {} WHERE connection_id = ANY($1)",
                tables.name("installations")
            );
            for row in sqlx::query(&sql).bind(&keys).fetch_all(&mut *conn).await? {
                let key: String = row.get("key");
                if !self.installations.rows.contains_key(&key) {
                    self.installations.insert_row(&row)?;
                }
            }
        }
        // Round 2: what operations point to (their installation, read state, usage day).
        let (mut read_states, mut usage) = (BTreeSet::new(), BTreeSet::new());
        for (event, d) in events.iter().zip(decoded) {
            let (installation, object, op_type) = match d {
                Decoded::Operation(OperationEvent::Requested { installation_id, object, op_type, .. }) => {
                    (installation_id.0, object.clone(), name_of(op_type))
                }
                Decoded::Operation(OperationEvent::Proxied { installation_id, at, .. }) => {
                    usage.insert(usage_key(installation_id.0, *at));
                    continue;
                }
                Decoded::Operation(_) => match self.operations.peek(&event.aggregate_id) {
                    Some(op) => (op.installation_id, op.object.clone(), op.op_type.clone()),
                    None => continue,
                },
                // Only proxy requests count in usage when requested (reads and writes count
                // their pages and outcomes).
                Decoded::Installation(InstallationEvent::OperationRequested {
                    at,
                    op_type: OperationType::Proxy,
                    ..
                }) => {
                    usage.insert(usage_key(event.aggregate_id.parse().unwrap_or_default(), *at));
                    continue;
                }
                _ => continue,
            };
            inst.insert(installation.to_string());
            if op_type == "read" {
                read_states.insert(format!("{installation}/{object}"));
            }
            if let Decoded::Operation(e) = d {
                usage.insert(usage_key(installation, at_of(e)));
            }
        }
        self.installations.fetch(conn, tables, inst).await?;
        self.read_states.fetch(conn, tables, read_states).await?;
        self.usage.fetch(conn, tables, usage).await?;
        Ok(())
    }

    fn apply(&mut self, event: &RecordedEvent, decoded: &Decoded) {
        let project = event.project_id.unwrap_or_default();
        let id: Uuid = event.aggregate_id.parse().unwrap_or_default();
        match decoded {
            Decoded::Integration(e) => self.integration(project, id, e),
            Decoded::Installation(e) => self.installation(project, id, e),
            Decoded::Connection(e) => self.connection(project, id, e),
            Decoded::Operation(e) => {
                self.operation(project, id, e);
                if let Some(op) = self.operations.get(&event.aggregate_id) {
                    op.version = event.sequence;
                }
            }
            Decoded::Other => {}
        }
    }

    fn integration(&mut self, project: Uuid, id: Uuid, event: &IntegrationEvent) {
        let doc = self.integrations.get_or_default(&id.to_string(), project);
        match event {
            IntegrationEvent::Declared { name, provider, at, .. } => {
                *doc = IntegrationDoc {
                    integration_id: id,
                    project_id: project,
                    name: name.clone(),
                    provider: provider.clone(),
                    created_at: Some(*at),
                    updated_at: Some(*at),
                    ..IntegrationDoc::default()
                };
            }
            IntegrationEvent::RevisionDeployed { revision, objects, manifest_digest, at } => {
                doc.latest_revision = Some(*revision);
                doc.objects = objects.clone();
                doc.manifest_digest = Some(manifest_digest.clone());
                doc.updated_at = Some(*at);
            }
        }
    }

    fn stream(&mut self, project: Uuid, installation: Uuid, aggregate_type: &str, aggregate_id: Uuid) {
        let key = format!("{installation}/{aggregate_type}/{aggregate_id}");
        let doc = self.streams.get_or_default(&key, project);
        *doc = StreamDoc { installation_id: installation, aggregate_type: aggregate_type.into(), aggregate_id };
    }

    fn installation(&mut self, project: Uuid, id: Uuid, event: &InstallationEvent) {
        use InstallationEvent as E;
        let key = id.to_string();
        if let E::Created { integration_id, revision, group_ref, consumer_ref, connection_id, objects, at, .. } = event
        {
            let status =
                self.connections.peek(&connection_id.to_string()).map(|c| c.status.clone()).unwrap_or_default();
            let doc = self.installations.get_or_default(&key, project);
            *doc = InstallationDoc {
                installation_id: id,
                project_id: project,
                integration_id: integration_id.0,
                revision: *revision,
                group_ref: group_ref.clone(),
                consumer_ref: consumer_ref.clone(),
                connection_id: connection_id.0,
                connection_status: status,
                objects: objects.clone(),
                created_at: Some(*at),
                updated_at: Some(*at),
                ..InstallationDoc::default()
            };
            doc.refresh_health();
            self.stream(project, id, "installation", id);
            self.stream(project, id, "connection", connection_id.0);
            return;
        }
        if let E::OperationRequested { operation_id, op_type, at, .. } = event {
            self.stream(project, id, "operation", operation_id.0);
            if *op_type == OperationType::Proxy {
                let usage = self.usage_doc(project, id, *at);
                usage.proxy_calls += 1;
            }
        }
        let Some(doc) = self.installations.get(&key) else { return };
        match event {
            E::ConfigUpdated { revision, objects, at } => {
                doc.revision = *revision;
                doc.objects = objects.clone();
                doc.updated_at = Some(*at);
            }
            E::Paused { at } => {
                doc.paused = true;
                doc.updated_at = Some(*at);
            }
            E::Unpaused { at } => {
                doc.paused = false;
                doc.updated_at = Some(*at);
            }
            E::Deleted { at } => {
                doc.deleted = true;
                doc.updated_at = Some(*at);
            }
            E::OperationRequested { operation_id, op_type, object, at, .. } => {
                doc.last_operation = Some(LastOperation {
                    operation_id: operation_id.0,
                    op_type: name_of(op_type),
                    object: object.clone(),
                    status: "pending".into(),
                    at: *at,
                });
                doc.refresh_health();
            }
            E::Created { .. } => {}
        }
    }

    fn connection(&mut self, project: Uuid, id: Uuid, event: &ConnectionEvent) {
        use ConnectionEvent as E;
        let key = id.to_string();
        let doc = self.connections.get_or_default(&key, project);
        match event {
            E::Created { integration_id, provider, group_ref, credential, at, .. } => {
                *doc = ConnectionDoc {
                    connection_id: id,
                    project_id: project,
                    integration_id: integration_id.0,
                    provider: provider.clone(),
                    group_ref: group_ref.clone(),
                    status: "created".into(),
                    credential_fingerprint: credential.fingerprint.clone(),
                    created_at: Some(*at),
                    updated_at: Some(*at),
                    ..ConnectionDoc::default()
                }
            }
            E::TokenRefreshed { credential, at, .. } | E::Reconnected { credential, at } => {
                doc.status = "working".into();
                doc.credential_fingerprint = credential.fingerprint.clone();
                doc.last_refresh_at = Some(*at);
                doc.failure_reason = None;
                doc.updated_at = Some(*at);
            }
            E::RefreshFailed { reason, at } => {
                doc.status = "bad_credentials".into();
                doc.failure_reason = Some(reason.clone());
                doc.updated_at = Some(*at);
            }
            E::Revoked { at } => {
                doc.status = "revoked".into();
                doc.updated_at = Some(*at);
            }
        }
        let status = doc.status.clone();
        let affected: Vec<String> = self
            .installations
            .rows
            .iter()
            .filter(|(_, (_, i))| i.connection_id == id)
            .map(|(k, _)| k.clone())
            .collect();
        for key in affected {
            if let Some(inst) = self.installations.get(&key) {
                inst.connection_status = status.clone();
                inst.refresh_health();
            }
        }
    }

    fn usage_doc(&mut self, project: Uuid, installation: Uuid, at: DateTime<Utc>) -> &mut UsageDoc {
        let doc = self.usage.get_or_default(&usage_key(installation, at), project);
        doc.project_id = project;
        doc.installation_id = installation;
        doc.day = at.date_naive();
        doc
    }

    fn operation(&mut self, project: Uuid, id: Uuid, event: &OperationEvent) {
        use OperationEvent as E;
        let key = id.to_string();
        if let E::Requested { installation_id, op_type, object, since, until, trigger, at, .. } = event {
            *self.operations.get_or_default(&key, project) = OperationDoc {
                operation_id: id,
                project_id: project,
                installation_id: installation_id.0,
                op_type: name_of(op_type),
                object: object.clone(),
                trigger: name_of(trigger),
                since: *since,
                until: *until,
                status: "pending".into(),
                requested_at: Some(*at),
                ..OperationDoc::default()
            };
            if *op_type == OperationType::Read {
                let state = self.read_states.get_or_default(&format!("{installation_id}/{object}"), project);
                if state.mode.is_empty() {
                    *state = ReadStateDoc {
                        installation_id: installation_id.0,
                        object: object.clone(),
                        mode: if *trigger == Trigger::Backfill { "backfill" } else { "incremental" }.into(),
                        ..ReadStateDoc::default()
                    };
                }
            }
            return;
        }
        if let E::Proxied { installation_id, call, at, .. } = event {
            let status = if call.error_class.is_some() { "failed" } else { "succeeded" };
            let took = chrono::TimeDelta::milliseconds(call.duration_ms.min(86_400_000) as i64);
            let started = at.checked_sub_signed(took).unwrap_or(*at);
            *self.operations.get_or_default(&key, project) = OperationDoc {
                operation_id: id,
                project_id: project,
                installation_id: installation_id.0,
                op_type: "proxy".into(),
                object: format!("{} {}", call.method, call.path),
                trigger: "triggered".into(),
                status: status.into(),
                attempts: 1,
                bytes: call.request_bytes + call.response_bytes,
                error_class: call.error_class.as_ref().map(name_of),
                error_message: call.status.filter(|_| call.error_class.is_some()).map(|s| format!("HTTP {s}")),
                http_status: call.status,
                requested_at: Some(started),
                started_at: Some(started),
                finished_at: Some(*at),
                duration_ms: Some(took.num_milliseconds()),
                ..OperationDoc::default()
            };
            self.stream(project, installation_id.0, "operation", id);
            let usage = self.usage_doc(project, installation_id.0, *at);
            usage.proxy_calls += 1;
            usage.proxy_bytes += call.request_bytes + call.response_bytes;
            *usage.operations.entry(format!("proxy.{status}")).or_default() += 1;
            return;
        }
        let Some(op) = self.operations.get(&key) else { return };
        let at = at_of(event);
        let mut finished = None;
        match event {
            E::Requested { .. } => {}
            E::Started { attempt, .. } => {
                op.status = "running".into();
                op.attempts = *attempt;
                op.started_at.get_or_insert(at);
            }
            E::PageRecorded { records, bytes, .. } => {
                op.pages += 1;
                op.records += records;
                op.bytes += bytes;
            }
            E::DeliveryAttempted { delivery, .. } => {
                op.delivery_attempts += 1;
                if !delivery.delivered {
                    op.delivery_failures += 1;
                }
            }
            E::LeaseRenewed { .. } | E::LeaseReleased { .. } => {}
            E::Succeeded { .. } => finished = Some("succeeded"),
            E::Failed { error_class, message, retryable, .. } => {
                op.error_class = Some(name_of(error_class));
                op.error_message = Some(message.clone());
                // Retryable and failed: it failed after all its attempts.
                op.dead_lettered = *retryable;
                finished = Some("failed");
            }
            E::Retried { .. } | E::DeadLetterReplayed { .. } => {
                op.status = "pending".into();
                op.finished_at = None;
                op.duration_ms = None;
                op.dead_lettered = false;
            }
            E::Proxied { .. } => {}
            E::Cancelled { .. } => finished = Some("cancelled"),
        }
        if let Some(status) = finished {
            op.status = status.into();
            op.finished_at = Some(at);
            op.duration_ms = op.started_at.map(|s| (at - s).num_milliseconds());
        }
        let (installation, object, op_type, status) =
            (op.installation_id, op.object.clone(), op.op_type.clone(), op.status.clone());

        if let E::PageRecorded { records, bytes, cursor, reread, .. } = event {
            // What is new: records read again (an incremental read's overlap) are not
            // counted twice.
            let new = records - reread.min(records);
            if op_type == "read" {
                if let Some(state) = self.read_states.get(&format!("{installation}/{object}")) {
                    if cursor.watermark.is_some() {
                        state.watermark = cursor.watermark;
                    }
                    state.page_token = cursor.page_token.clone();
                    state.records_read += new;
                }
            }
            let usage = self.usage_doc(project, installation, at);
            if op_type == "write" {
                usage.records_written += records;
            } else {
                usage.records_read += new;
            }
            usage.bytes += bytes;
        }
        if let Some(status) = finished {
            *self.usage_doc(project, installation, at).operations.entry(format!("{op_type}.{status}")).or_default() +=
                1;
            if status == "succeeded" && op_type == "read" {
                if let Some(state) = self.read_states.get(&format!("{installation}/{object}")) {
                    state.mode = "incremental".into();
                    state.page_token = None;
                    state.last_success_at = Some(at);
                }
            }
        }
        let Some(inst) = self.installations.get(&installation.to_string()) else { return };
        if inst.last_operation.as_ref().is_some_and(|l| l.operation_id == id) {
            if let Some(last) = inst.last_operation.as_mut() {
                last.status = status.clone();
                last.at = at;
            }
        }
        if finished == Some("succeeded") && op_type == "read" {
            inst.last_successful_read.insert(object, at);
        }
        inst.refresh_health();
    }
}

fn decode(store: &EventStore, event: &RecordedEvent) -> Result<Decoded, ProjectionError> {
    let payload = event.payload.clone();
    Ok(match event.aggregate_type.as_str() {
        "integration" => {
            Decoded::Integration(store.decode::<Integration>(&event.event_type, &event.event_version, payload)?)
        }
        "installation" => {
            Decoded::Installation(store.decode::<Installation>(&event.event_type, &event.event_version, payload)?)
        }
        "connection" => {
            Decoded::Connection(store.decode::<Connection>(&event.event_type, &event.event_version, payload)?)
        }
        "operation" => {
            Decoded::Operation(store.decode::<Operation>(&event.event_type, &event.event_version, payload)?)
        }
        _ => Decoded::Other,
    })
}
