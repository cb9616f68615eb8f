//! The stream hash chain (DESIGN invariant 9). Each event's hash is
//! `sha256(prev_hash || field_1 || ... || field_7)`, each field length-prefixed (u32, big
//! endian): aggregate_type, aggregate_id, sequence (decimal), event_type, event_version,
//! payload text, metadata text, exactly as stored. The first event of a stream chains from
//! 32 zero bytes. An auditor can recompute it from the rows alone.

use sha2::{Digest, Sha256};

pub const GENESIS: [u8; 32] = [0; 32];

/// The fields an event's hash covers, as stored.
pub struct Canonical<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: i64,
    pub event_type: &'a str,
    pub event_version: &'a str,
    pub payload: &'a str,
    pub metadata: &'a str,
}

pub fn chain(prev: Option<&[u8]>, event: &Canonical<'_>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev.unwrap_or(&GENESIS));
    let sequence = event.sequence.to_string();
    for field in [
        event.aggregate_type,
        event.aggregate_id,
        sequence.as_str(),
        event.event_type,
        event.event_version,
        event.payload,
        event.metadata,
    ] {
        hasher.update((field.len() as u32).to_be_bytes());
        hasher.update(field.as_bytes());
    }
    hasher.finalize().into()
}
