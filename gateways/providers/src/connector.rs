//! Provider connectors, driven by the declarative catalog `catalog/providers.yaml`: one
//! generic HTTP client reads pages (cursor-param or next-URL pagination, a query-param or
//! SOQL modification filter), writes batches, and exchanges and refreshes OAuth2 tokens.
//! Every failure comes back classified (`ErrorClass`), which decides the worker's policy.
//! Every request goes only to the connector's hosts (its base URL's and the catalog's
//! `allowedHosts`), through the deployment's `Egress` rule.

use amplog_domain::operation::ErrorClass;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The catalog shipped in the repository.
pub const CATALOG: &str = include_str!("../catalog/providers.yaml");

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Catalog {
    pub providers: BTreeMap<String, ProviderEntry>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProviderEntry {
    pub display_name: String,
    pub base_url: String,
    /// Hosts besides the base URL's that calls may go to (`*.my.salesforce.com`): where a
    /// token's `instance_url` or an absolute next-page URL may point.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    pub auth: AuthSpec,
    pub read: ReadSpec,
    #[serde(default)]
    pub write: Option<WriteSpec>,
    pub rate_limit: RateLimitSpec,
    pub objects: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthSpec {
    pub style: AuthStyle,
    pub authorize_url: String,
    pub token_url: String,
    /// Data calls go to the token response's `instance_url` (Salesforce: one host per org),
    /// not to the base URL.
    #[serde(default)]
    pub instance_url: bool,
    /// The provider takes PKCE (RFC 7636, `S256`) on the authorization code grant.
    #[serde(default)]
    pub pkce: bool,
    /// Where a token is revoked (RFC 7009), if the provider has such an endpoint.
    #[serde(default)]
    pub revoke_url: Option<String>,
    /// A JSON pointer to the customer's account id in the token response (HubSpot's portal):
    /// what the provider's change webhooks name the account by.
    #[serde(default)]
    pub account_id: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum AuthStyle {
    Oauth2,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReadSpec {
    pub path: String,
    /// One record by id (`{object}`, `{id}`): what a pushed change delivers.
    #[serde(default)]
    pub record: Option<String>,
    pub pagination: Pagination,
    /// JSON pointer to the page's records.
    pub records: String,
    pub incremental: Incremental,
    pub fields: FieldSpec,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "style", rename_all = "camelCase", deny_unknown_fields)]
pub enum Pagination {
    /// The next page is asked for with `?{param}={token}`; the token is at `next`.
    #[serde(rename_all = "camelCase")]
    CursorParam { param: String, next: String, limit_param: String, page_size: usize },
    /// The next page is the URL (relative to the base) at `next`.
    NextUrl { next: String },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "style", rename_all = "camelCase", deny_unknown_fields)]
pub enum Incremental {
    /// `?{param}={RFC 3339 time}`.
    QueryParam { param: String },
    /// A query in `?{param}=`: `full` without a lower bound, `since` with `{since}`.
    Soql { param: String, full: String, since: String },
}

/// JSON pointers into one record.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FieldSpec {
    pub id: String,
    pub updated: String,
    pub archived: String,
    /// The record's fields; the whole record when absent.
    #[serde(default)]
    pub data: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WriteSpec {
    pub style: WriteStyle,
    pub path: String,
    pub max_batch: usize,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum WriteStyle {
    /// `POST {inputs: [{id?, properties}]}` → `{results: [{index, status, id?, message?}]}`.
    BatchUpsert,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    pub retry_after: String,
    #[serde(default)]
    pub remaining: Option<String>,
}

/// Why a provider call failed, classified.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
#[error("{class:?}: {message}")]
pub struct ProviderError {
    pub class: ErrorClass,
    pub status: Option<u16>,
    pub message: String,
    /// How long the provider asked us to wait (429 Retry-After).
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self { class, status: None, message: message.into(), retry_after: None }
    }

    /// The token endpoint refused the grant (revoked or expired refresh token).
    pub fn is_invalid_grant(&self) -> bool {
        self.class == ErrorClass::AuthInvalidated && self.message.starts_with("invalid_grant")
    }
}

/// A connection's OAuth2 token set: the secret kept in the credential store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenSet {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// When amplog got it: with `expires_at`, its lifetime (refreshes come a fraction of it early).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub obtained_at: Option<DateTime<Utc>>,
    /// Where this customer's data lives, when the provider says (Salesforce).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_url: Option<String>,
    /// The customer's account at the provider (`auth.accountId` of the catalog).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
}

/// One record read from a provider.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ProviderRecord {
    pub id: String,
    #[serde(rename = "updatedAt")]
    pub updated: DateTime<Utc>,
    pub archived: bool,
    pub fields: Value,
}

