//! Loading and appending streams. Appends go around postgres-es (one INSERT per event, no
//! hash chain, no idempotency in the transaction) with one multi-row INSERT per command;
//! snapshots go around cqrs-es's snapshot store (it applies events twice).

use crate::hash::{self, Canonical};
use crate::LogError;
use amplog_domain::upcast::UPCASTERS;
use amplog_domain::{Aggregate, DomainEvent, EventParts};
use cqrs_es::persist::{EventUpcaster, SemanticVersionEventUpcaster, SerializedEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, Row};
use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

/// A stream as loaded: the folded state, the last sequence and the chain head.
#[derive(Clone, Debug)]
pub struct Loaded<A: Aggregate> {
    pub id: String,
    pub state: A,
    pub sequence: i64,
    pub hash: Option<Vec<u8>>,
}

/// One appended event, as returned to the caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendedEvent {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub position: i64,
    /// With `position`, the event's place in log order (see `LogCursor`).
    #[serde(default)]
    pub transaction_id: u64,
    pub hash: String,
}

/// What a command appended. `replayed` is true when an idempotency key returned the first
/// result of an earlier, identical request, and nothing was appended this time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutcome {
    pub events: Vec<AppendedEvent>,
    #[serde(default)]
    pub replayed: bool,
}

impl CommandOutcome {
    /// The log position of the last event, for read-your-writes.
    pub fn last_position(&self) -> Option<i64> {
        self.events.iter().map(|e| e.position).max()
    }

    /// The log cursor of the last event, for read-your-writes: a reader whose checkpoint
    /// is at or past it has seen every event of this command.
    pub fn last_cursor(&self) -> Option<crate::LogCursor> {
        self.events.iter().map(|e| crate::LogCursor { transaction_id: e.transaction_id, position: e.position }).max()
    }

    /// The id of the first stream of `aggregate_type` the command wrote to.
    pub fn id_of(&self, aggregate_type: &str) -> Option<Uuid> {
        self.events.iter().find(|e| e.aggregate_type == aggregate_type).and_then(|e| e.aggregate_id.parse().ok())
    }
}

/// Events decided for one stream, not yet written.
#[derive(Clone)]
pub struct PendingStream {
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    pub base_sequence: i64,
    pub base_hash: Option<Vec<u8>>,
    pub events: Vec<EventParts>,
    /// `(snapshot_version, state json)` when this append crosses a snapshot boundary.
    pub snapshot: Option<(i32, String)>,
    /// The state after these events, for the cache once they are committed.
    pub state: Arc<dyn Any + Send + Sync>,
}

/// A committed state of a stream: valid at `sequence` forever, since the log only grows.
struct Cached {
    sequence: i64,
    hash: Option<Vec<u8>>,
    state: Arc<dyn Any + Send + Sync>,
}

