//! The proxy's outbound half: where a call goes (below the connector's base URL, or the
//! connection's instance URL; the connector's hosts only, through the egress rule; no
//! redirect followed), the request sent with the connection's access token, a refused
//! token refreshed once and the call sent again, a 429 waited out within the caller's
//! budget; the answer comes back as a stream. A body that streams cannot be sent twice:
//! only calls whose body is buffered (small, or none) are retried.

use crate::connector::{Connector, ProviderError, TokenSet};
use crate::tokens::Tokens;
use amplog_commands::CommandContext;
use amplog_domain::operation::ErrorClass;
use amplog_domain::ConnectionId;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use http::{header, HeaderMap, HeaderName, Method, StatusCode};
use std::time::{Duration, Instant};

/// A request body to forward.
pub enum ProxyBody {
    Empty,
    /// Held whole: the call can be sent again (after a refresh, or a 429).
    Buffered(Bytes),
    /// Streamed through as it arrives: sent once.
    Streaming(BoxStream<'static, Result<Bytes, std::io::Error>>),
}

/// One call to forward.
pub struct ProxyRequest<'a> {
    pub ctx: &'a CommandContext,
    pub connection: ConnectionId,
    pub connector: &'a Connector,
    pub method: Method,
    /// Below the base URL, checked by the caller: no `.`/`..` or empty segments, no
    /// encoded separators.
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// Already stripped of what must not be forwarded (`forwardable`).
    pub headers: HeaderMap,
    pub body: ProxyBody,
    /// How long the caller lets a 429 be waited out (zero: answered at once).
    pub rate_limit_wait: Duration,
}

/// The provider's answer.
pub struct ProxyAnswer {
    pub status: StatusCode,
    /// Stripped of what must not be forwarded back.
    pub headers: HeaderMap,
    pub body: BoxStream<'static, Result<Bytes, ProviderError>>,
    /// The token was refused, refreshed and the call sent again.
    pub refreshed: bool,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), the caller's credentials for amplog, cookies both
/// ways and what the client sets itself: never forwarded. Headers a `Connection` header
/// names are hop-by-hop too (`strip`).
pub fn forwardable(name: &HeaderName) -> bool {
    let name = name.as_str();
    !(matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "authorization"
            | "x-api-key"
            | "cookie"
            | "set-cookie"
            | "forwarded"
            | "x-forwarded-for"
            | "x-forwarded-host"
            | "x-forwarded-proto"
            | "x-real-ip"
    ) || name.starts_with("x-amplog-")
        || name.starts_with("x-admin-"))
}

