//! API keys: `amp_<id>_<secret>`. Only the SHA-256 digest of a key is stored; a presented
//! key is found by its id and its digest compared in constant time. Lookups are cached for
//! one second (moka), so a revoked key is refused within a second on every replica.
//!
//! End users' tokens: JWTs a project's backend signs with one of its registered public keys
//! (EdDSA, ES256 or RS256; `kid` names the key, the key names the project). A token must
//! carry `group_ref` and a short `exp`; its holder acts on that group only.

use crate::error::ApiError;
use amplog_commands::{CommandContext, CommandService};
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

/// Who is calling: a key of a project with its scope, or an end user's token (the JWT key's
/// id, `write` scope, narrowed to its group).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub key_id: Uuid,
    pub project_id: ProjectId,
    pub scope: Scope,
    /// An end user's group (`group_ref` of the token): everything else is out of sight.
    pub group: Option<String>,
    pub consumer: Option<String>,
    /// A deployment operator's admin key (`key_id` is its id), acting in `project_id`.
    pub admin: bool,
}

impl Principal {
    pub fn require(&self, need: Scope) -> Result<(), ApiError> {
        if self.scope >= need {
            Ok(())
        } else {
            Err(ApiError::Forbidden { need: need.as_str(), have: self.scope.as_str() })
        }
    }

    /// Refuses end users' tokens: for what is project-wide (configuration, audit of the
    /// project).
    pub fn require_key(&self) -> Result<(), ApiError> {
        match self.group {
            Some(_) => Err(ApiError::EndUser),
            None => Ok(()),
        }
    }

    /// What per-key limits (WebSockets, subscriptions) count by: the key, or for an end
    /// user the key and the group (one end user must not use up a project's share).
    pub fn limit_key(&self) -> Uuid {
        match &self.group {
            Some(group) => Uuid::new_v5(&self.key_id, group.as_bytes()),
            None => self.key_id,
        }
    }

    /// Whether the caller may act on an object of `group`.
    pub fn sees_group(&self, group: &str) -> bool {
        self.group.as_deref().is_none_or(|own| own == group)
    }