/// One page read: records and the token of the next page (none: the read is complete).
#[derive(Clone, Debug)]
pub struct ProviderPage {
    pub records: Vec<ProviderRecord>,
    pub next: Option<String>,
    pub bytes: u64,
}

/// One record's outcome in a write.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WriteResult {
    pub index: usize,
    pub ok: bool,
    pub id: Option<String>,
    pub error: Option<String>,
}

/// The OAuth client amplog uses at a provider.
#[derive(Clone)]
pub struct ClientApp {
    pub client_id: String,
    pub client_secret: String,
}

impl std::fmt::Debug for ClientApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientApp").field("client_id", &self.client_id).finish_non_exhaustive()
    }
}

/// A provider's connector: its catalog entry, where it is, and amplog's client there.
#[derive(Clone, Debug)]
pub struct Connector {
    pub name: String,
    pub entry: ProviderEntry,
    pub base_url: String,
    pub app: ClientApp,
    /// The hosts calls may go to: the base URL's and the catalog's `allowedHosts`.
    hosts: Vec<crate::egress::HostPattern>,
    egress: crate::egress::Egress,
    http: reqwest::Client,
    /// For proxy calls: no bound on the whole exchange (bodies stream), only on each read.
    pub(crate) streaming: reqwest::Client,
}

/// The connectors by provider name.
#[derive(Clone, Debug, Default)]
pub struct Connectors {
    by_name: BTreeMap<String, Arc<Connector>>,
    egress: crate::egress::Egress,
}

/// An outbound HTTP client builder: TLS through rustls (ring, the platform's roots), the
/// timeouts every provider and destination call gets.
pub fn http_client() -> reqwest::ClientBuilder {
    streaming_http_client().timeout(Duration::from_secs(30))
}

/// The same without a bound on the whole exchange (a proxied body may take minutes); a
/// connection must open within 5 s and each read must make progress within 60 s.
pub fn streaming_http_client() -> reqwest::ClientBuilder {
    // Once per process; later calls find it installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).read_timeout(Duration::from_secs(60))
}

impl Catalog {
    pub fn builtin() -> Catalog {
        serde_yaml_ng::from_str(CATALOG).expect("the shipped catalog parses (a test checks it)")
    }
}

/// The names of the shipped catalog's providers, which manifests may name.
pub fn known_providers() -> &'static [String] {
    static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    NAMES.get_or_init(|| Catalog::builtin().providers.into_keys().collect())
}

pub fn is_known_provider(name: &str) -> bool {
    known_providers().iter().any(|p| p == name)
}

/// Deployment settings of one provider: where it is and amplog's client there.
#[derive(Clone, Debug, Default)]
pub struct ProviderSettings {
    pub base_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
}

impl ProviderSettings {
    /// From `AMPLOG_PROVIDER_<NAME>_URL`, `_CLIENT_ID`, `_CLIENT_SECRET` (name upper-cased,
    /// `-` as `_`).
    pub fn from_env(name: &str) -> ProviderSettings {
        let prefix = format!("AMPLOG_PROVIDER_{}_", name.to_ascii_uppercase().replace('-', "_"));
        let var = |suffix: &str| std::env::var(format!("{prefix}{suffix}")).ok().filter(|v| !v.is_empty());
        ProviderSettings { base_url: var("URL"), client_id: var("CLIENT_ID"), client_secret: var("CLIENT_SECRET") }
    }
}

impl Connectors {
    /// The catalog's connectors under the environment's egress rule; `settings` (by
    /// provider) override URLs and clients.
    pub fn new(catalog: &Catalog, settings: &BTreeMap<String, ProviderSettings>) -> Connectors {
        Self::with_egress(catalog, settings, crate::egress::Egress::from_env())
    }

