//! The CloudEvents 1.0 structured-mode JSON envelope every amplog message travels in. The
//! tenant travels in the envelope (`projectid`), never only in `data`: consumers take their
//! project context from here.

use amplog_log::LogError;

use amplog_log::{EventStore, RecordedEvent, StoredEvent};
use chrono::{DateTime, Utc};
use rdkafka::message::{Header, OwnedHeaders};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;
use uuid::Uuid;

/// The content type of a structured-mode CloudEvent, sent as the `content-type` header.
pub const CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";

/// The headers of every message amplog produces: the CloudEvents Kafka binding requires a
/// structured-mode message to name its format in `content-type`.
pub fn headers() -> OwnedHeaders {
    OwnedHeaders::new_with_capacity(1).insert(Header { key: "content-type", value: Some(CONTENT_TYPE) })
}

/// A CloudEvent as amplog publishes it. Extension attributes: `projectid`, `sequence`,
/// `position`, `hash` and `actor` (event topics); `projectid` and `attempt` (jobs); and
/// `traceparent` (the Distributed Tracing extension) when the command was traced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CloudEvent {
    /// Always "1.0".
    pub specversion: String,
    /// Unique per event: the log's event id (consumers dedupe by it).
    pub id: String,
    /// `/amplog/projects/{project}` (or `/amplog` for events outside a project).
    pub source: String,
    /// `amplog.{aggregate}.{Event}.v{version}`, e.g. `amplog.installation.Created.v1.0`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The aggregate id (the Kafka key).
    pub subject: String,
    /// When the event was recorded.
    pub time: DateTime<Utc>,
    pub datacontenttype: String,
    /// The event's payload, upcast to the version named in `type`.
    pub data: Value,
    /// The project the event belongs to: the only tenant a consumer may trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projectid: Option<Uuid>,
    /// The event's sequence in its aggregate's stream (1, 2, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<i64>,
    /// The event's position in the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<i64>,
    /// The hex SHA-256 of the stream's hash chain at this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Who sent the command that recorded the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The W3C trace context of the span that recorded the event (or dispatched the job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Any other extension attribute (dead letters carry `errorcode`).
    #[serde(flatten, default)]
    pub extensions: BTreeMap<String, Value>,
}

impl CloudEvent {
    /// The envelope of one logged event, its payload upcast to the current version.
    pub fn from_recorded(event: &RecordedEvent, store: &EventStore) -> Self {
        Self::from_event(event.clone(), store)
    }

    /// `from_recorded`, consuming the event (no copy of its payload).
    pub fn from_event(event: RecordedEvent, store: &EventStore) -> Self {
        let (version, data) =
            store.upcast(&event.aggregate_type, &event.event_type, &event.event_version, event.payload);
        Self {
            specversion: "1.0".into(),
            id: event.event_id.to_string(),
            source: source(event.project_id),
            event_type: event_type(&event.aggregate_type, &event.event_type, &version),
            subject: event.aggregate_id,
            time: event.recorded_at,
            datacontenttype: "application/json".into(),
            data,
            projectid: event.project_id,
            sequence: Some(event.sequence),
            position: Some(event.position),
            hash: event.hash.as_deref().map(hex::encode),
            traceparent: amplog_log::telemetry::traceparent_of(&event.metadata)
                .filter(|t| trace_text(t))
                .map(str::to_string),
            actor: actor(event.metadata),
            extensions: BTreeMap::new(),
        }
    }

    /// The serialised envelope of one stored event: the same bytes as
    /// `from_event(event.parse()?, store).to_bytes()` for payloads in serde_json's compact
    /// form (everything amplog writes; other stored text is the same JSON, spaced as
    /// stored).
    pub fn encode_stored(event: &StoredEvent, store: &EventStore) -> Result<Vec<u8>, LogError> {
        let mut out = Vec::with_capacity(400 + event.payload.len() + event.aggregate_id.len());
        StoredEncoder::new(store).encode(event, &mut out)?;
        Ok(out)
    }

    /// Parses a message value, refusing anything that is not a CloudEvents 1.0 envelope.
    pub fn parse(bytes: &[u8]) -> Result<Self, crate::StreamsError> {
        let event: Self = serde_json::from_slice(bytes).map_err(|e| crate::StreamsError::Envelope(e.to_string()))?;
        if event.specversion != "1.0" {
            return Err(crate::StreamsError::Envelope(format!("specversion {}", event.specversion)));
        }
        Ok(event)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serialises")
    }
}

/// Writes the envelopes of stored events one after another, as `CloudEvent::encode_stored`
/// does (the relay's hot path: one encoder per relay, a batch into one reused buffer). It
/// remembers, per kind of event, whether an upcaster applies and the envelope's `type`,
/// and the date of the last time it wrote.
pub struct StoredEncoder<'a> {
    store: &'a EventStore,
    kinds: Vec<Kind>,
    day: Option<(i64, [u8; 12])>,
}

