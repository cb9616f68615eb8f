//! The command service's provider apps and connect sessions: the OAuth clients a project
//! configures, and an end user's way from a connect link to a connected account and an
//! installation. Secrets (client secrets, token sets) go to the encrypted store in the
//! command's transaction; events carry fingerprints and digests only.

use super::connections::record_account;
use super::*;
use amplog_domain::connect_session::SessionRequest;
use amplog_domain::provider_app::AppConfig;

/// A provider app's settings as a builder gives them; `secret: None` on an update keeps
/// the stored one.
#[derive(Clone, Debug, Default)]
pub struct AppSettings {
    pub client_id: String,
    pub secret: Option<Secret>,
    pub scopes: Vec<String>,
    pub return_urls: Vec<String>,
}

/// A project's app at a provider, with its client secret decrypted (for the connector).
#[derive(Clone, Debug)]
pub struct ProviderClient {
    pub app: ProviderApp,
    pub config: AppConfig,
    pub client_secret: Secret,
}

impl CommandService {
    async fn put_provider_app(
        &self,
        ctx: &CommandContext,
        name: &'static str,
        provider: &str,
        settings: &AppSettings,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let fingerprint = settings.secret.as_ref().map(|s| self.credentials.key().fingerprint(s));
        let request = (provider, &settings.client_id, &fingerprint, &settings.scopes, &settings.return_urls);
        let mut uow = match self.begin(ctx, name, &request).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let id = ProviderApp::id_for(ctx.project_id, provider);
        let loaded = self.load_in::<ProviderApp>(&mut uow, id).await?;
        let config = |secret| AppConfig {
            client_id: settings.client_id.clone(),
            secret,
            scopes: settings.scopes.clone(),
            return_urls: settings.return_urls.clone(),
        };
        let command = |config| match name {
            "provider_app.create" => {
                ProviderAppCommand::Create { project_id: ctx.project_id, provider: provider.into(), config, at }
            }
            _ => ProviderAppCommand::Update { config, at },
        };
        let kept = loaded.state.config.as_ref().map(|c| c.secret.clone());
        let probe = connection::CredentialRef {
            id: CredentialId(Uuid::nil()),
            fingerprint: fingerprint
                .clone()
                .or_else(|| kept.as_ref().map(|k| k.fingerprint.clone()))
                .unwrap_or_default(),
        };
        // Decide before storing, so a refused command leaves no orphan ciphertext behind.
        loaded.state.decide(&command(config(probe))).map_err(DomainError::from)?;
        let secret = match (&settings.secret, kept) {
            (Some(secret), _) => {
                let conn = self.in_tx(&mut uow).await?;
                self.credentials
                    .put(conn, CredentialId(Uuid::now_v7()), ctx.project_id, ConnectionId(id), secret)
                    .await?
            }
            (None, Some(kept)) => kept,
            (None, None) => return Err(CommandError::Invalid("a new provider app needs its client secret".into())),
        };
        self.decide(&mut uow, &loaded, &command(config(secret)))?;
        self.commit(uow).await
    }

    /// Configures the project's OAuth client at `provider`.
    pub async fn create_provider_app(
        &self,
        ctx: &CommandContext,
        provider: &str,
        settings: &AppSettings,
    ) -> Result<CommandOutcome, CommandError> {
        self.put_provider_app(ctx, "provider_app.create", provider, settings).await
    }

    /// Replaces the app's configuration (its secret only when a new one is given).
    pub async fn update_provider_app(
        &self,
        ctx: &CommandContext,
        provider: &str,
        settings: &AppSettings,
    ) -> Result<CommandOutcome, CommandError> {
        self.put_provider_app(ctx, "provider_app.update", provider, settings).await
    }

    pub async fn delete_provider_app(
        &self,
        ctx: &CommandContext,
        provider: &str,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let id = ProviderApp::id_for(ctx.project_id, provider);
        self.single::<ProviderApp>(ctx, "provider_app.delete", id, &provider, |_| ProviderAppCommand::Delete { at })
            .await
    }