    pub fn with_egress(
        catalog: &Catalog,
        settings: &BTreeMap<String, ProviderSettings>,
        egress: crate::egress::Egress,
    ) -> Connectors {
        let http = egress.client().pool_max_idle_per_host(32).build().expect("the HTTP client builds");
        let streaming = egress
            .client_from(streaming_http_client())
            .pool_max_idle_per_host(64)
            .build()
            .expect("the HTTP client builds");
        let by_name = catalog
            .providers
            .iter()
            .map(|(name, entry)| {
                let s = settings.get(name).cloned().unwrap_or_default();
                let base_url = s.base_url.unwrap_or_else(|| entry.base_url.clone()).trim_end_matches('/').to_string();
                let mut hosts: Vec<_> =
                    entry.allowed_hosts.iter().map(|h| crate::egress::HostPattern::name(h)).collect();
                hosts.extend(crate::egress::HostPattern::of_url(&base_url));
                let connector = Connector {
                    name: name.clone(),
                    entry: entry.clone(),
                    base_url,
                    hosts,
                    egress,
                    app: ClientApp {
                        client_id: s.client_id.unwrap_or_else(|| "amplog-demo".into()),
                        client_secret: s.client_secret.unwrap_or_else(|| "amplog-demo-secret".into()),
                    },
                    http: http.clone(),
                    streaming: streaming.clone(),
                };
                (name.clone(), Arc::new(connector))
            })
            .collect();
        Connectors { by_name, egress }
    }

    /// The outbound rule these connectors were built with (deliveries follow it too).
    pub fn egress(&self) -> crate::egress::Egress {
        self.egress
    }

    /// The built-in catalog with settings from the environment.
    pub fn from_env() -> Connectors {
        let catalog = Catalog::builtin();
        let settings = catalog.providers.keys().map(|n| (n.clone(), ProviderSettings::from_env(n))).collect();
        Connectors::new(&catalog, &settings)
    }

    pub fn get(&self, provider: &str) -> Option<Arc<Connector>> {
        self.by_name.get(provider).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl Connector {
    fn url(&self, path: &str) -> String {
        self.url_on(&self.base_url, path)
    }

    fn url_on(&self, base: &str, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", base.trim_end_matches('/'))
        }
    }

    /// Where the customer's data lives: the instance URL when the provider has one.
    pub(crate) fn data_base<'a>(&'a self, tokens: &'a TokenSet) -> &'a str {
        match (&tokens.instance_url, self.entry.auth.instance_url) {
            (Some(instance), true) => instance,
            _ => &self.base_url,
        }
    }

    /// A data call's URL: on the customer's instance when the provider has one.
    fn data_url(&self, tokens: &TokenSet, path: &str) -> String {
        match (&tokens.instance_url, self.entry.auth.instance_url) {
            (Some(instance), true) => self.url_on(instance, path),
            _ => self.url(path),
        }
    }

    /// Refuses a URL off the connector's hosts (a tenant's `instance_url`, a provider's
    /// absolute next-page URL) or to an address the egress rule forbids. The message names
    /// the host, never what answered there.
    pub(crate) fn check_host(&self, url: &reqwest::Url) -> Result<(), ProviderError> {
        if !self.hosts.iter().any(|h| h.matches(url)) {
            let host = url.host_str().unwrap_or_default();
            let allowed: Vec<String> = self.hosts.iter().map(ToString::to_string).collect();
            return Err(ProviderError::new(
                ErrorClass::BadRequest,
                format!("`{host}` is not a host of provider {} (allowed: {})", self.name, allowed.join(", ")),
            ));
        }
        self.egress.check(url).map_err(|e| ProviderError::new(ErrorClass::BadRequest, e))
    }

    /// The provider's answer, classified: a success's JSON body or a `ProviderError`.
    async fn send(&self, request: reqwest::RequestBuilder, cursor_page: bool) -> Result<(Value, u64), ProviderError> {
        let request = request
            .build()
            .map_err(|e| ProviderError::new(ErrorClass::BadRequest, format!("the request cannot be built: {e}")))?;
        self.check_host(request.url())?;
        let response = self.http.execute(request).await.map_err(|e| {
            let class = if e.is_timeout() || e.is_connect() { ErrorClass::Timeout } else { ErrorClass::Provider5xx };
            ProviderError::new(class, format!("request failed: {e}"))
        })?;
        let status = response.status().as_u16();
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let retry_after = header(&self.entry.rate_limit.retry_after)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|s| Duration::from_secs_f64(s.clamp(0.0, 3600.0)));
        let body = response
            .bytes()
            .await
            .map_err(|e| ProviderError::new(ErrorClass::Timeout, format!("reading the response failed: {e}")))?;
        if (200..300).contains(&status) && body.is_empty() {
            return Ok((Value::Null, 0));
        }
        if (200..300).contains(&status) {
            let value = serde_json::from_slice(&body).map_err(|e| {
                ProviderError::new(ErrorClass::Provider5xx, format!("the provider answered malformed JSON: {e}"))
            })?;
            return Ok((value, body.len() as u64));
        }
        let text = String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned();
        let class = match status {
            429 => ErrorClass::RateLimited,
            401 | 403 => ErrorClass::AuthInvalidated,
            404 | 410 if cursor_page => ErrorClass::CursorGone,
            400 if cursor_page && text.contains("INVALID_QUERY_LOCATOR") => ErrorClass::CursorGone,
            408 => ErrorClass::Timeout,
            s if s >= 500 => ErrorClass::Provider5xx,
            _ => ErrorClass::BadRequest,
        };
        Err(ProviderError {
            class,
            status: Some(status),
            message: format!("HTTP {status}: {text}"),
            retry_after: if class == ErrorClass::RateLimited {
                retry_after.or(Some(Duration::from_secs(1)))
            } else {
                None
            },
        })
    }