/// One kind of stored event: aggregate type, event type and stored version.
struct Kind {
    aggregate_type: String,
    event_type: String,
    event_version: String,
    upcasts: bool,
    /// The envelope's `type` member, as JSON.
    type_json: Vec<u8>,
}

/// Kinds remembered at most (a log has a few dozen; past this, each is worked out anew).
const KINDS: usize = 256;

impl<'a> StoredEncoder<'a> {
    pub fn new(store: &'a EventStore) -> Self {
        Self { store, kinds: Vec::new(), day: None }
    }

    fn kind(&mut self, event: &StoredEvent) -> usize {
        let same = |k: &Kind| {
            k.event_type == event.event_type
                && k.aggregate_type == event.aggregate_type
                && k.event_version == event.event_version
        };
        if let Some(found) = self.kinds.iter().position(same) {
            return found;
        }
        let mut type_json = Vec::new();
        write_str(
            &mut type_json,
            &["amplog.", &event.aggregate_type, ".", &event.event_type, ".v", &event.event_version],
        );
        if self.kinds.len() == KINDS {
            self.kinds.pop();
        }
        self.kinds.push(Kind {
            aggregate_type: event.aggregate_type.clone(),
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
            upcasts: self.store.upcasts(&event.aggregate_type, &event.event_type, &event.event_version),
            type_json,
        });
        self.kinds.len() - 1
    }

