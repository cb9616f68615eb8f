//! The command service's connections (create, refresh, revoke, credentials).

use super::*;

/// Keeps the provider account a connection's token set names (its `account_id`, when the
/// provider gives one), so the provider's change webhooks find their connection; in the
/// caller's transaction.
pub(super) async fn record_account(
    conn: &mut PgConnection,
    project: ProjectId,
    connection: ConnectionId,
    provider: &str,
    secret: &Secret,
) -> Result<(), CommandError> {
    let parsed: Option<serde_json::Value> = serde_json::from_str(&secret.0).ok();
    let account = parsed.as_ref().and_then(|v| v.get("account_id")?.as_str());
    let Some(account) = account.filter(|a| !a.is_empty() && a.len() <= 256) else { return Ok(()) };
    sqlx::query(
        "INSERT INTO connection_accounts (provider, account_id, project_id, connection_id) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(provider)
    .bind(account)
    .bind(project.0)
    .bind(connection.0)
    .execute(conn)
    .await?;
    Ok(())
}

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
        let conn = self.in_tx(&mut uow).await?;
        let credential = self.credentials.put(conn, CredentialId(Uuid::now_v7()), ctx.project_id, id, secret).await?;
        record_account(conn, ctx.project_id, id, &integration.state.provider, secret).await?;
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
        let conn = self.in_tx(&mut uow).await?;
        let credential = self.credentials.put(conn, CredentialId(Uuid::now_v7()), ctx.project_id, id, secret).await?;
        record_account(conn, ctx.project_id, id, &loaded.state.provider, secret).await?;
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