    /// Reads one page of `object`: the first (records modified at or after `since`, or
    /// all) or the one `page_token` names.
    pub async fn read_page(
        &self,
        tokens: &TokenSet,
        object: &str,
        since: Option<DateTime<Utc>>,
        page_token: Option<&str>,
    ) -> Result<ProviderPage, ProviderError> {
        let read = &self.entry.read;
        let path = read.path.replace("{object}", object);
        let mut query: Vec<(String, String)> = Vec::new();
        let url = match (&read.pagination, page_token) {
            (Pagination::NextUrl { .. }, Some(next)) => self.data_url(tokens, next),
            (pagination, token) => {
                if let Pagination::CursorParam { param, limit_param, page_size, .. } = pagination {
                    query.push((limit_param.clone(), page_size.to_string()));
                    if let Some(token) = token {
                        query.push((param.clone(), token.to_string()));
                    }
                }
                match &read.incremental {
                    Incremental::QueryParam { param } => {
                        if let Some(since) = since {
                            query.push((param.clone(), rfc3339(since)));
                        }
                    }
                    Incremental::Soql { param, full, since: with_since } => {
                        let soql = match since {
                            Some(since) => with_since.replace("{since}", &rfc3339(since)),
                            None => full.clone(),
                        };
                        query.push((param.clone(), soql.replace("{object}", object)));
                    }
                }
                self.data_url(tokens, &path)
            }
        };
        let request = self.http.get(url).bearer_auth(&tokens.access_token).query(&query);
        let (body, bytes) = self.send(request, page_token.is_some()).await?;
        let malformed = |what: &str| ProviderError::new(ErrorClass::Provider5xx, format!("a page without {what}"));
        let items = body.pointer(&read.records).and_then(Value::as_array).ok_or_else(|| malformed("records"))?;
        let f = &read.fields;
        let records = items
            .iter()
            .map(|item| {
                let id = match item.pointer(&f.id) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    _ => return Err(malformed("a record id")),
                };
                let updated = item
                    .pointer(&f.updated)
                    .and_then(Value::as_str)
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                    .ok_or_else(|| malformed("a record's modification time"))?
                    .to_utc();
                let archived = item.pointer(&f.archived).and_then(Value::as_bool).unwrap_or(false);
                let fields = match &f.data {
                    Some(pointer) => item.pointer(pointer).cloned().unwrap_or(Value::Null),
                    None => item.clone(),
                };
                Ok(ProviderRecord { id, updated, archived, fields })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let next_pointer = match &read.pagination {
            Pagination::CursorParam { next, .. } | Pagination::NextUrl { next } => next,
        };
        let next = body.pointer(next_pointer).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
        Ok(ProviderPage { records, next, bytes })
    }

    /// One record as the provider has it now (`read.record` of the catalog); `None` when it
    /// is gone or the catalog names no such call.
    pub async fn get_record(&self, tokens: &TokenSet, object: &str, id: &str) -> Result<Option<Value>, ProviderError> {
        let Some(path) = &self.entry.read.record else { return Ok(None) };
        let escaped: String = url::form_urlencoded::byte_serialize(id.as_bytes()).collect();
        let path = path.replace("{object}", object).replace("{id}", &escaped);
        let request = self.http.get(self.data_url(tokens, &path)).bearer_auth(&tokens.access_token);
        match self.send(request, false).await {
            Ok((body, _)) => Ok(Some(body)),
            Err(error) if matches!(error.status, Some(404 | 410)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Writes `records` (`{id?, ...fields}`) in batches; one result per record, in order.
    pub async fn write(
        &self,
        tokens: &TokenSet,
        object: &str,
        records: &[Value],
    ) -> Result<Vec<WriteResult>, ProviderError> {
        let Some(write) = &self.entry.write else {
            return Err(ProviderError::new(
                ErrorClass::BadRequest,
                format!("provider {} has no write support", self.name),
            ));
        };
        let mut results = Vec::with_capacity(records.len());
        for (chunk_no, chunk) in records.chunks(write.max_batch.max(1)).enumerate() {
            let inputs: Vec<Value> = chunk
                .iter()
                .map(|r| {
                    let mut properties = r.clone();
                    let id = properties.as_object_mut().and_then(|o| o.remove("id"));
                    serde_json::json!({"id": id, "properties": properties})
                })
                .collect();
            let request = self
                .http
                .post(self.data_url(tokens, &write.path.replace("{object}", object)))
                .bearer_auth(&tokens.access_token)
                .json(&serde_json::json!({"inputs": inputs}));
            let (body, _) = self.send(request, false).await?;
            let offset = chunk_no * write.max_batch.max(1);
            let answered = body.pointer("/results").and_then(Value::as_array).cloned().unwrap_or_default();
            for (i, _) in chunk.iter().enumerate() {
                let item = answered.iter().find(|r| r.pointer("/index").and_then(Value::as_u64) == Some(i as u64));
                let ok = item.and_then(|r| r.pointer("/status")).and_then(Value::as_str).is_some_and(|s| s != "error");
                results.push(WriteResult {
                    index: offset + i,
                    ok,
                    id: item.and_then(|r| r.pointer("/id")).and_then(Value::as_str).map(str::to_string),
                    error: (!ok).then(|| {
                        item.and_then(|r| r.pointer("/message"))
                            .and_then(Value::as_str)
                            .unwrap_or("no result")
                            .to_string()
                    }),
                });
            }
        }
        Ok(results)
    }

    /// The provider's authorization URL for a customer to approve the deployment's own
    /// client (the demo's and the tests').
    pub fn authorize_url(&self, redirect_uri: &str, state: &str) -> String {
        self.authorize_url_for(&self.app, redirect_uri, state, &[], None)
    }

    /// The provider's authorization URL for `app`: its scopes (space-separated), and the
    /// PKCE challenge when the provider takes one.
    pub fn authorize_url_for(
        &self,
        app: &ClientApp,
        redirect_uri: &str,
        state: &str,
        scopes: &[String],
        code_challenge: Option<&str>,
    ) -> String {
        let mut url = reqwest::Url::parse(&self.url(&self.entry.auth.authorize_url)).expect("catalog URLs parse");
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("client_id", &app.client_id)
                .append_pair("redirect_uri", redirect_uri)
                .append_pair("response_type", "code")
                .append_pair("state", state);
            if !scopes.is_empty() {
                query.append_pair("scope", &scopes.join(" "));
            }
            if let Some(challenge) = code_challenge.filter(|_| self.entry.auth.pkce) {
                query.append_pair("code_challenge", challenge).append_pair("code_challenge_method", "S256");
            }
        }
        url.to_string()
    }

    async fn token_request(&self, app: &ClientApp, form: &[(&str, &str)]) -> Result<TokenSet, ProviderError> {
        let mut form = form.to_vec();
        form.push(("client_id", &app.client_id));
        form.push(("client_secret", &app.client_secret));
        let request = self.http.post(self.url(&self.entry.auth.token_url)).form(&form);
        let now = Utc::now();
        let body = match self.send(request, false).await {
            Ok((body, _)) => body,
            Err(e) if e.status == Some(400) || e.status == Some(401) => {
                let grant = if e.message.contains("invalid_grant") { "invalid_grant" } else { "token request refused" };
                return Err(ProviderError {
                    class: ErrorClass::AuthInvalidated,
                    message: format!("{grant}: {}", e.message),
                    ..e
                });
            }
            Err(e) => return Err(e),
        };
        let access_token = body
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| ProviderError::new(ErrorClass::Provider5xx, "a token response without access_token"))?;
        Ok(TokenSet {
            access_token: access_token.into(),
            refresh_token: body.get("refresh_token").and_then(Value::as_str).map(str::to_string),
            expires_at: body.get("expires_in").and_then(Value::as_i64).map(|s| now + chrono::Duration::seconds(s)),
            obtained_at: Some(now),
            instance_url: body.get("instance_url").and_then(Value::as_str).map(str::to_string),
            account_id: self.entry.auth.account_id.as_deref().and_then(|p| body.pointer(p)).and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }),
        })
    }