    /// Appends the envelope of `event` to `out`. When no upcaster changes the event, its
    /// stored payload text goes into `data` as it is: it comes from a `json` column, which
    /// PostgreSQL only accepts as valid JSON, so it is neither parsed nor checked again.
    /// The envelope is written member by member.
    pub fn encode(&mut self, event: &StoredEvent, out: &mut Vec<u8>) -> Result<(), LogError> {
        let kind = self.kind(event);
        let Kind { upcasts, type_json, .. } = &self.kinds[kind];
        if *upcasts {
            let envelope = CloudEvent::from_event(event.clone().parse()?, self.store);
            write_json(out, &envelope);
            return Ok(());
        }
        let corrupt = |what: &str, e| LogError::corrupt(format!("event {what}"), e);
        let actor = stored_actor(&event.metadata).map_err(|e| corrupt("metadata", e))?;
        out.reserve(400 + event.payload.len() + event.aggregate_id.len());
        out.extend_from_slice(b"{\"specversion\":\"1.0\",\"id\":");
        write_uuid(out, &event.event_id);
        out.extend_from_slice(b",\"source\":");
        match event.project_id {
            Some(project) => {
                out.extend_from_slice(b"\"/amplog/projects/");
                write_uuid_text(out, &project);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"\"/amplog\""),
        }
        out.extend_from_slice(b",\"type\":");
        out.extend_from_slice(type_json);
        out.extend_from_slice(b",\"subject\":");
        write_str(out, &[&event.aggregate_id]);
        out.extend_from_slice(b",\"time\":");
        write_time(out, &event.recorded_at, &mut self.day);
        out.extend_from_slice(b",\"datacontenttype\":\"application/json\",\"data\":");
        out.extend_from_slice(event.payload.trim_ascii().as_bytes());
        if let Some(project) = &event.project_id {
            out.extend_from_slice(b",\"projectid\":");
            write_uuid(out, project);
        }
        out.extend_from_slice(b",\"sequence\":");
        write_json(out, &event.sequence);
        out.extend_from_slice(b",\"position\":");
        write_json(out, &event.position);
        if let Some(hash) = &event.hash {
            out.extend_from_slice(b",\"hash\":\"");
            for byte in hash {
                out.extend_from_slice(&[HEX[(byte >> 4) as usize], HEX[(byte & 15) as usize]]);
            }
            out.push(b'"');
        }
        if let Some(actor) = actor {
            out.extend_from_slice(b",\"actor\":");
            write_str(out, &[&actor]);
        }
        if let Some(traceparent) = stored_traceparent(&event.metadata).map_err(|e| corrupt("metadata", e))? {
            out.extend_from_slice(b",\"traceparent\":");
            write_str(out, &[&traceparent]);
        }
        out.push(b'}');
        Ok(())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn write_json(out: &mut Vec<u8>, value: &(impl Serialize + ?Sized)) {
    serde_json::to_writer(out, value).expect("writing to a Vec cannot fail");
}

fn write_uuid(out: &mut Vec<u8>, id: &Uuid) {
    out.push(b'"');
    write_uuid_text(out, id);
    out.push(b'"');
}

/// A uuid's hyphenated lower-case text, unquoted.
fn write_uuid_text(out: &mut Vec<u8>, id: &Uuid) {
    out.extend_from_slice(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()).as_bytes());
}

/// The JSON string of `parts` joined, escaped as serde_json escapes (control characters,
/// quote and backslash; the rest as UTF-8).
fn write_str(out: &mut Vec<u8>, parts: &[&str]) {
    let plain = |part: &&str| part.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
    if parts.iter().all(plain) {
        out.push(b'"');
        for part in parts {
            out.extend_from_slice(part.as_bytes());
        }
        out.push(b'"');
    } else {
        write_json(out, &parts.concat());
    }
}

/// A time as chrono serialises it: RFC 3339 in UTC, with as many fractional digits (0, 3,
/// 6 or 9) as it takes. `day` keeps the date part last written (`"YYYY-MM-DDT`), which most
/// times of a batch share.
fn write_time(out: &mut Vec<u8>, time: &DateTime<Utc>, day: &mut Option<(i64, [u8; 12])>) {
    use chrono::Datelike;
    let nanos = time.timestamp_subsec_nanos();
    if nanos >= 1_000_000_000 {
        return write_json(out, time); // a leap second: chrono's own
    }
    let digits = |out: &mut Vec<u8>, n: u32, width: u32| {
        out.extend((0..width).rev().map(|i| b'0' + (n / 10u32.pow(i) % 10) as u8));
    };
    let (days, seconds) = (time.timestamp().div_euclid(86_400), time.timestamp().rem_euclid(86_400) as u32);
    match day {
        Some((cached, prefix)) if *cached == days => out.extend_from_slice(prefix),
        _ => {
            let (date, mut prefix) = (time.date_naive(), Vec::with_capacity(12));
            if !(0..=9999).contains(&date.year()) {
                return write_json(out, time); // far years: chrono's own
            }
            prefix.push(b'"');
            digits(&mut prefix, date.year() as u32, 4);
            for (separator, value) in [(b'-', date.month()), (b'-', date.day())] {
                prefix.push(separator);
                digits(&mut prefix, value, 2);
            }
            prefix.push(b'T');
            out.extend_from_slice(&prefix);
            *day = prefix.try_into().ok().map(|prefix| (days, prefix)); // 12 bytes for years 0-9999
        }
    }
    digits(out, seconds / 3600, 2);
    for value in [seconds / 60 % 60, seconds % 60] {
        out.push(b':');
        digits(out, value, 2);
    }
    let (fraction, width) = match nanos {
        0 => (0, 0),
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    if width > 0 {
        out.push(b'.');
        digits(out, fraction, width);
    }
    out.extend_from_slice(b"Z\"");
}

/// The envelope's `actor` from stored metadata text, as `actor` finds it in the parsed
/// metadata. The usual object is read without building a map of values.
fn stored_actor(metadata: &str) -> Result<Option<Cow<'_, str>>, serde_json::Error> {
    // What amplog writes: the actor first, unescaped, and no other "actor" member. (The
    // text comes from a json column: PostgreSQL checked it is JSON.)
    if let Some(rest) = metadata.strip_prefix(r#"{"actor":""#) {
        if let Some(end) = rest.find(['"', '\\']) {
            if rest.as_bytes()[end] == b'"' && !rest[end..].contains(r#""actor""#) {
                return Ok(Some(Cow::Borrowed(&rest[..end])));
            }
        }
    }
    #[derive(Deserialize)]
    struct Metadata<'a> {
        #[serde(borrow, default)]
        actor: Option<Cow<'a, str>>,
    }
    match serde_json::from_str::<Metadata<'_>>(metadata) {
        Ok(metadata) => Ok(metadata.actor),
        // Not an object, a non-string actor, a repeated member: the parsed path decides.
        Err(_) => Ok(actor(serde_json::from_str(metadata)?).map(Cow::Owned)),
    }
}

/// The `traceparent` member of stored metadata text, exactly as the parsed path finds it.
/// What amplog writes is read without parsing: the member last, after `actor`, `command`
/// and `correlation_id`, 55 characters of hex and dashes. Text without the key (and no
/// escape that could spell it) has none; anything else is parsed.
fn stored_traceparent(metadata: &str) -> Result<Option<Cow<'_, str>>, serde_json::Error> {
    const KEY: &str = r#","traceparent":""#;
    if !metadata.contains("traceparent") && !metadata.contains('\\') {
        return Ok(None);
    }
    if let Some(at) = metadata.rfind(KEY) {
        let value = &metadata[at + KEY.len()..];
        if let Some(value) = value.strip_suffix("\"}") {
            if trace_text(value) && !metadata[..at].contains("traceparent") {
                return Ok(Some(Cow::Borrowed(value)));
            }
        }
    }
    let parsed: Value = serde_json::from_str(metadata)?;
    Ok(amplog_log::telemetry::traceparent_of(&parsed).filter(|t| trace_text(t)).map(|t| Cow::Owned(t.to_string())))
}

