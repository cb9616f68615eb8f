//! Webhook destinations, per the Standard Webhooks spec: each delivery is a POST whose
//! `webhook-id` names the message (the same on every retry), `webhook-timestamp` is the
//! send time in seconds, and `webhook-signature` is `v1,` + base64 HMAC-SHA256, keyed by
//! the base64 part of the `whsec_` secret, over `{id}.{timestamp}.{body}`.

use base64::Engine;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;
use std::time::Duration;

/// The HMAC key a `whsec_` secret stands for.
fn key(secret: &str) -> Vec<u8> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    base64::engine::general_purpose::STANDARD.decode(encoded).unwrap_or_else(|_| encoded.as_bytes().to_vec())
}

/// `v1,<base64 signature>` of a message.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(&key(secret)).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// Whether `signature` is HubSpot's v3 signature of a request: base64 HMAC-SHA256, keyed
/// by the app's client secret, over method, URL, body and timestamp (milliseconds);
/// compared in constant time.
pub fn hubspot_v3_matches(secret: &str, method: &str, url: &str, body: &[u8], timestamp: i64, signature: &str) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(method.as_bytes());
    mac.update(url.as_bytes());
    mac.update(body);
    mac.update(timestamp.to_string().as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    use subtle::ConstantTimeEq;
    signature.len() == expected.len() && bool::from(signature.as_bytes().ct_eq(expected.as_bytes()))
}

/// Why a received message is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("a webhook-id, webhook-timestamp or webhook-signature header is missing")]
    MissingHeaders,
    #[error("the timestamp is too far from now")]
    Stale,
    #[error("no signature matches")]
    BadSignature,
}

/// Verifies a received message as a receiver should: headers present, timestamp within
/// `tolerance` of `now`, one of the (space-separated) signatures matching, compared in
/// constant time.
pub fn verify(secret: &str, headers: &HeaderMap, body: &[u8], now: i64, tolerance: i64) -> Result<String, VerifyError> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(timestamp), Some(signatures)) =
        (get("webhook-id"), get("webhook-timestamp"), get("webhook-signature"))
    else {
        return Err(VerifyError::MissingHeaders);
    };
    let timestamp: i64 = timestamp.parse().map_err(|_| VerifyError::MissingHeaders)?;
    if (now - timestamp).abs() > tolerance {
        return Err(VerifyError::Stale);
    }
    let expected = sign(secret, id, timestamp, body);
    let matches = signatures.split(' ').any(|s| {
        use subtle::ConstantTimeEq;
        s.len() == expected.len() && bool::from(s.as_bytes().ct_eq(expected.as_bytes()))
    });
    if matches {
        Ok(id.to_string())
    } else {
        Err(VerifyError::BadSignature)
    }
}

/// The outcome of one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempted {
    pub status: Option<u16>,
    pub error: Option<String>,
}

impl Attempted {
    pub fn delivered(&self) -> bool {
        self.error.is_none()
    }
}

/// Sends one signed message; any 2xx is delivered, anything else (a 3xx included: the
/// client must not follow redirects) or no answer is not.
pub async fn deliver(client: &reqwest::Client, url: &str, secret: &str, id: &str, body: &[u8]) -> Attempted {
    let timestamp = chrono::Utc::now().timestamp();
    let request = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", sign(secret, id, timestamp, body))
        .body(body.to_vec());
    match request.send().await {
        Ok(response) if response.status().is_success() => {
            Attempted { status: Some(response.status().as_u16()), error: None }
        }
        Ok(response) => {
            let status = response.status().as_u16();
            let why = match response.status().is_redirection() {
                true => " (a redirect: deliveries never follow one)",
                false => "",
            };
            Attempted { status: Some(status), error: Some(format!("the endpoint answered HTTP {status}{why}")) }
        }
        Err(e) => Attempted { status: None, error: Some(format!("the endpoint did not answer: {e}")) },
    }
}

/// How page deliveries are retried: `max_attempts` quick tries (backoff up to
/// `max_backoff`), then, the destination being down, parked retries whose backoff grows to
/// `max_outage_backoff`, for as long as the outage lasts.
#[derive(Clone, Debug)]
pub struct DeliveryPolicy {
    pub max_attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub max_outage_backoff: Duration,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(15),
            max_outage_backoff: Duration::from_secs(30 * 60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_standard_webhooks_example() {
        // The example of the Standard Webhooks reference implementation's tests.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek".parse().unwrap());
        headers.insert("webhook-timestamp", "1614265330".parse().unwrap());
        headers.insert("webhook-signature", format!("v1,bm9wZQ== {signature}").parse().unwrap());
        assert_eq!(verify(secret, &headers, body, 1614265330, 300).as_deref(), Ok("msg_p5jXN8AQM9LWM0D4loKWxJek"));
        assert_eq!(verify(secret, &headers, body, 1614265330 + 301, 300), Err(VerifyError::Stale));
        assert_eq!(verify(secret, &headers, b"{}", 1614265330, 300), Err(VerifyError::BadSignature));
    }
}
