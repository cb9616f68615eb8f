//! Access tokens of connections: cached per connection (moka), refreshed one at a time per
//! connection, the refreshed token set stored encrypted through the command service (which
//! records `TokenRefreshed`). A refresh refused with `invalid_grant` records the failure:
//! the connection turns `bad_credentials` and its installations need re-auth.

use crate::connector::{ClientApp, Connector, ProviderError, TokenSet};
use amplog_commands::credentials::Secret;
use amplog_commands::{CommandContext, CommandService};
use amplog_domain::connection::{Connection, ConnectionStatus};
use amplog_domain::operation::ErrorClass;
use amplog_domain::ConnectionId;
use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;

/// A token is refreshed this long before it expires, or a fifth of its lifetime when that
/// is shorter (a 20 s token is used for 16 s, not refreshed on every call).
const EARLY: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

#[derive(Clone)]
pub struct Tokens {
    service: CommandService,
    cache: moka::sync::Cache<ConnectionId, Arc<TokenSet>>,
    locks: moka::sync::Cache<ConnectionId, Arc<tokio::sync::Mutex<()>>>,
    /// Connections whose token was refreshed because the provider refused it, in the last
    /// `FORCED_EVERY`: a provider answering 401 for want of a permission does not make a
    /// refresh (and an event) per call.
    forced: moka::sync::Cache<ConnectionId, ()>,
}

/// At most one refresh forced by a refused token per connection this often.
const FORCED_EVERY: Duration = Duration::from_secs(30);

fn internal(message: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(ErrorClass::Internal, message.to_string())
}

impl Tokens {
    pub fn new(service: CommandService) -> Tokens {
        Tokens {
            service,
            cache: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(Duration::from_secs(3600)).build(),
            locks: moka::sync::Cache::builder().max_capacity(100_000).time_to_idle(Duration::from_secs(600)).build(),
            forced: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(FORCED_EVERY).build(),
        }
    }

    fn usable(set: &TokenSet, now: chrono::DateTime<Utc>) -> bool {
        let Some(expires) = set.expires_at else { return true };
        let early = match set.obtained_at {
            Some(obtained) => ((expires - obtained) / 5).clamp(chrono::TimeDelta::zero(), EARLY),
            None => EARLY,
        };
        expires - early > now
    }

    /// A usable token set of `connection` (its access token, and where its data lives). `rejected`: a token the provider just refused
    /// (401): it is not handed out again, a refresh is forced unless another task already
    /// refreshed it.
    pub async fn access_token(
        &self,
        ctx: &CommandContext,
        connection: ConnectionId,
        connector: &Connector,
        rejected: Option<&str>,
    ) -> Result<Arc<TokenSet>, ProviderError> {
        let fresh = |set: &TokenSet| Self::usable(set, Utc::now()) && Some(set.access_token.as_str()) != rejected;
        if let Some(set) = self.cache.get(&connection).filter(|s| fresh(s)) {
            return Ok(set);
        }
        if rejected.is_some() && self.forced.contains_key(&connection) {
            return Err(ProviderError::new(
                ErrorClass::AuthInvalidated,
                "the provider refused a token refreshed moments ago: not refreshed again",
            ));
        }
        let lock = self.locks.get_with(connection, || Arc::new(tokio::sync::Mutex::new(())));
        let _one_refresh = lock.lock().await;
        if let Some(set) = self.cache.get(&connection).filter(|s| fresh(s)) {
            return Ok(set);
        }
        let loaded = self.service.load::<Connection>(ctx, connection.0).await.map_err(internal)?;
        let state = loaded.state;
        match state.status {
            ConnectionStatus::BadCredentials | ConnectionStatus::Revoked => {
                self.cache.invalidate(&connection);
                return Err(ProviderError::new(
                    ErrorClass::AuthInvalidated,
                    format!("the connection is {}: it needs re-authentication", state.status.as_str()),
                ));
            }
            ConnectionStatus::Created | ConnectionStatus::Working => {}
        }
        let credential = state.credential.ok_or_else(|| internal("a connection without a credential"))?;
        let mut conn = self.service.pool().acquire().await.map_err(internal)?;
        let secret = self
            .service
            .credentials()
            .get(&mut conn, ctx.project_id, credential.id)
            .await
            .map_err(internal)?
            .ok_or_else(|| internal(format!("credential {} is missing", credential.id)))?;
        drop(conn);
        let stored: TokenSet = serde_json::from_str(&secret.0).map_err(|_| {
            ProviderError::new(ErrorClass::AuthInvalidated, "the stored credential is not an OAuth2 token set")
        })?;
        if fresh(&stored) {
            let stored = Arc::new(stored);
            self.cache.insert(connection, stored.clone());
            return Ok(stored);
        }
        if stored.refresh_token.is_none() {
            return Err(ProviderError::new(
                ErrorClass::AuthInvalidated,
                "the access token expired and there is no refresh token",
            ));
        }
        let app = client_app(&self.service, ctx, connector).await?;
        if rejected.is_some() {
            self.forced.insert(connection, ());
        }
        match connector.refresh(&app, &stored).await {
            Ok(set) => {
                let secret = Secret(serde_json::to_string(&set).expect("token sets serialise"));
                self.service.refresh_token(ctx, connection, &secret, set.expires_at).await.map_err(internal)?;
                tracing::info!(connection = %connection, "access token refreshed");
                let set = Arc::new(set);
                self.cache.insert(connection, set.clone());
                Ok(set)
            }
            Err(error) if error.is_invalid_grant() => {
                self.cache.invalidate(&connection);
                tracing::warn!(connection = %connection, "refresh refused (invalid_grant): the connection needs re-auth");
                self.service.record_refresh_failure(ctx, connection, "invalid_grant").await.map_err(internal)?;
                Err(error)
            }
            Err(error) => Err(error),
        }
    }
}

impl Tokens {
    /// Drops a connection's cached token (it was revoked or reconnected here).
    pub fn forget(&self, connection: ConnectionId) {
        self.cache.invalidate(&connection);
    }
}

/// The OAuth client for `connector` in the context's project: the project's provider app,
/// else the deployment's own client (the demo's, and connections made with pasted tokens).
pub async fn client_app(
    service: &CommandService,
    ctx: &CommandContext,
    connector: &Connector,
) -> Result<ClientApp, ProviderError> {
    Ok(match service.provider_client(ctx, &connector.name).await.map_err(internal)? {
        Some(client) => ClientApp { client_id: client.config.client_id, client_secret: client.client_secret.0 },
        None => connector.app.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_refreshed_a_fraction_of_their_lifetime_early() {
        let now = Utc::now();
        let set = |lifetime: i64, left: i64, known: bool| TokenSet {
            access_token: "a".into(),
            refresh_token: None,
            expires_at: Some(now + chrono::TimeDelta::seconds(left)),
            obtained_at: known.then(|| now + chrono::TimeDelta::seconds(left - lifetime)),
            instance_url: None,
            account_id: None,
        };
        // A 20 s token is used for its first 16 s.
        assert!(Tokens::usable(&set(20, 20, true), now));
        assert!(Tokens::usable(&set(20, 5, true), now));
        assert!(!Tokens::usable(&set(20, 3, true), now));
        // An hour-long one until 30 s before it expires.
        assert!(Tokens::usable(&set(3600, 31, true), now));
        assert!(!Tokens::usable(&set(3600, 29, true), now));
        // A set stored without its lifetime keeps the 30 s margin.
        assert!(!Tokens::usable(&set(20, 20, false), now));
        assert!(Tokens::usable(&TokenSet { expires_at: None, ..set(1, 1, true) }, now));
    }
}