/// What a traceparent may hold: hex digits and dashes, at most 64 of them.
fn trace_text(value: &str) -> bool {
    value.len() <= 64 && value.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The one metadata member an envelope carries.
fn actor(metadata: Value) -> Option<String> {
    match metadata {
        Value::Object(mut map) => match map.remove("actor") {
            Some(Value::String(actor)) => Some(actor),
            _ => None,
        },
        _ => None,
    }
}

pub fn source(project: Option<Uuid>) -> String {
    match project {
        Some(project) => format!("/amplog/projects/{project}"),
        None => "/amplog".into(),
    }
}

/// `amplog.{aggregate}.{Event}.v{version}`.
pub fn event_type(aggregate_type: &str, event_type: &str, version: &str) -> String {
    format!("amplog.{aggregate_type}.{event_type}.v{version}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_as_chrono_serialises_them() {
        let times = [
            "2026-11-24T07:34:59Z",
            "2026-11-24T07:34:59.100Z",
            "2026-11-24T07:34:59.173915Z",
            "2026-11-24T07:34:59.173915097Z",
            "2026-01-01T00:00:00.000000001Z",
            "0001-02-03T04:05:06.120Z",
            "9999-12-31T23:59:59.999999Z",
        ];
        // One memo through all: the same day again, and other days after it.
        let mut day = None;
        for text in times.iter().chain(&times[..2]).chain(&["1999-12-31T23:59:59.5Z", "1969-07-20T20:17:40Z"]) {
            let time: DateTime<Utc> = text.parse().unwrap();
            let mut out = Vec::new();
            write_time(&mut out, &time, &mut day);
            assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&time).unwrap(), "{text}");
        }
        let far = DateTime::<Utc>::from_timestamp(300_000_000_000, 5).unwrap(); // year 11476
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .unwrap()
            .and_utc();
        for time in [far, leap] {
            let mut out = Vec::new();
            write_time(&mut out, &time, &mut day);
            assert_eq!(out, serde_json::to_vec(&time).unwrap());
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for parts in [&["plain"][..], &["a", "\"b"], &["tab\t", "\\", "\u{1}é\u{7f}"], &[""]] {
            let mut out = Vec::new();
            write_str(&mut out, parts);
            assert_eq!(out, serde_json::to_vec(&parts.concat()).unwrap(), "{parts:?}");
        }
    }

    #[test]
    fn a_traceparent_is_read_from_any_metadata_as_the_parsed_path_reads_it() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cases = [
            format!(r#"{{"actor":"a","command":"c","correlation_id":null,"traceparent":"{tp}"}}"#),
            format!(r#"{{"traceparent": "{tp}"}}"#),
            format!(r#"{{"a":{{"traceparent":"{tp}"}}}}"#),
            format!(r#"{{"x":"0","traceparent":"{tp}"}}"#),
            format!(r#"{{"traceparent":"{tp}","traceparent":"ab"}}"#),
            format!(r#"{{"traceparent":"{tp}"}}"#),
            r#"{"traceparent":"not hex!"}"#.to_string(),
            r#"{"actor":"a"}"#.to_string(),
            r#"[1,2]"#.to_string(),
        ];
        for metadata in cases {
            let parsed: Value = serde_json::from_str(&metadata).unwrap();
            let expected = amplog_log::telemetry::traceparent_of(&parsed).filter(|t| trace_text(t));
            assert_eq!(stored_traceparent(&metadata).unwrap().as_deref(), expected, "{metadata}");
        }
    }

    #[test]
    fn an_actor_is_read_from_any_metadata_the_parsed_path_reads() {
        let cases = [
            (r#"{"actor":"bench","command":"x","correlation_id":null}"#, Some("bench")),
            (r#"{"actor":"a\"b"}"#, Some("a\"b")),
            (r#"{"actor":1}"#, None),
            (r#"{"command":"x"}"#, None),
            (r#"[1,2]"#, None),
            (r#"{"actor":"first","actor":"last"}"#, Some("last")),
            (r#"{"actor":"a\\b","command":"x"}"#, Some("a\\b")),
            (r#"{"actor":"a","command":"actor"}"#, Some("a")),
            (r#"{"actor":"a","command":"x","actor":"b"}"#, Some("b")),
            (r#"{"actor":null}"#, None),
            (r#"{ "actor": "spaced" }"#, Some("spaced")),
        ];
        for (metadata, expected) in cases {
            let parsed = actor(serde_json::from_str(metadata).unwrap());
            assert_eq!(parsed.as_deref(), expected, "{metadata}");
            assert_eq!(stored_actor(metadata).unwrap().map(Cow::into_owned), parsed, "{metadata}");
        }
        assert!(stored_actor("{").is_err());
    }
}
