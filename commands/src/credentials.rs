//! The credential store (DESIGN invariant 6): secrets are encrypted with AES-256-GCM under a
//! key from configuration and kept out of the log. Events carry the credential id and a keyed
//! fingerprint only.

use crate::error::CommandError;
use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use amplog_domain::connection::CredentialRef;
use amplog_domain::{ConnectionId, CredentialId, ProjectId};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, Row};
use std::fmt;
use uuid::Uuid;

/// A secret (OAuth token set, API key, client secret). Its Debug never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `N` bytes from the operating system's CSPRNG (for API keys, tokens, ...).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use aes_gcm::aead::rand_core::RngCore;
    let mut bytes = [0u8; N];
    OsRng.fill_bytes(&mut bytes);
    bytes
}

/// The encryption key. `key_id` names it, so keys can be rotated.
#[derive(Clone)]
pub struct CredentialKey {
    key_id: String,
    cipher: Aes256Gcm,
    fingerprint_key: [u8; 32],
}

impl fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CredentialKey({})", self.key_id)
    }
}

impl CredentialKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CommandError> {
        if bytes.len() != 32 {
            return Err(CommandError::Credentials(format!("the key must be 32 bytes, got {}", bytes.len())));
        }
        let digest = Sha256::digest(bytes);
        let fingerprint_key: [u8; 32] =
            Sha256::new().chain_update(b"amplog-fingerprint").chain_update(bytes).finalize().into();
        Ok(Self {
            key_id: hex::encode(&digest[..4]),
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(bytes)),
            fingerprint_key,
        })
    }

    /// A fresh random key.
    pub fn generate() -> [u8; 32] {
        Aes256Gcm::generate_key(OsRng).into()
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// A value derived from `input` under the key for one `purpose` (HMAC-SHA256): what
    /// must be recomputed later without being stored, such as a PKCE verifier.
    pub fn derive(&self, purpose: &str, input: &[u8]) -> [u8; 32] {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<Sha256> as Mac>::new_from_slice(&self.fingerprint_key).expect("any key length");
        mac.update(b"amplog-derive\0");
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(input);
        mac.finalize().into_bytes().into()
    }

    /// A keyed digest of the secret: equal secrets give equal fingerprints under one key,
    /// and the fingerprint reveals nothing without the key.
    pub fn fingerprint(&self, secret: &Secret) -> String {
        let digest = Sha256::new().chain_update(self.fingerprint_key).chain_update(secret.0.as_bytes()).finalize();
        format!("sha256:{}", hex::encode(&digest[..12]))
    }
}

/// Encrypts and stores secrets; decrypts them for a project.
#[derive(Clone, Debug)]
pub struct CredentialStore {
    key: CredentialKey,
}

impl CredentialStore {
    pub fn new(key: CredentialKey) -> Self {
        Self { key }
    }

    pub fn key(&self) -> &CredentialKey {
        &self.key
    }

    /// Encrypts and inserts a secret in the caller's transaction.
    pub async fn put(
        &self,
        conn: &mut PgConnection,
        id: CredentialId,
        project_id: ProjectId,
        connection_id: ConnectionId,
        secret: &Secret,
    ) -> Result<CredentialRef, CommandError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        // The ids are associated data: a ciphertext copied to another row does not decrypt.
        let aad = associated_data(id, project_id);
        let ciphertext = self
            .key
            .cipher
            .encrypt(&nonce, Payload { msg: secret.0.as_bytes(), aad: &aad })
            .map_err(|_| CommandError::Credentials("encryption failed".into()))?;
        sqlx::query(
            "INSERT INTO credentials (id, project_id, connection_id, key_id, nonce, ciphertext)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id.0)
        .bind(project_id.0)
        .bind(connection_id.0)
        .bind(&self.key.key_id)
        .bind(nonce.as_slice())
        .bind(&ciphertext)
        .execute(conn)
        .await?;
        Ok(CredentialRef { id, fingerprint: self.key.fingerprint(secret) })
    }

    /// Reads and decrypts a secret of `project_id`. Another project's id is not found.
    pub async fn get(
        &self,
        conn: &mut PgConnection,
        project_id: ProjectId,
        id: CredentialId,
    ) -> Result<Option<Secret>, CommandError> {
        let row = sqlx::query("SELECT key_id, nonce, ciphertext FROM credentials WHERE id = $1 AND project_id = $2")
            .bind(id.0)
            .bind(project_id.0)
            .fetch_optional(conn)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let key_id: String = row.get("key_id");
        if key_id != self.key.key_id {
            return Err(CommandError::Credentials(format!(
                "credential {id} is encrypted under key {key_id}, not the configured one"
            )));
        }
        let nonce: Vec<u8> = row.get("nonce");
        let ciphertext: Vec<u8> = row.get("ciphertext");
        if nonce.len() != 12 {
            return Err(CommandError::Credentials(format!("credential {id} has a malformed nonce")));
        }
        let aad = associated_data(id, project_id);
        let plain =
            self.key.cipher.decrypt(Nonce::from_slice(&nonce), Payload { msg: &ciphertext, aad: &aad }).map_err(
                |_| CommandError::Credentials(format!("credential {id} does not decrypt: wrong key or altered row")),
            )?;
        String::from_utf8(plain)
            .map(|s| Some(Secret(s)))
            .map_err(|_| CommandError::Credentials(format!("credential {id} is not UTF-8")))
    }
}

/// A secret encrypted for a row of some other table (a destination's signing secret).
#[derive(Clone, Debug)]
pub struct Sealed {
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl CredentialStore {
    /// Encrypts `secret`, bound to `aad` (the row's identity): a ciphertext moved to another
    /// row does not decrypt.
    pub fn seal(&self, aad: &[u8], secret: &Secret) -> Result<Sealed, CommandError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = self
            .key
            .cipher
            .encrypt(&nonce, Payload { msg: secret.0.as_bytes(), aad })
            .map_err(|_| CommandError::Credentials("encryption failed".into()))?;
        Ok(Sealed { key_id: self.key.key_id.clone(), nonce: nonce.to_vec(), ciphertext })
    }

    pub fn open(&self, aad: &[u8], sealed: &Sealed) -> Result<Secret, CommandError> {
        if sealed.key_id != self.key.key_id || sealed.nonce.len() != 12 {
            return Err(CommandError::Credentials(format!(
                "a secret is encrypted under key {}, not the configured one",
                sealed.key_id
            )));
        }
        let plain = self
            .key
            .cipher
            .decrypt(Nonce::from_slice(&sealed.nonce), Payload { msg: &sealed.ciphertext, aad })
            .map_err(|_| CommandError::Credentials("a secret does not decrypt: wrong key or altered row".into()))?;
        String::from_utf8(plain).map(Secret).map_err(|_| CommandError::Credentials("a secret is not UTF-8".into()))
    }
}

fn associated_data(id: CredentialId, project_id: ProjectId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(32);
    aad.extend_from_slice(Uuid::as_bytes(&id.0));
    aad.extend_from_slice(Uuid::as_bytes(&project_id.0));
    aad
}
