//! API keys: `amp_<id>_<secret>`. Only the SHA-256 digest of a key is stored; a presented
//! key is found by its id and its digest compared in constant time. Lookups are cached for
//! one second (moka), so a revoked key is refused within a second on every replica.

use crate::error::ApiError;
use amplog_domain::ProjectId;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use std::time::Duration;
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// What a key may do. Each scope includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Queries, subscriptions and audit reads.
    Read,
    /// Also mutations on connections, installations and operations.
    Write,
    /// Also declaring integrations and deploying manifests.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// Who is calling: a key of a project, with its scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Principal {
    pub key_id: Uuid,
    pub project_id: ProjectId,
    pub scope: Scope,
}

impl Principal {
    pub fn require(&self, need: Scope) -> Result<(), ApiError> {
        if self.scope >= need {
            Ok(())
        } else {
            Err(ApiError::Forbidden { need: need.as_str(), have: self.scope.as_str() })
        }
    }

    /// The actor recorded in events' metadata: the key's id, never the key.
    pub fn actor(&self) -> String {
        format!("api_key:{}", self.key_id)
    }
}

/// A key as listed: never its secret.
#[derive(Clone, Debug, Serialize)]
pub struct KeyInfo {
    pub id: Uuid,
    pub project_id: Uuid,
    pub scope: Scope,
    pub label: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

const PREFIX: &str = "amp_";

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The key store and its short-lived cache. Cheap to clone.
#[derive(Clone)]
pub struct Keys {
    pool: PgPool,
    cache: moka::sync::Cache<[u8; 32], Option<Principal>>,
}

impl Keys {
    pub fn new(pool: PgPool) -> Self {
        Self::with_ttl(pool, Duration::from_secs(1))
    }

    pub fn with_ttl(pool: PgPool, ttl: Duration) -> Self {
        Self { pool, cache: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(ttl).build() }
    }

    /// Makes a key for `project`; the returned secret is shown once and stored nowhere.
    pub async fn create(
        &self,
        project: ProjectId,
        scope: Scope,
        label: Option<&str>,
    ) -> Result<(Uuid, String), ApiError> {
        let id = Uuid::now_v7();
        let secret =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(amplog_commands::credentials::random_bytes::<32>());
        let key = format!("{PREFIX}{}_{secret}", id.simple());
        sqlx::query("INSERT INTO api_keys (id, project_id, scope, digest, label) VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(project.0)
            .bind(scope.as_str())
            .bind(&digest(&key)[..])
            .bind(label)
            .execute(&self.pool)
            .await?;
        tracing::info!(key_id = %id, project = %project, scope = scope.as_str(), "API key created");
        Ok((id, key))
    }

    /// Revokes a key; returns whether it existed and was live.
    pub async fn revoke(&self, id: Uuid) -> Result<bool, ApiError> {
        let done = sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.cache.invalidate_all();
        tracing::info!(key_id = %id, revoked = done.rows_affected() == 1, "API key revocation");
        Ok(done.rows_affected() == 1)
    }

    pub async fn list(&self, project: ProjectId) -> Result<Vec<KeyInfo>, ApiError> {
        let rows = sqlx::query(
            "SELECT id, project_id, scope, label, created_at, revoked_at FROM api_keys
             WHERE project_id = $1 ORDER BY created_at",
        )
        .bind(project.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| KeyInfo {
                id: r.get("id"),
                project_id: r.get("project_id"),
                scope: Scope::parse(r.get("scope")).unwrap_or(Scope::Read),
                label: r.get("label"),
                created_at: r.get("created_at"),
                revoked_at: r.get("revoked_at"),
            })
            .collect())
    }

    /// The principal of a presented key, or `Unauthenticated`.
    pub async fn authenticate(&self, presented: &str) -> Result<Principal, ApiError> {
        let presented_digest = digest(presented);
        if let Some(cached) = self.cache.get(&presented_digest) {
            return cached.ok_or(ApiError::Unauthenticated);
        }
        let principal = self.lookup(presented, &presented_digest).await?;
        self.cache.insert(presented_digest, principal);
        principal.ok_or(ApiError::Unauthenticated)
    }

    async fn lookup(&self, presented: &str, presented_digest: &[u8; 32]) -> Result<Option<Principal>, ApiError> {
        let Some(id) = presented
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .and_then(|(id, _)| Uuid::try_parse(id).ok())
        else {
            return Ok(None);
        };
        let row = sqlx::query("SELECT project_id, scope, digest FROM api_keys WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.and_then(|row| {
            let stored: Vec<u8> = row.get("digest");
            let equal: bool = stored.as_slice().ct_eq(&presented_digest[..]).into();
            equal.then(|| Principal {
                key_id: id,
                project_id: ProjectId(row.get("project_id")),
                scope: Scope::parse(row.get("scope")).unwrap_or(Scope::Read),
            })
        }))
    }
}
