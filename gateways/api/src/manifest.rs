//! Integration manifests in YAML, shaped like an `amp.yaml`: a spec version and a list of
//! integrations, each with a provider and the objects it reads (schedule, backfill,
//! fields). Parsed strictly (unknown keys are errors, with their line and column), then
//! turned into the domain's `Manifest`, whose own rules the domain checks on deploy.
//! Size and nesting are bounded before the YAML parser sees the text (it takes quadratic
//! time in the depth), and the parse runs off the async runtime (`parse_off_runtime`).

use crate::error::ApiError;
use amplog_domain::integration::{Backfill, Manifest, ObjectDecl};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    spec_version: String,
    integrations: Vec<IntegrationSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IntegrationSpec {
    name: String,
    /// Accepted for amp.yaml compatibility; the log does not keep it.
    #[serde(default)]
    #[allow(dead_code)]
    display_name: Option<String>,
    provider: String,
    #[serde(default)]
    read: Option<ReadSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ReadSpec {
    objects: Vec<ObjectSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ObjectSpec {
    object_name: String,
    /// The project destination (`amplog destinations create`) that receives the reads.
    #[serde(default)]
    destination: Option<String>,
    #[serde(default)]
    schedule: Option<String>,
    #[serde(default)]
    backfill: Option<BackfillSpec>,
    #[serde(default)]
    required_fields: Vec<FieldSpec>,
    #[serde(default)]
    optional_fields: Vec<FieldSpec>,
    /// The end user may leave the object out on the connect page.
    #[serde(default)]
    optional: bool,
    /// Changes the provider pushes that are delivered as they happen: `created`, `updated`,
    /// `deleted` (at most these three, each once).
    #[serde(default)]
    subscribe: Vec<amplog_domain::change::ChangeKind>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BackfillSpec {
    default_period: PeriodSpec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeriodSpec {
    #[serde(default)]
    days: Option<u32>,
    #[serde(default)]
    full_history: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FieldSpec {
    field_name: String,
}

/// One integration of a manifest file, ready to declare and deploy.
#[derive(Clone, Debug, PartialEq)]
pub struct DeclaredIntegration {
    pub name: String,
    pub provider: String,
    pub manifest: Manifest,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("manifest.invalid", message)
}

/// Largest manifest accepted, in bytes.
pub const MAX_BYTES: usize = 256 * 1024;
/// Deepest nesting accepted: indentation columns, compact `- `/`? ` markers and open flow
/// brackets on a line, added up. A real manifest stays under 20.
pub const MAX_NESTING: usize = 128;
/// Longest name (integration, provider, object, field, destination, schedule), in characters.
pub const MAX_NAME: usize = 200;
/// Most integrations in one manifest, objects in one integration, fields in one object.
pub const MAX_ITEMS: usize = 500;

/// Parses a manifest on a blocking thread: even bounded, YAML parsing is CPU work that must
/// not hold an async worker (and with it other tenants' requests).
pub async fn parse_off_runtime(yaml: String) -> Result<Vec<DeclaredIntegration>, ApiError> {
    if yaml.len() > MAX_BYTES {
        return Err(too_large());
    }
    tokio::task::spawn_blocking(move || parse(&yaml))
        .await
        .map_err(|e| ApiError::Internal(format!("the manifest parser stopped: {e}")))?
}

fn too_large() -> ApiError {
    invalid(format!("a manifest must be at most {} KiB", MAX_BYTES / 1024))
}

/// How deep YAML text nests, over-estimated without parsing: per line, the indentation plus
/// two columns per compact block marker (`- - - x`) plus the flow brackets (`[`, `{`) open
/// so far outside quotes and comments. Linear in the text; stops past `limit`.
pub fn nesting(yaml: &str, limit: usize) -> usize {
    let mut flow = 0usize;
    let mut deepest = 0;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        let mut rest = &line[indent..];
        let mut markers = 0;
        while let Some(after) = ["- ", "? ", "-\t", "?\t"].iter().find_map(|m| rest.strip_prefix(m)) {
            markers += 1;
            rest = after.trim_start_matches([' ', '\t']);
        }
        let mut line_deepest = flow;
        let mut quote = None;
        let mut previous = ' ';
        for c in rest.chars() {
            match (quote, c) {
                (None, '#') if previous == ' ' || previous == '\t' => break,
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, '[' | '{') => {
                    flow += 1;
                    line_deepest = line_deepest.max(flow);
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            previous = c;
        }
        deepest = deepest.max(indent + 2 * markers + line_deepest);
        if deepest > limit {
            break;
        }
    }
    deepest
}

/// A name from the manifest: not empty, at most `MAX_NAME` characters, and text the log's
/// read models can hold (no U+0000).
fn name<'a>(value: &'a str, what: &str) -> Result<&'a str, ApiError> {
    if value.trim().is_empty() {
        return Err(invalid(format!("{what} must not be empty")));
    }
    if value.chars().count() > MAX_NAME {
        return Err(invalid(format!("{what} must be at most {MAX_NAME} characters")));
    }
    if value.contains('\0') {
        return Err(invalid(format!("{what} must not contain U+0000 (NUL)")));
    }
    Ok(value)
}

fn at_most<T>(items: &[T], what: &str) -> Result<(), ApiError> {
    match items.len() > MAX_ITEMS {
        true => Err(invalid(format!("at most {MAX_ITEMS} {what} are allowed"))),
        false => Ok(()),
    }
}

/// Parses a manifest file. Every error names where it is.
pub fn parse(yaml: &str) -> Result<Vec<DeclaredIntegration>, ApiError> {
    if yaml.len() > MAX_BYTES {
        return Err(too_large());
    }
    if nesting(yaml, MAX_NESTING) > MAX_NESTING {
        return Err(invalid(format!("a manifest must not nest deeper than {MAX_NESTING} levels")));
    }
    let file: File = serde_yaml_ng::from_str(yaml).map_err(|e| invalid(format!("manifest: {e}")))?;
    if !file.spec_version.starts_with("1.") {
        return Err(invalid(format!("specVersion {} is not supported (1.x is)", file.spec_version)));
    }
    if file.integrations.is_empty() {
        return Err(invalid("a manifest must declare at least one integration"));
    }
    at_most(&file.integrations, "integrations")?;
    file.integrations
        .into_iter()
        .map(|spec| {
            name(&spec.name, "an integration's name")?;
            let provider = name(&spec.provider, &format!("integration {}: provider", spec.name))?;
            if !amplog_providers::connector::is_known_provider(provider) {
                return Err(invalid(format!(
                    "integration {}: provider `{provider}` is not in the connector catalog ({})",
                    spec.name,
                    amplog_providers::connector::known_providers().join(", ")
                )));
            }
            let objects = spec
                .read
                .map(|r| r.objects)
                .unwrap_or_default()
                .into_iter()
                .map(|o| {
                    let object = format!("integration {}: object {}", spec.name, o.object_name);
                    name(&o.object_name, &format!("integration {}: an object's name", spec.name))?;
                    at_most(&o.required_fields, "required fields")?;
                    at_most(&o.optional_fields, "optional fields")?;
                    for field in o.required_fields.iter().chain(&o.optional_fields) {
                        name(&field.field_name, &format!("{object}: a field name"))?;
                    }
                    for text in [&o.destination, &o.schedule].into_iter().flatten() {
                        name(text, &format!("{object}: a destination or schedule"))?;
                    }
                    let mut subscribe = o.subscribe.clone();
                    subscribe.sort();
                    subscribe.dedup();
                    if subscribe.len() != o.subscribe.len() {
                        return Err(invalid(format!("{object}: `subscribe` names a change twice")));
                    }
                    let backfill = match o.backfill.map(|b| b.default_period) {
                        None => Backfill::None,
                        Some(PeriodSpec { full_history: Some(true), days: None }) => Backfill::Full,
                        Some(PeriodSpec { days: Some(days), full_history: None | Some(false) }) => Backfill::Days(days),
                        Some(_) => {
                            return Err(invalid(format!(
                                "integration {}: object {}: backfill.defaultPeriod needs exactly one of `days` or `fullHistory: true`",
                                spec.name, o.object_name
                            )))
                        }
                    };
                    Ok(ObjectDecl {
                        name: o.object_name,
                        schedule: o.schedule,
                        backfill,
                        fields: o.required_fields.into_iter().chain(o.optional_fields).map(|f| f.field_name).collect(),
                        destination: o.destination,
                        optional: o.optional,
                        subscribe,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            at_most(&objects, "objects")?;
            Ok(DeclaredIntegration { name: spec.name, provider: spec.provider, manifest: Manifest { objects } })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
specVersion: 1.0.0
integrations:
  - name: hubspot-crm
    provider: hubspot
    read:
      objects:
        - objectName: contacts
          destination: contactsWebhook
          schedule: "*/10 * * * *"
          backfill:
            defaultPeriod:
              days: 30
          requiredFields:
            - fieldName: email
          optionalFields:
            - fieldName: phone
        - objectName: companies
          subscribe: [updated, created]
          backfill:
            defaultPeriod:
              fullHistory: true
"#;

    #[test]
    fn parses_an_amp_style_manifest() {
        let parsed = parse(SAMPLE).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].name, "hubspot-crm");
        assert_eq!(parsed[0].provider, "hubspot");
        let objects = &parsed[0].manifest.objects;
        assert_eq!(objects[0].name, "contacts");
        assert_eq!(objects[0].schedule.as_deref(), Some("*/10 * * * *"));
        assert_eq!(objects[0].backfill, Backfill::Days(30));
        assert_eq!(objects[0].fields, vec!["email", "phone"]);
        assert_eq!(objects[1].backfill, Backfill::Full);
        assert_eq!(objects[1].schedule, None);
        use amplog_domain::change::ChangeKind;
        assert_eq!(objects[1].subscribe, [ChangeKind::Created, ChangeKind::Updated]);
        assert!(objects[0].subscribe.is_empty());
        let twice = SAMPLE.replace("[updated, created]", "[updated, updated]");
        assert!(parse(&twice).is_err());
        assert!(parse(&SAMPLE.replace("[updated, created]", "[exploded]")).is_err());
    }

    #[test]
    fn refuses_unknown_keys_with_their_place_and_bad_shapes() {
        let e = parse(&SAMPLE.replace("schedule:", "schedul:")).unwrap_err();
        assert_eq!(e.code(), "manifest.invalid");
        assert!(e.to_string().contains("schedul") && e.to_string().contains("line"), "{e}");
        assert_eq!(parse("not: [a manifest").unwrap_err().code(), "manifest.invalid");
        assert_eq!(parse("specVersion: 2.0.0\nintegrations: []").unwrap_err().code(), "manifest.invalid");
        assert_eq!(parse("specVersion: 1.0.0\nintegrations: []").unwrap_err().code(), "manifest.invalid");
        let both = SAMPLE.replace("fullHistory: true", "fullHistory: true\n              days: 3");
        assert_eq!(parse(&both).unwrap_err().code(), "manifest.invalid");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 1_000, ..Default::default() })]

        /// Any text is refused or parsed without panicking, and what parses holds only
        /// names within the limits.
        #[test]
        fn any_text_is_parsed_or_refused(text in "(specVersion: 1\\.0\\.0\n)?[-\\[\\]{}:,&*!|>'\"#?a-z0-9 \n\u{0}\u{7f}\u{fffd}\u{10000}]{0,300}") {
            if let Ok(parsed) = parse(&text) {
                for integration in parsed {
                    proptest::prop_assert!(integration.name.chars().count() <= MAX_NAME);
                    proptest::prop_assert!(!integration.name.contains('\0'));
                }
            }
        }

        /// Mutations of a valid manifest: parsed or refused, never a panic.
        #[test]
        fn mutated_manifests_are_parsed_or_refused(at in 0usize..600, insert in "[-\\[\\]{}:&* \n\u{0}a]{0,8}") {
            let mut text = SAMPLE.to_string();
            let at = text.char_indices().map(|(i, _)| i).nth(at % SAMPLE.chars().count()).unwrap_or(0);
            text.insert_str(at, &insert);
            let _ = parse(&text);
        }
    }
}
