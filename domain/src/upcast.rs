//! Upcasters: pure functions that lift a stored payload of an old event version to the
//! current one. The command layer runs them before deserialising, so the domain only ever
//! sees current events. The log itself is never rewritten.

use serde_json::{json, Value};

/// One upcaster: events of `aggregate_type`/`event_type` older than `to_version` are
/// passed through `upcast`.
pub struct Upcaster {
    pub aggregate_type: &'static str,
    pub event_type: &'static str,
    pub to_version: &'static str,
    pub upcast: fn(Value) -> Value,
}

/// Every upcaster of the domain, in the order they apply.
pub const UPCASTERS: &[Upcaster] = &[Upcaster {
    aggregate_type: "operation",
    event_type: "PageRecorded",
    to_version: "2.0",
    upcast: page_recorded_v1_to_v2,
}];

/// `PageRecorded` 1.0 was `{lease_id, count, cursor: "<page token>"|null, at}`; 2.0 renames
/// `count` to `records`, adds `bytes` (unknown then: 0) and structures the cursor.
pub fn page_recorded_v1_to_v2(v1: Value) -> Value {
    let Value::Object(mut map) = v1 else {
        return v1;
    };
    let records = map.remove("count").unwrap_or(json!(0));
    let page_token = map.remove("cursor").unwrap_or(Value::Null);
    map.insert("records".into(), records);
    map.entry("bytes").or_insert(json!(0));
    map.insert("cursor".into(), json!({ "watermark": null, "page_token": page_token }));
    Value::Object(map)
}