    /// The actor recorded in events' metadata: the key's id, never the key; for an end
    /// user, the JWT key and the group.
    pub fn actor(&self) -> String {
        match (&self.group, self.admin) {
            (Some(group), _) => format!("jwt:{}:{group}", self.key_id),
            (None, true) => format!("admin_key:{}", self.key_id),
            (None, false) => format!("api_key:{}", self.key_id),
        }
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
const ADMIN_PREFIX: &str = "amk_";

/// The longest an end user's token may live (its `exp` from now), and the clock skew
/// allowed either way.
pub const MAX_TOKEN_LIFETIME_SECS: i64 = 3600;
pub const CLOCK_SKEW_SECS: u64 = 30;
/// The algorithms a JWT key may use (never HMAC: the server holds no shared secret).
pub const JWT_ALGORITHMS: [&str; 3] = ["EdDSA", "ES256", "RS256"];

/// A JWT key as listed: its id, algorithm and the digest of its public key.
#[derive(Clone, Debug, Serialize)]
pub struct JwtKeyInfo {
    pub kid: Uuid,
    pub algorithm: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

fn algorithm(name: &str) -> Option<jsonwebtoken::Algorithm> {
    match name {
        "EdDSA" => Some(jsonwebtoken::Algorithm::EdDSA),
        "ES256" => Some(jsonwebtoken::Algorithm::ES256),
        "RS256" => Some(jsonwebtoken::Algorithm::RS256),
        _ => None,
    }
}

/// The verifying key of a PEM public key (`-----BEGIN PUBLIC KEY-----`, SPKI) for `alg`.
pub fn decoding_key(alg: &str, pem: &str) -> Result<jsonwebtoken::DecodingKey, ApiError> {
    if pem.len() > 8 * 1024 {
        return Err(ApiError::bad_request("invalid_input", "a public key is at most 8 KiB of PEM"));
    }
    let key = match alg {
        "EdDSA" => jsonwebtoken::DecodingKey::from_ed_pem(pem.as_bytes()),
        "ES256" => jsonwebtoken::DecodingKey::from_ec_pem(pem.as_bytes()),
        "RS256" => jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes()),
        _ => return Err(ApiError::bad_request("invalid_input", "the algorithm is EdDSA, ES256 or RS256")),
    };
    key.map_err(|e| ApiError::bad_request("invalid_input", format!("not a {alg} public key in PEM: {e}")))
}

/// What an end user's token carries.
#[derive(serde::Deserialize)]
struct Claims {
    group_ref: String,
    #[serde(default)]
    consumer_ref: Option<String>,
    exp: i64,
}

fn valid_ref(text: &str) -> bool {
    !text.trim().is_empty() && text.chars().count() <= 100 && !text.chars().any(char::is_control)
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The key store and its short-lived cache. Cheap to clone.
#[derive(Clone)]
pub struct Keys {
    service: CommandService,
    pool: PgPool,
    cache: moka::sync::Cache<[u8; 32], Option<Principal>>,
    /// Admin keys by digest: their id while live.
    admin_cache: moka::sync::Cache<[u8; 32], Option<Uuid>>,
}

/// Who makes and revokes keys: the deployment's operator, through the CLI.
const OPERATOR: &str = "operator";

impl Keys {
    pub fn new(service: &CommandService) -> Self {
        Self::with_ttl(service, Duration::from_secs(1))
    }

    pub fn with_ttl(service: &CommandService, ttl: Duration) -> Self {
        Self {
            service: service.clone(),
            pool: service.pool().clone(),
            cache: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(ttl).build(),
            admin_cache: moka::sync::Cache::builder().max_capacity(1_000).time_to_live(ttl).build(),
        }
    }

    /// Makes a key for `project` (recorded on the project's stream: id, scope, label); the
    /// returned secret is shown once and stored nowhere.
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
        let ctx = CommandContext::new(project, OPERATOR);
        self.service.record_api_key(&ctx, id, scope.as_str(), &digest(&key), label).await?;
        tracing::info!(key_id = %id, project = %project, scope = scope.as_str(), "API key created");
        Ok((id, key))
    }

    /// Revokes a key (recorded on its project's stream); returns whether it existed and
    /// was live.
    pub async fn revoke(&self, id: Uuid) -> Result<bool, ApiError> {
        let project: Option<Uuid> = sqlx::query_scalar("SELECT project_id FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let revoked = match project {
            Some(project) => {
                let ctx = CommandContext::new(ProjectId(project), OPERATOR);
                self.service.revoke_api_key(&ctx, id).await?.is_some()
            }
            None => false,
        };
        self.cache.invalidate_all();
        tracing::info!(key_id = %id, revoked, "API key revocation");
        Ok(revoked)
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
        self.cache.insert(presented_digest, principal.clone());
        principal.ok_or(ApiError::Unauthenticated)
    }

    async fn lookup(&self, presented: &str, presented_digest: &[u8; 32]) -> Result<Option<Principal>, ApiError> {
        if presented.split('.').count() == 3 {
            return self.end_user(presented).await;
        }
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
                group: None,
                consumer: None,
                admin: false,
            })
        }))
    }

    /// The principal of an end user's token: signed by a live key of the project in the
    /// algorithm registered for it (`none` and HMAC never are), `exp` present, not past
    /// and at most an hour ahead (30 seconds' skew allowed), `group_ref` present.
    async fn end_user(&self, token: &str) -> Result<Option<Principal>, ApiError> {
        if token.len() > 16 * 1024 {
            return Ok(None);
        }
        let Ok(header) = jsonwebtoken::decode_header(token) else { return Ok(None) };
        let Some(kid) = header.kid.as_deref().and_then(|k| Uuid::try_parse(k).ok()) else { return Ok(None) };
        let row = sqlx::query("SELECT project_id, alg, public_key FROM jwt_keys WHERE kid = $1 AND revoked_at IS NULL")
            .bind(kid)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let alg: String = row.get("alg");
        let Some(expected) = algorithm(&alg) else { return Ok(None) };
        if header.alg != expected {
            return Ok(None);
        }
        let Ok(key) = decoding_key(&alg, row.get("public_key")) else { return Ok(None) };
        let mut validation = jsonwebtoken::Validation::new(expected);
        validation.leeway = CLOCK_SKEW_SECS;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        let Ok(data) = jsonwebtoken::decode::<Claims>(token, &key, &validation) else { return Ok(None) };
        let claims = data.claims;
        let latest = Utc::now().timestamp() + MAX_TOKEN_LIFETIME_SECS + CLOCK_SKEW_SECS as i64;
        if claims.exp > latest
            || !valid_ref(&claims.group_ref)
            || claims.consumer_ref.as_deref().is_some_and(|c| !valid_ref(c))
        {
            return Ok(None);
        }
        Ok(Some(Principal {
            key_id: kid,
            project_id: ProjectId(row.get("project_id")),
            scope: Scope::Write,
            group: Some(claims.group_ref),
            consumer: claims.consumer_ref,
            admin: false,
        }))
    }

    /// Registers a public key end users' tokens of `project` are signed with; returns its
    /// `kid` (recorded on the project's stream with the key's digest).
    pub async fn create_jwt_key(&self, ctx: &CommandContext, alg: &str, pem: &str) -> Result<Uuid, ApiError> {
        decoding_key(alg, pem)?;
        let kid = Uuid::now_v7();
        self.service.record_jwt_key(ctx, kid, alg, pem).await?;
        Ok(kid)
    }

    pub async fn revoke_jwt_key(
        &self,
        ctx: &CommandContext,
        kid: Uuid,
    ) -> Result<amplog_commands::CommandOutcome, ApiError> {
        let outcome = self.service.revoke_jwt_key(ctx, kid).await?;
        self.cache.invalidate_all();
        Ok(outcome)
    }

    /// Makes an admin key (its `Created` recorded on its own stream); the returned key is
    /// shown once and stored nowhere.
    pub async fn create_admin_key(&self, label: Option<&str>) -> Result<(Uuid, String), ApiError> {
        let id = Uuid::now_v7();
        let secret =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(amplog_commands::credentials::random_bytes::<32>());
        let key = format!("{ADMIN_PREFIX}{}_{secret}", id.simple());
        self.service.record_admin_key(id, &digest(&key), label, OPERATOR).await?;
        tracing::info!(admin_key = %id, "admin key created");
        Ok((id, key))
    }

    /// Revokes an admin key; returns whether it was live.
    pub async fn revoke_admin_key(&self, id: Uuid) -> Result<bool, ApiError> {
        let revoked = self.service.revoke_admin_key(id, OPERATOR).await?.is_some();
        self.admin_cache.invalidate_all();
        tracing::info!(admin_key = %id, revoked, "admin key revocation");
        Ok(revoked)
    }

    /// The principal of an admin key acting in `project` (which must exist); the use is
    /// recorded on the key's stream before the request runs (`what`: the request's kind).
    pub async fn authenticate_admin(
        &self,
        presented: &str,
        project: ProjectId,
        what: &str,
    ) -> Result<Principal, ApiError> {
        let presented_digest = digest(presented);
        let id = match self.admin_cache.get(&presented_digest) {
            Some(cached) => cached,
            None => {
                let id = self.admin_lookup(presented, &presented_digest).await?;
                self.admin_cache.insert(presented_digest, id);
                id
            }
        };
        let id = id.ok_or(ApiError::Unauthenticated)?;
        let ctx = CommandContext::new(project, format!("admin_key:{id}"));
        let exists = self.service.load::<amplog_domain::project::Project>(&ctx, project.0).await?.state.exists;
        if !exists {
            return Err(ApiError::NotFound("project"));
        }
        self.service.record_admin_key_use(id, project, what).await?;
        Ok(Principal { key_id: id, project_id: project, scope: Scope::Admin, group: None, consumer: None, admin: true })
    }

    async fn admin_lookup(&self, presented: &str, presented_digest: &[u8; 32]) -> Result<Option<Uuid>, ApiError> {
        let Some(id) = presented
            .strip_prefix(ADMIN_PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .and_then(|(id, _)| Uuid::try_parse(id).ok())
        else {
            return Ok(None);
        };
        let stored: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT digest FROM admin_keys WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(stored.filter(|stored| bool::from(stored.as_slice().ct_eq(&presented_digest[..]))).map(|_| id))
    }

    pub async fn jwt_keys(&self, project: ProjectId) -> Result<Vec<JwtKeyInfo>, ApiError> {
        let rows = sqlx::query(
            "SELECT kid, alg, created_at, revoked_at FROM jwt_keys WHERE project_id = $1 ORDER BY created_at",
        )
        .bind(project.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| JwtKeyInfo {
                kid: r.get("kid"),
                algorithm: r.get("alg"),
                created_at: r.get("created_at"),
                revoked_at: r.get("revoked_at"),
            })
            .collect())
    }
}