    /// The project's app at `provider` with its secret, if it has one.
    pub async fn provider_client(
        &self,
        ctx: &CommandContext,
        provider: &str,
    ) -> Result<Option<ProviderClient>, CommandError> {
        let app = self.load::<ProviderApp>(ctx, ProviderApp::id_for(ctx.project_id, provider)).await?.state;
        let Some(config) = app.config.clone().filter(|_| app.exists) else { return Ok(None) };
        let mut conn = self.pool.acquire().await?;
        let client_secret =
            self.credentials.get(&mut conn, ctx.project_id, config.secret.id).await?.ok_or_else(|| {
                CommandError::corrupt("provider app secret", format!("credential {} is gone", config.secret.id))
            })?;
        Ok(Some(ProviderClient { app, config, client_secret }))
    }

    /// Opens a connect session for `request` (its integration must exist; a connection to
    /// reconnect must be the same integration's and group's).
    pub async fn create_connect_session(
        &self,
        ctx: &CommandContext,
        id: Uuid,
        request: &SessionRequest,
        token_digest: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        // Its link token is made for it and shown once: a retry is a new session.
        let mut uow = self.begin_unkeyed(ctx, "connect_session.create").await?;
        let integration = self.load_in::<Integration>(&mut uow, request.integration_id.0).await?;
        if !integration.state.exists {
            return Err(DomainError::from(integration::IntegrationError::NotFound).into());
        }
        if let Some(reconnect) = request.reconnect {
            let connection = self.load_in::<Connection>(&mut uow, reconnect.0).await?.state;
            if !connection.exists
                || connection.integration_id != request.integration_id
                || connection.group_ref != request.group_ref
            {
                return Err(DomainError::from(connection::ConnectionError::NotFound).into());
            }
        }
        let request = SessionRequest { provider: integration.state.provider.clone(), ..request.clone() };
        let loaded = self.load_in::<ConnectSession>(&mut uow, id).await?;
        let command = ConnectSessionCommand::Create {
            project_id: ctx.project_id,
            request,
            token_digest: token_digest.into(),
            expires_at,
            at,
        };
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await
    }

    pub async fn start_connect_authorization(
        &self,
        ctx: &CommandContext,
        id: Uuid,
        state_digest: &str,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<ConnectSession>(ctx, "connect_session.start", id, &state_digest, |_| {
            ConnectSessionCommand::StartAuthorization { state_digest: state_digest.into(), at }
        })
        .await
    }

    pub async fn record_connect_failure(
        &self,
        ctx: &CommandContext,
        id: Uuid,
        state_digest: &str,
        reason: &str,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<ConnectSession>(ctx, "connect_session.fail", id, &(state_digest, reason), |_| {
            ConnectSessionCommand::RecordFailure { state_digest: state_digest.into(), reason: reason.into(), at }
        })
        .await
    }

