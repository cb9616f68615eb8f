//! The command service's connections (create, refresh, revoke, credentials).

use super::*;

impl CommandService {
    /// Creates a connection; the secret goes to the encrypted store in the same transaction.
    pub async fn create_connection(
        &self,
        ctx: &CommandContext,
        integration_id: IntegrationId,
        group_ref: &str,
        secret: &Secret,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let request = (integration_id, group_ref, self.credentials.key().fingerprint(secret));
        let mut uow = match self.begin(ctx, "connection.create", &request).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let integration = self.load_in::<Integration>(&mut uow, integration_id.0).await?;
        if !integration.state.exists {
            return Err(DomainError::from(integration::IntegrationError::NotFound).into());
        }
        let id = ConnectionId(Uuid::now_v7());
        let credential = self
            .credentials
            .put(self.in_tx(&mut uow).await?, CredentialId(Uuid::now_v7()), ctx.project_id, id, secret)
            .await?;
        let loaded = self.load_in::<Connection>(&mut uow, id.0).await?;
        let command = ConnectionCommand::Create {
            project_id: ctx.project_id,
            integration_id,
            provider: integration.state.provider.clone(),
            group_ref: group_ref.into(),
            credential,
            at,
        };
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await
    }

    async fn connection_with_secret(
        &self,
        ctx: &CommandContext,
        name: &'static str,
        id: ConnectionId,
        secret: &Secret,
        command: impl FnOnce(connection::CredentialRef) -> ConnectionCommand,
    ) -> Result<CommandOutcome, CommandError> {
        let request = (id, self.credentials.key().fingerprint(secret));
        let mut uow = match self.begin(ctx, name, &request).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let loaded = self.load_in::<Connection>(&mut uow, id.0).await?;
        // Decide before storing, so a refused command leaves no orphan ciphertext behind.
        let probe = command(connection::CredentialRef {
            id: CredentialId(Uuid::nil()),
            fingerprint: self.credentials.key().fingerprint(secret),
        });
        loaded.state.decide(&probe).map_err(DomainError::from)?;
        let credential = self
            .credentials
            .put(self.in_tx(&mut uow).await?, CredentialId(Uuid::now_v7()), ctx.project_id, id, secret)
            .await?;
        let command = match probe {
            ConnectionCommand::RefreshToken { expires_at, at, .. } => {
                ConnectionCommand::RefreshToken { credential, expires_at, at }
            }
            ConnectionCommand::Reconnect { at, .. } => ConnectionCommand::Reconnect { credential, at },
            other => other,
        };
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await
    }

    /// Records a successful token refresh; the new token set is stored encrypted.
    pub async fn refresh_token(
        &self,
        ctx: &CommandContext,
        id: ConnectionId,
        secret: &Secret,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.connection_with_secret(ctx, "connection.refresh_token", id, secret, |credential| {
            ConnectionCommand::RefreshToken { credential, expires_at, at }
        })
        .await
    }

    /// Re-authorises a connection with new credentials.
    pub async fn reconnect(
        &self,
        ctx: &CommandContext,
        id: ConnectionId,
        secret: &Secret,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.connection_with_secret(ctx, "connection.reconnect", id, secret, |credential| {
            ConnectionCommand::Reconnect { credential, at }
        })
        .await
    }

    pub async fn record_refresh_failure(
        &self,
        ctx: &CommandContext,
        id: ConnectionId,
        reason: &str,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Connection>(ctx, "connection.record_refresh_failure", id.0, &(id, reason), |_| {
            ConnectionCommand::RecordRefreshFailure { reason: reason.into(), at }
        })
        .await
    }

    pub async fn revoke_connection(
        &self,
        ctx: &CommandContext,
        id: ConnectionId,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Connection>(ctx, "connection.revoke", id.0, &id, |_| ConnectionCommand::Revoke { at }).await
    }
}
