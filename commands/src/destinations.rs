//! Destinations: a project's named webhook endpoints, each with a Standard Webhooks signing
//! secret (`whsec_` + base64 of 24 random bytes) kept encrypted. Changed only by the
//! command service (`put_destination`, `disable_destination`), which records each change
//! on the project's stream; this table is what deliveries read.

use crate::credentials::{random_bytes, CredentialStore, Sealed, Secret};
use crate::error::CommandError;
use amplog_domain::ProjectId;
use base64::Engine;
use sqlx::{PgConnection, PgPool, Row};

/// A destination with its secret, ready to sign deliveries.
#[derive(Clone, Debug)]
pub struct Destination {
    pub name: String,
    pub url: String,
    pub secret: Secret,
    /// Why deliveries to it stopped (it answered 410 Gone), when they did.
    pub disabled: Option<String>,
}

/// The destination an object's reads go to when its manifest names none.
pub const DEFAULT_DESTINATION: &str = "default";

fn aad(project: ProjectId, name: &str) -> Vec<u8> {
    let mut aad = project.0.as_bytes().to_vec();
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// A new signing secret.
pub fn new_secret() -> Secret {
    Secret(format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(random_bytes::<24>())))
}

/// Creates or replaces destination `name` of `project` (enabled again if it was disabled)
/// in the caller's transaction; returns its signing secret. `secret` is generated when not
/// given.
pub(crate) async fn put(
    conn: &mut PgConnection,
    store: &CredentialStore,
    project: ProjectId,
    name: &str,
    url: &str,
    secret: Option<Secret>,
) -> Result<Secret, CommandError> {
    let valid_name = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid_name {
        return Err(CommandError::Invalid(format!("destination name `{name}`: 1 to 64 of [A-Za-z0-9_.-]")));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048 {
        return Err(CommandError::Invalid(format!("destination url `{url}` must be an http(s) URL")));
    }
    let secret = secret.unwrap_or_else(new_secret);
    if !secret.0.starts_with("whsec_") {
        return Err(CommandError::Invalid("a signing secret starts with `whsec_`".into()));
    }
    let sealed = store.seal(&aad(project, name), &secret)?;
    sqlx::query(
        "INSERT INTO destinations (project_id, name, url, key_id, nonce, ciphertext) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (project_id, name) DO UPDATE
           SET url = EXCLUDED.url, key_id = EXCLUDED.key_id, nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext,
               disabled_at = NULL, disabled_reason = NULL",
    )
    .bind(project.0)
    .bind(name)
    .bind(url)
    .bind(&sealed.key_id)
    .bind(&sealed.nonce)
    .bind(&sealed.ciphertext)
    .execute(conn)
    .await?;
    Ok(secret)
}

/// Whether `project` has a destination `name` (enabled or not).
pub(crate) async fn exists(conn: &mut PgConnection, project: ProjectId, name: &str) -> Result<bool, CommandError> {
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM destinations WHERE project_id = $1 AND name = $2")
        .bind(project.0)
        .bind(name)
        .fetch_optional(conn)
        .await?;
    Ok(found.is_some())
}

/// Destination `name` of `project`, decrypted.
pub async fn get(
    pool: &PgPool,
    store: &CredentialStore,
    project: ProjectId,
    name: &str,
) -> Result<Option<Destination>, CommandError> {
    let row = sqlx::query(
        "SELECT url, key_id, nonce, ciphertext, disabled_reason FROM destinations WHERE project_id = $1 AND name = $2",
    )
    .bind(project.0)
    .bind(name)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let sealed = Sealed { key_id: row.get("key_id"), nonce: row.get("nonce"), ciphertext: row.get("ciphertext") };
    let secret = store.open(&aad(project, name), &sealed)?;
    Ok(Some(Destination { name: name.into(), url: row.get("url"), secret, disabled: row.get("disabled_reason") }))
}

/// Stops deliveries to destination `name` of `project` until it is created again (in the
/// caller's transaction).
pub(crate) async fn disable(
    conn: &mut PgConnection,
    project: ProjectId,
    name: &str,
    reason: &str,
) -> Result<(), CommandError> {
    sqlx::query(
        "UPDATE destinations SET disabled_at = now(), disabled_reason = $3
         WHERE project_id = $1 AND name = $2 AND disabled_at IS NULL",
    )
    .bind(project.0)
    .bind(name)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Names, URLs and (when disabled) why, of a project's destinations.
pub async fn list(pool: &PgPool, project: ProjectId) -> Result<Vec<(String, String, Option<String>)>, CommandError> {
    Ok(sqlx::query_as("SELECT name, url, disabled_reason FROM destinations WHERE project_id = $1 ORDER BY name")
        .bind(project.0)
        .fetch_all(pool)
        .await?)
}