    /// Exchanges an authorization code for a token set (the deployment's client).
    pub async fn exchange_code(&self, code: &str, redirect_uri: &str) -> Result<TokenSet, ProviderError> {
        self.exchange_code_for(&self.app, code, redirect_uri, None).await
    }

    /// Exchanges an authorization code obtained for `app`, with the PKCE verifier of its
    /// challenge when the provider takes PKCE.
    pub async fn exchange_code_for(
        &self,
        app: &ClientApp,
        code: &str,
        redirect_uri: &str,
        code_verifier: Option<&str>,
    ) -> Result<TokenSet, ProviderError> {
        let mut form = vec![("grant_type", "authorization_code"), ("code", code), ("redirect_uri", redirect_uri)];
        if let Some(verifier) = code_verifier.filter(|_| self.entry.auth.pkce) {
            form.push(("code_verifier", verifier));
        }
        self.token_request(app, &form).await
    }

    /// A fresh access token from a refresh token; the refresh token is kept unless the
    /// provider rotates it.
    pub async fn refresh(&self, app: &ClientApp, previous: &TokenSet) -> Result<TokenSet, ProviderError> {
        let refresh_token = previous.refresh_token.as_deref().unwrap_or_default();
        let mut set =
            self.token_request(app, &[("grant_type", "refresh_token"), ("refresh_token", refresh_token)]).await?;
        set.refresh_token.get_or_insert_with(|| refresh_token.to_string());
        if set.instance_url.is_none() {
            set.instance_url.clone_from(&previous.instance_url);
        }
        if set.account_id.is_none() {
            set.account_id.clone_from(&previous.account_id);
        }
        Ok(set)
    }