    /// Records the account the user connected: a new connection (or the session's
    /// connection reconnected) with the token set encrypted, and the session `Connected`,
    /// in one transaction.
    pub async fn connect_session_account(
        &self,
        ctx: &CommandContext,
        id: Uuid,
        state_digest: &str,
        secret: &Secret,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let mut uow = match self.begin(ctx, "connect_session.connect", &(id, state_digest)).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let session = self.load_in::<ConnectSession>(&mut uow, id).await?;
        let request = session.state.request.clone().unwrap_or_default();
        let connection_id = request.reconnect.unwrap_or_else(|| ConnectionId(Uuid::now_v7()));
        // The session's own rules first: an expired, replayed or forged step stores nothing.
        let connect = ConnectSessionCommand::Connect { state_digest: state_digest.into(), connection_id, at };
        session.state.decide(&connect).map_err(DomainError::from)?;
        let connection = self.load_in::<Connection>(&mut uow, connection_id.0).await?;
        let probe_ref = connection::CredentialRef {
            id: CredentialId(Uuid::nil()),
            fingerprint: self.credentials.key().fingerprint(secret),
        };
        let command = |credential| match request.reconnect {
            Some(_) => ConnectionCommand::Reconnect { credential, at },
            None => ConnectionCommand::Create {
                project_id: ctx.project_id,
                integration_id: request.integration_id,
                provider: request.provider.clone(),
                group_ref: request.group_ref.clone(),
                credential,
                at,
            },
        };
        connection.state.decide(&command(probe_ref)).map_err(DomainError::from)?;
        let conn = self.in_tx(&mut uow).await?;
        let credential =
            self.credentials.put(conn, CredentialId(Uuid::now_v7()), ctx.project_id, connection_id, secret).await?;
        record_account(conn, ctx.project_id, connection_id, &request.provider, secret).await?;
        self.decide(&mut uow, &connection, &command(credential))?;
        self.decide(&mut uow, &session, &connect)?;
        self.commit(uow).await
    }

    /// Finishes a connected session: the installation with the objects the user chose (none
    /// given: every object of the latest revision), and the session `Completed`, in one
    /// append. A reconnecting session completes without an installation.
    pub async fn complete_connect_session(
        &self,
        ctx: &CommandContext,
        id: Uuid,
        state_digest: &str,
        objects: Option<&BTreeMap<String, ObjectConfig>>,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let mut uow = match self.begin(ctx, "connect_session.complete", &(id, state_digest, objects)).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let session = self.load_in::<ConnectSession>(&mut uow, id).await?;
        let request = session.state.request.clone().unwrap_or_default();
        let installation_id = match (request.reconnect, session.state.connection_id) {
            (None, Some(connection_id)) => {
                let integration = self.load_in::<Integration>(&mut uow, request.integration_id.0).await?;
                let connection = self.load_in::<Connection>(&mut uow, connection_id.0).await?;
                let revision = integration.state.revisions.len() as u32;
                let objects = match objects {
                    Some(objects) => objects.clone(),
                    None => default_objects(&integration.state, revision),
                };
                let installation_id = InstallationId(Uuid::now_v7());
                let loaded = self.load_in::<Installation>(&mut uow, installation_id.0).await?;
                let command = InstallationCommand::Create {
                    project_id: ctx.project_id,
                    integration: IntegrationFacts { id: request.integration_id, state: integration.state },
                    revision,
                    group_ref: request.group_ref.clone(),
                    consumer_ref: request.consumer_ref.clone(),
                    connection: ConnectionFacts { id: connection_id, state: connection.state },
                    objects,
                    at,
                };
                // The session decides first: a replayed or expired finish creates nothing.
                let complete = ConnectSessionCommand::Complete {
                    state_digest: state_digest.into(),
                    installation_id: Some(installation_id),
                    at,
                };
                session.state.decide(&complete).map_err(DomainError::from)?;
                self.decide(&mut uow, &loaded, &command)?;
                Some(installation_id)
            }
            _ => None,
        };
        let complete = ConnectSessionCommand::Complete { state_digest: state_digest.into(), installation_id, at };
        self.decide(&mut uow, &session, &complete)?;
        self.commit(uow).await
    }
}

/// Every object of `revision`, enabled, with the manifest's schedule and backfill.
pub fn default_objects(integration: &Integration, revision: u32) -> BTreeMap<String, ObjectConfig> {
    integration
        .revision(revision)
        .map(|r| {
            r.objects
                .values()
                .map(|o| {
                    let schedule = o.schedule.clone().unwrap_or_else(|| DEFAULT_SCHEDULE.into());
                    (o.name.clone(), ObjectConfig { enabled: true, schedule, backfill: o.backfill })
                })
                .collect()
        })
        .unwrap_or_default()
}