/// An upcaster and the version it lifts to.
type Upcasting = (Box<dyn EventUpcaster>, &'static str);

/// Reads streams and writes decided events. Cheap to clone.
#[derive(Clone)]
pub struct EventStore {
    /// By aggregate type, in the order they apply, each with the version it lifts to as
    /// declared (cqrs-es's upcaster reports "2.0" as "2.0.0").
    upcasters: Arc<HashMap<&'static str, Vec<Upcasting>>>,
    /// Committed states by stream, so a load reads only the events after them (usually
    /// none). Entries are only ever committed states, so a stale one costs a longer tail,
    /// never a wrong decision: the optimistic append still checks the sequence.
    cache: moka::sync::Cache<(&'static str, String), Arc<Cached>>,
    /// A snapshot is written each time a stream's sequence crosses a multiple of this.
    pub snapshot_every: i64,
}

impl Default for EventStore {
    fn default() -> Self {
        Self::new(100)
    }
}

impl EventStore {
    pub fn new(snapshot_every: i64) -> Self {
        let mut upcasters: HashMap<&'static str, Vec<Upcasting>> = HashMap::new();
        for u in UPCASTERS {
            let f = u.upcast;
            let upcaster = SemanticVersionEventUpcaster::new(u.event_type, u.to_version, Box::new(f));
            upcasters.entry(u.aggregate_type).or_default().push((Box::new(upcaster), u.to_version));
        }
        Self {
            upcasters: Arc::new(upcasters),
            cache: moka::sync::Cache::new(100_000),
            snapshot_every: snapshot_every.max(1),
        }
    }

    /// Whether an upcaster changes events of this type and version (else `upcast` returns
    /// the payload as it is, and its stored text can be passed on unparsed).
    pub fn upcasts(&self, aggregate_type: &str, event_type: &str, event_version: &str) -> bool {
        self.upcasters
            .get(aggregate_type)
            .is_some_and(|list| list.iter().any(|(u, _)| u.can_upcast(event_type, event_version)))
    }

    /// Lifts a stored event to the current version of its type.
    pub fn upcast(
        &self,
        aggregate_type: &str,
        event_type: &str,
        event_version: &str,
        payload: Value,
    ) -> (String, Value) {
        if !self.upcasts(aggregate_type, event_type, event_version) {
            return (event_version.to_string(), payload);
        }
        let list = &self.upcasters[aggregate_type];
        let mut event = SerializedEvent::new(
            String::new(),
            0,
            aggregate_type.to_string(),
            event_type.to_string(),
            event_version.to_string(),
            payload,
            Value::Null,
        );
        let mut version = event_version;
        for (upcaster, to_version) in list {
            if upcaster.can_upcast(&event.event_type, &event.event_version) {
                event = upcaster.upcast(event);
                version = to_version;
            }
        }
        (version.to_string(), event.payload)
    }

    /// Decodes one stored event of `A` (upcasting first).
    pub fn decode<A: Aggregate>(
        &self,
        event_type: &str,
        event_version: &str,
        payload: Value,
    ) -> Result<A::Event, LogError> {
        let (_, payload) = self.upcast(A::TYPE, event_type, event_version, payload);
        A::Event::from_parts(event_type, payload)
            .map_err(|e| LogError::corrupt(format!("{} event {event_type} {event_version}", A::TYPE), e))
    }

    /// Loads a stream: from the cache or its snapshot (if current), then the events after.
    pub async fn load<A: Aggregate>(&self, conn: &mut PgConnection, id: &str) -> Result<Loaded<A>, LogError> {
        let mut loaded = Loaded { id: id.to_string(), state: A::default(), sequence: 0, hash: None };
        let cached = self.cache.get(&(A::TYPE, id.to_string()));
        let cached = cached.as_ref().and_then(|c| Some((c, c.state.downcast_ref::<A>()?)));
        let rows = if let Some((entry, state)) = cached {
            loaded.state = state.clone();
            loaded.sequence = entry.sequence;
            loaded.hash = entry.hash.clone();
            sqlx::query(
                "SELECT 1 AS kind, sequence, event_type, event_version, payload::text AS body, hash FROM events
                 WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 ORDER BY sequence",
            )
            .bind(A::TYPE)
            .bind(id)
            .bind(entry.sequence)
            .fetch_all(&mut *conn)
            .await?
        } else {
            // One round trip: the current snapshot (kind 0), then the events after it (kind 1).
            sqlx::query(
                "WITH snap AS (
                     SELECT sequence, hash, state FROM aggregate_snapshots
                     WHERE aggregate_type = $1 AND aggregate_id = $2 AND snapshot_version = $3)
                 SELECT 0 AS kind, sequence, NULL::text AS event_type, NULL::text AS event_version,
                        state::text AS body, hash
                 FROM snap
                 UNION ALL
                 SELECT 1, sequence, event_type, event_version, payload::text, hash FROM events
                 WHERE aggregate_type = $1 AND aggregate_id = $2
                   AND sequence > COALESCE((SELECT sequence FROM snap), 0)
                 ORDER BY kind, sequence",
            )
            .bind(A::TYPE)
            .bind(id)
            .bind(A::SNAPSHOT_VERSION)
            .fetch_all(&mut *conn)
            .await?
        };
        let fresh = cached.is_none() || !rows.is_empty();
        for row in rows {
            let body: String = row.get("body");
            if row.get::<i32, _>("kind") == 0 {
                loaded.state = serde_json::from_str(&body)
                    .map_err(|e| LogError::corrupt(format!("{} snapshot {id}", A::TYPE), e))?;
            } else {
                let payload: Value = serde_json::from_str(&body).map_err(|e| LogError::corrupt("event payload", e))?;
                let event = self.decode::<A>(row.get("event_type"), row.get("event_version"), payload)?;
                loaded.state.apply(&event);
            }
            loaded.sequence = row.get("sequence");
            loaded.hash = row.get("hash");
        }
        if fresh && loaded.sequence > 0 {
            let state: Arc<dyn Any + Send + Sync> = Arc::new(loaded.state.clone());
            self.remember(A::TYPE, id, loaded.sequence, loaded.hash.clone(), state);
        }
        Ok(loaded)
    }

    fn remember(
        &self,
        aggregate_type: &'static str,
        id: &str,
        sequence: i64,
        hash: Option<Vec<u8>>,
        state: Arc<dyn Any + Send + Sync>,
    ) {
        self.cache.insert((aggregate_type, id.to_string()), Arc::new(Cached { sequence, hash, state }));
    }

    /// Caches the states of streams whose append has committed.
    pub fn committed(&self, streams: &[PendingStream], events: &[AppendedEvent]) {
        for stream in streams {
            let sequence = stream.base_sequence + stream.events.len() as i64;
            let head = events
                .iter()
                .find(|e| {
                    e.aggregate_type == stream.aggregate_type
                        && e.aggregate_id == stream.aggregate_id
                        && e.sequence == sequence
                })
                .and_then(|e| hex::decode(&e.hash).ok());
            self.remember(stream.aggregate_type, &stream.aggregate_id, sequence, head, stream.state.clone());
        }
    }

    /// Decides `commands`, each on the state the previous one left, on a loaded stream: the
    /// events to append (all or none), with the new state.
    pub fn decide<A: Aggregate>(&self, loaded: &Loaded<A>, commands: &[A::Command]) -> Result<PendingStream, LogError> {
        let mut state = loaded.state.clone();
        let mut events = Vec::new();
        for command in commands {
            let decided = state.decide(command).map_err(Into::into)?;
            for event in &decided {
                state.apply(event);
            }
            events.extend(decided);
        }
        let parts: Vec<EventParts> = events.iter().map(DomainEvent::to_parts).collect();
        for event in &parts {
            if let Some(path) = nul_at(&event.payload) {
                return Err(LogError::UnstorableText(format!("{}{path}", event.event_type)));
            }
        }
        let next = loaded.sequence + events.len() as i64;
        let snapshot = (next / self.snapshot_every > loaded.sequence / self.snapshot_every).then(|| {
            let json = serde_json::to_string(&state).expect("aggregate state always serialises");
            (A::SNAPSHOT_VERSION, json)
        });
        Ok(PendingStream {
            aggregate_type: A::TYPE,
            aggregate_id: loaded.id.clone(),
            base_sequence: loaded.sequence,
            base_hash: loaded.hash.clone(),
            events: parts,
            snapshot,
            state: Arc::new(state),
        })
    }

    /// Writes the pending streams (and their due snapshots) with one statement. A unique
    /// violation on `(aggregate_type, aggregate_id, sequence)` is a typed conflict.
    pub async fn append(
        &self,
        tx: &mut PgConnection,
        project_id: Uuid,
        metadata: &str,
        streams: &[PendingStream],
    ) -> Result<Vec<AppendedEvent>, LogError> {
        let total: usize = streams.iter().map(|s| s.events.len()).sum();
        let mut types = Vec::with_capacity(total);
        let mut ids = Vec::with_capacity(total);
        let mut sequences = Vec::with_capacity(total);
        let mut event_types = Vec::with_capacity(total);
        let mut versions = Vec::with_capacity(total);
        let mut payloads = Vec::with_capacity(total);
        let mut event_ids = Vec::with_capacity(total);
        let mut prev_hashes: Vec<Option<Vec<u8>>> = Vec::with_capacity(total);
        let mut hashes = Vec::with_capacity(total);
        let (mut snap_types, mut snap_ids, mut snap_versions, mut snap_sequences, mut snap_hashes, mut snap_states) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for stream in streams {
            let mut prev = stream.base_hash.clone();
            for (i, event) in stream.events.iter().enumerate() {
                let sequence = stream.base_sequence + 1 + i as i64;
                let payload = serde_json::to_string(&event.payload).expect("json values serialise");
                let hash = hash::chain(
                    prev.as_deref(),
                    &Canonical {
                        aggregate_type: stream.aggregate_type,
                        aggregate_id: &stream.aggregate_id,
                        sequence,
                        event_type: &event.event_type,
                        event_version: &event.event_version,
                        payload: &payload,
                        metadata,
                    },
                );
                types.push(stream.aggregate_type);
                ids.push(stream.aggregate_id.as_str());
                sequences.push(sequence);
                event_types.push(event.event_type.as_str());
                versions.push(event.event_version.as_str());
                payloads.push(payload);
                event_ids.push(Uuid::now_v7());
                prev_hashes.push(prev.clone());
                hashes.push(hash.to_vec());
                prev = Some(hash.to_vec());
            }
            if let Some((version, state)) = &stream.snapshot {
                snap_types.push(stream.aggregate_type);
                snap_ids.push(stream.aggregate_id.as_str());
                snap_versions.push(*version);
                snap_sequences.push(stream.base_sequence + stream.events.len() as i64);
                snap_hashes.push(prev.clone());
                snap_states.push(state.as_str());
            }
        }
        // One statement, so atomic without BEGIN/COMMIT: the events and, when a stream
        // crosses a snapshot boundary, its snapshot (a data-modifying CTE always runs).
        let rows = sqlx::query(
            "WITH appended AS (
                 INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                                     payload, metadata, event_id, project_id, prev_hash, hash)
                 SELECT t.aggregate_type, t.aggregate_id, t.sequence, t.event_type, t.event_version,
                        t.payload::json, $7::json, t.event_id, $8, t.prev_hash, t.hash
                 FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                             $9::uuid[], $10::bytea[], $11::bytea[])
                      AS t(aggregate_type, aggregate_id, sequence, event_type, event_version, payload,
                           event_id, prev_hash, hash)
                 RETURNING event_id, position, transaction_id),
             snapshots AS (
                 INSERT INTO aggregate_snapshots (aggregate_type, aggregate_id, snapshot_version, sequence, hash, state)
                 SELECT t.aggregate_type, t.aggregate_id, t.snapshot_version, t.sequence, t.hash, t.state::json
                 FROM UNNEST($12::text[], $13::text[], $14::int[], $15::bigint[], $16::bytea[], $17::text[])
                      AS t(aggregate_type, aggregate_id, snapshot_version, sequence, hash, state)
                 ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
                   SET snapshot_version = EXCLUDED.snapshot_version, sequence = EXCLUDED.sequence,
                       hash = EXCLUDED.hash, state = EXCLUDED.state, taken_at = now())
             SELECT event_id, position, transaction_id::text AS xid FROM appended",
        )
        .bind(&types)
        .bind(&ids)
        .bind(&sequences)
        .bind(&event_types)
        .bind(&versions)
        .bind(&payloads)
        .bind(metadata)
        .bind(project_id)
        .bind(&event_ids)
        .bind(&prev_hashes)
        .bind(&hashes)
        .bind(&snap_types)
        .bind(&snap_ids)
        .bind(&snap_versions)
        .bind(&snap_sequences)
        .bind(&snap_hashes)
        .bind(&snap_states)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.constraint() == Some("events_pkey") => LogError::Conflict {
                stream: streams
                    .iter()
                    .map(|s| format!("{}/{}", s.aggregate_type, s.aggregate_id))
                    .collect::<Vec<_>>()
                    .join(", "),
            },
            _ => LogError::Database(e),
        })?;
        let positions: HashMap<Uuid, i64> = rows.iter().map(|r| (r.get("event_id"), r.get("position"))).collect();
        let xid: u64 = match rows.first() {
            Some(row) => row.get::<String, _>("xid").parse().map_err(|e| LogError::corrupt("transaction_id", e))?,
            None => 0,
        };

        Ok((0..total)
            .map(|i| AppendedEvent {
                event_id: event_ids[i],
                aggregate_type: types[i].to_string(),
                aggregate_id: ids[i].to_string(),
                sequence: sequences[i],
                event_type: event_types[i].to_string(),
                event_version: versions[i].to_string(),
                position: positions[&event_ids[i]],
                transaction_id: xid,
                hash: hex::encode(&hashes[i]),
            })
            .collect())
    }
}

/// Where in `value` a string or a key holds U+0000 (`.field[2].name`), if anywhere: the
/// log's `json` column would take it, every read model's `jsonb` refuses it.
pub fn nul_at(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(String::new()),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| nul_at(v).map(|p| format!("[{i}]{p}"))),
        Value::Object(fields) => fields.iter().find_map(|(k, v)| {
            let key = k.replace('\0', "\\0");
            if k.contains('\0') {
                return Some(format!(".{key}"));
            }
            nul_at(v).map(|p| format!(".{key}{p}"))
        }),
        _ => None,
    }
}