/// `headers` without what must not be forwarded, nor what their `Connection` header names.
pub fn strip(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|n| n.trim().to_ascii_lowercase()))
        .collect();
    let mut kept = HeaderMap::new();
    for (name, value) in headers {
        if forwardable(name) && !named.iter().any(|n| n == name.as_str()) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

/// A provider's answer's headers as they may reach the caller: `strip`'s, and none that
/// would speak for amplog's own origin (CORS, HSTS, Alt-Svc, key pins, Clear-Site-Data).
pub fn strip_response(headers: &HeaderMap) -> HeaderMap {
    let mut kept = strip(headers);
    let own: Vec<HeaderName> = kept
        .keys()
        .filter(|n| {
            let n = n.as_str();
            n.starts_with("access-control-")
                || n.starts_with("public-key-pins")
                || matches!(n, "strict-transport-security" | "alt-svc" | "clear-site-data" | "timing-allow-origin")
        })
        .cloned()
        .collect();
    for name in own {
        kept.remove(name);
    }
    kept
}

/// The error class of a provider's status (none for a success or a redirect).
pub fn status_class(status: StatusCode) -> Option<ErrorClass> {
    match status.as_u16() {
        100..=399 => None,
        401 | 403 => Some(ErrorClass::AuthInvalidated),
        429 => Some(ErrorClass::RateLimited),
        408 | 504 => Some(ErrorClass::Timeout),
        500.. => Some(ErrorClass::Provider5xx),
        _ => Some(ErrorClass::BadRequest),
    }
}

impl Connector {
    /// The URL of a proxy call: `path` below where the customer's data lives, the query as
    /// given, on the connector's hosts only.
    pub fn proxy_url(&self, tokens: &TokenSet, path: &str, query: Option<&str>) -> Result<url::Url, ProviderError> {
        let base = self.data_base(tokens).trim_end_matches('/');
        let mut url = url::Url::parse(&format!("{base}/{}", path.trim_start_matches('/')))
            .map_err(|e| ProviderError::new(ErrorClass::BadRequest, format!("not a valid provider path: {e}")))?;
        url.set_query(query.filter(|q| !q.is_empty()));
        let base_path = url::Url::parse(base).map(|b| b.path().trim_end_matches('/').to_string()).unwrap_or_default();
        if !url.path().starts_with(&base_path) {
            return Err(ProviderError::new(ErrorClass::BadRequest, "the path leaves the provider's API"));
        }
        self.check_host(&url)?;
        Ok(url)
    }
}

/// Sends the call, with one refresh on a refused token and 429s waited out within the
/// caller's budget (both only when the body can be sent again).
pub async fn send(tokens: &Tokens, request: ProxyRequest<'_>) -> Result<ProxyAnswer, ProviderError> {
    let ProxyRequest { ctx, connection, connector, method, path, query, headers, body, rate_limit_wait } = request;
    let mut token = tokens.access_token(ctx, connection, connector, None).await?;
    let mut refreshed = false;
    let deadline = Instant::now() + rate_limit_wait;
    let mut body = Some(body);
    loop {
        let url = connector.proxy_url(&token, path, query)?;
        let (sent, again) = match body.take() {
            Some(ProxyBody::Empty) | None => (reqwest::Body::from(Bytes::new()), Some(ProxyBody::Empty)),
            Some(ProxyBody::Buffered(bytes)) => (reqwest::Body::from(bytes.clone()), Some(ProxyBody::Buffered(bytes))),
            Some(ProxyBody::Streaming(stream)) => (reqwest::Body::wrap_stream(stream), None),
        };
        let replayable = again.is_some();
        body = again;
        let request = connector
            .streaming
            .request(method.clone(), url.clone())
            .headers(headers.clone())
            .bearer_auth(&token.access_token)
            .body(sent)
            .build()
            .map_err(|e| ProviderError::new(ErrorClass::BadRequest, format!("the request cannot be built: {e}")))?;
        let response = connector.streaming.execute(request).await.map_err(|e| {
            let class = if e.is_timeout() || e.is_connect() { ErrorClass::Timeout } else { ErrorClass::Provider5xx };
            ProviderError::new(class, format!("the provider could not be reached: {e}"))
        })?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED && !refreshed && replayable {
            refreshed = true;
            match tokens.access_token(ctx, connection, connector, Some(&token.access_token)).await {
                Ok(fresh) => {
                    tracing::info!(connection = %connection, "proxy: the token was refused; refreshed, sending again");
                    token = fresh;
                    continue;
                }
                Err(error) => tracing::warn!(connection = %connection, %error, "proxy: the refresh failed"),
            }
        }
        if status == StatusCode::TOO_MANY_REQUESTS && replayable {
            let wait = response
                .headers()
                .get(connector.entry.rate_limit.retry_after.as_str())
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| Duration::from_secs_f64(s.min(3600.0)))
                .unwrap_or(Duration::from_secs(1));
            if Instant::now() + wait <= deadline {
                drop(response);
                tokio::time::sleep(wait).await;
                continue;
            }
        }
        let headers = strip_response(response.headers());
        let body = response
            .bytes_stream()
            .map_err(|e| ProviderError::new(ErrorClass::Timeout, format!("reading the provider's answer failed: {e}")))
            .boxed();
        return Ok(ProxyAnswer { status, headers, body, refreshed });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_hop_by_hop_and_connection_named_headers_are_not_forwarded() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer amp_x"),
            ("x-api-key", "amp_x"),
            ("x-admin-key", "amk_x"),
            ("x-amplog-project", "p"),
            ("cookie", "a=b"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("host", "amplog.example"),
            ("content-type", "application/json"),
            ("x-custom", "kept"),
        ] {
            headers.append(HeaderName::from_static(name), value.parse().unwrap());
        }
        let kept = strip(&headers);
        let names: Vec<&str> = kept.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type", "x-custom"]);
        for (name, value) in [
            ("access-control-allow-origin", "*"),
            ("strict-transport-security", "max-age=1"),
            ("alt-svc", "h3=\":443\""),
            ("set-cookie", "a=b"),
        ] {
            headers.append(HeaderName::from_static(name), value.parse().unwrap());
        }
        let stripped = strip_response(&headers);
        let names: Vec<&str> = stripped.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type", "x-custom"]);
    }

    #[test]
    fn statuses_are_classified() {
        assert_eq!(status_class(StatusCode::OK), None);
        assert_eq!(status_class(StatusCode::FOUND), None);
        assert_eq!(status_class(StatusCode::NOT_FOUND), Some(ErrorClass::BadRequest));
        assert_eq!(status_class(StatusCode::TOO_MANY_REQUESTS), Some(ErrorClass::RateLimited));
        assert_eq!(status_class(StatusCode::UNAUTHORIZED), Some(ErrorClass::AuthInvalidated));
        assert_eq!(status_class(StatusCode::BAD_GATEWAY), Some(ErrorClass::Provider5xx));
    }
}