    /// Revokes a token set's grant at the provider (RFC 7009: the refresh token, which ends
    /// the grant; else the access token). `Ok(false)`: the provider has no revoke endpoint.
    pub async fn revoke(&self, app: &ClientApp, set: &TokenSet) -> Result<bool, ProviderError> {
        let Some(path) = &self.entry.auth.revoke_url else { return Ok(false) };
        let (token, hint) = match &set.refresh_token {
            Some(refresh) => (refresh.as_str(), "refresh_token"),
            None => (set.access_token.as_str(), "access_token"),
        };
        let form = [
            ("token", token),
            ("token_type_hint", hint),
            ("client_id", app.client_id.as_str()),
            ("client_secret", app.client_secret.as_str()),
        ];
        self.send(self.http.post(self.url(path)).form(&form), false).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_catalog_parses_and_names_its_objects() {
        let catalog = Catalog::builtin();
        for name in ["simulator", "simulator-salesforce", "hubspot", "salesforce"] {
            let entry = &catalog.providers[name];
            assert!(!entry.objects.is_empty(), "{name}");
            assert_eq!(entry.auth.style, AuthStyle::Oauth2);
        }
        assert!(catalog.providers["salesforce"].write.is_none());
    }

    #[test]
    fn connectors_reach_https_providers() {
        // Builds with TLS (a missing crypto provider would panic here).
        let connectors = Connectors::new(&Catalog::builtin(), &BTreeMap::new());
        let hubspot = connectors.get("hubspot").unwrap();
        assert!(hubspot.base_url.starts_with("https://"));
        let url = hubspot.authorize_url("https://app.example/cb", "s");
        assert!(url.starts_with("https://app.hubspot.com/oauth/authorize?client_id="), "{url}");
    }
}
