//! JSON Schemas of everything amplog publishes, generated from the Rust types (schemars):
//! one file per event type and current version (the `data` of its CloudEvent, whose `type`
//! names the same event and version), the envelope, and the job. `amplog schemas --out DIR`
//! writes them; the copies in `streams/schemas/` are checked against the types by a test.

use crate::envelope::CloudEvent;
use crate::jobs::Job;
use amplog_domain::admin_key::AdminKeyEvent;
use amplog_domain::connect_session::ConnectSessionEvent;
use amplog_domain::connection::ConnectionEvent;
use amplog_domain::installation::InstallationEvent;
use amplog_domain::integration::IntegrationEvent;
use amplog_domain::operation::OperationEvent;
use amplog_domain::organization::OrganizationEvent;
use amplog_domain::project::ProjectEvent;
use amplog_domain::provider_app::ProviderAppEvent;
use amplog_domain::upcast::UPCASTERS;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// The version events of this type are published in (after upcasting).
pub fn current_version(aggregate_type: &str, event_type: &str) -> &'static str {
    UPCASTERS
        .iter()
        .filter(|u| u.aggregate_type == aggregate_type && u.event_type == event_type)
        .map(|u| u.to_version)
        .max()
        .unwrap_or("1.0")
}

/// Every schema file, by file name, as pretty JSON.
pub fn schemas() -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let events = [
        ("project", schemars::schema_for!(ProjectEvent)),
        ("integration", schemars::schema_for!(IntegrationEvent)),
        ("connection", schemars::schema_for!(ConnectionEvent)),
        ("installation", schemars::schema_for!(InstallationEvent)),
        ("operation", schemars::schema_for!(OperationEvent)),
        ("provider_app", schemars::schema_for!(ProviderAppEvent)),
        ("connect_session", schemars::schema_for!(ConnectSessionEvent)),
        ("organization", schemars::schema_for!(OrganizationEvent)),
        ("admin_key", schemars::schema_for!(AdminKeyEvent)),
        ("change", schemars::schema_for!(amplog_domain::change::ChangeEvent)),
    ];
    for (aggregate, schema) in events {
        let root = schema.as_value();
        let defs = root.get("$defs").cloned().unwrap_or(json!({}));
        for variant in root.get("oneOf").and_then(Value::as_array).into_iter().flatten() {
            let properties = &variant["properties"];
            let name = properties["type"]["const"]
                .as_str()
                .or_else(|| properties["type"]["enum"][0].as_str())
                .expect("adjacently tagged variants name their type");
            let version = current_version(aggregate, name);
            let title = crate::envelope::event_type(aggregate, name, version);
            let data = properties.get("data").cloned().unwrap_or(json!({"type": "null"}));
            files.insert(format!("{aggregate}.{name}.v{version}.json"), document(&title, data, &defs));
        }
    }
    for (name, schema) in [("cloudevent", schemars::schema_for!(CloudEvent)), ("job", schemars::schema_for!(Job))] {
        files.insert(format!("{name}.json"), pretty(schema.as_value()));
    }
    for (topic, description) in amplog_domain::notification::TOPICS {
        files.insert(format!("notification.{topic}.json"), notification_document(topic, description));
    }
    files
}

/// A notification's body (`{type, timestamp, data}`), its `data` as its topic's group has it.
fn notification_document(topic: &str, description: &str) -> String {
    use crate::notifications::*;
    let data = match topic.split('.').next() {
        Some("installation") => schemars::schema_for!(InstallationNotice),
        Some("connection") => schemars::schema_for!(ConnectionNotice),
        Some("read" | "write" | "operation") => schemars::schema_for!(OperationNotice),
        Some("destination") => schemars::schema_for!(DestinationNotice),
        Some("connect_session") => schemars::schema_for!(ConnectSessionNotice),
        _ => panic!("notification topic {topic} has no schema (a test names every topic)"),
    };
    let mut data = data.as_value().clone();
    let defs = data.as_object_mut().and_then(|d| d.remove("$defs")).unwrap_or(json!({}));
    if let Some(map) = data.as_object_mut() {
        map.remove("$schema");
        map.remove("title");
    }
    let body = json!({
        "description": description,
        "type": "object",
        "required": ["type", "timestamp", "data"],
        "properties": {
            "type": {"const": topic},
            "timestamp": {"type": "string", "format": "date-time"},
            "data": data,
        },
    });
    document(&format!("amplog notification {topic}"), body, &defs)
}

/// Writes every schema into `dir`.
pub fn write_schemas(dir: &std::path::Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let files = schemas();
    for (name, text) in &files {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(files.len())
}

fn document(title: &str, data: Value, defs: &Value) -> String {
    let mut used = BTreeSet::new();
    collect_refs(&data, defs, &mut used);
    let mut doc = Map::new();
    doc.insert("$schema".into(), json!("https://json-schema.org/draft/2020-12/schema"));
    doc.insert("title".into(), json!(title));
    match data {
        Value::Object(map) => doc.extend(map),
        other => {
            doc.insert("allOf".into(), json!([other]));
        }
    }
    if !used.is_empty() {
        let defs: Map<String, Value> = used.into_iter().map(|name| (name.clone(), defs[&name].clone())).collect();
        doc.insert("$defs".into(), Value::Object(defs));
    }
    pretty(&Value::Object(doc))
}

/// The `$defs` entries `value` refers to, transitively.
fn collect_refs(value: &Value, defs: &Value, used: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            if let Some(name) = map.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/$defs/")) {
                if used.insert(name.to_string()) {
                    collect_refs(&defs[name], defs, used);
                }
            }
            map.values().for_each(|v| collect_refs(v, defs, used));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, defs, used)),
        _ => {}
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).expect("schemas serialise") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schemas_in_the_repository_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let generated = schemas();
        let mut stale = Vec::new();
        for (name, text) in &generated {
            if std::fs::read_to_string(dir.join(name)).ok().as_deref() != Some(text.as_str()) {
                stale.push(name.clone());
            }
        }
        let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        let extra: Vec<_> = on_disk.iter().filter(|n| !generated.contains_key(*n)).collect();
        assert!(
            stale.is_empty() && extra.is_empty(),
            "streams/schemas is out of date (stale {stale:?}, extra {extra:?}): run `cargo run -- schemas --out streams/schemas`"
        );
    }

    #[test]
    fn every_event_type_has_a_schema_with_its_current_version() {
        let files = schemas();
        assert!(files.contains_key("operation.PageRecorded.v2.0.json"));
        assert!(files.contains_key("operation.Requested.v1.0.json"));
        assert!(files.contains_key("installation.Created.v1.0.json"));
        let page: Value = serde_json::from_str(&files["operation.PageRecorded.v2.0.json"]).unwrap();
        assert_eq!(page["title"], "amplog.operation.PageRecorded.v2.0");
        let required: Vec<&str> = page["required"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert!(required.contains(&"records") && required.contains(&"cursor"), "{required:?}");
        assert!(page["$defs"].get("Cursor").is_some());
    }
}
