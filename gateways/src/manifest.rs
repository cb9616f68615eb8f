//! Integration manifests in YAML, shaped like an `amp.yaml`: a spec version and a list of
//! integrations, each with a provider and the objects it reads (schedule, backfill,
//! fields). Parsed strictly (unknown keys are errors, with their line and column), then
//! turned into the domain's `Manifest`, whose own rules the domain checks on deploy.

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

/// Parses a manifest file. Every error names where it is.
pub fn parse(yaml: &str) -> Result<Vec<DeclaredIntegration>, ApiError> {
    if yaml.len() > 256 * 1024 {
        return Err(invalid("a manifest must be at most 256 KiB"));
    }
    let file: File = serde_yaml_ng::from_str(yaml).map_err(|e| invalid(format!("manifest: {e}")))?;
    if !file.spec_version.starts_with("1.") {
        return Err(invalid(format!("specVersion {} is not supported (1.x is)", file.spec_version)));
    }
    if file.integrations.is_empty() {
        return Err(invalid("a manifest must declare at least one integration"));
    }
    file.integrations
        .into_iter()
        .map(|spec| {
            let objects = spec
                .read
                .map(|r| r.objects)
                .unwrap_or_default()
                .into_iter()
                .map(|o| {
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
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
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
}
