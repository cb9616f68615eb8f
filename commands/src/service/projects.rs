//! The command service's projects, and their configuration recorded on the project's
//! stream: API keys (the digest in `api_keys`, the id and scope in the event) and
//! destinations (the encrypted secret in `destinations`, its fingerprint in the event),
//! JWT keys and notification subscriptions.

use super::*;

impl CommandService {
    /// Creates the project `ctx.project_id`.
    pub async fn create_project(&self, ctx: &CommandContext, name: &str) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Project>(ctx, "project.create", ctx.project_id.0, &name, |_| ProjectCommand::Create {
            name: name.into(),
            at,
        })
        .await
    }

    pub async fn rename_project(&self, ctx: &CommandContext, name: &str) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Project>(ctx, "project.rename", ctx.project_id.0, &name, |_| ProjectCommand::Rename {
            name: name.into(),
            at,
        })
        .await
    }

    /// Stores a new API key's digest and records `ApiKeyCreated`, in one transaction.
    pub async fn record_api_key(
        &self,
        ctx: &CommandContext,
        key_id: Uuid,
        scope: &str,
        digest: &[u8],
        label: Option<&str>,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let mut uow = match self.begin(ctx, "project.record_api_key", &(key_id, scope, label)).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let loaded = self.load_in::<Project>(&mut uow, ctx.project_id.0).await?;
        let command = ProjectCommand::RecordApiKey { key_id, scope: scope.into(), label: label.map(Into::into), at };
        loaded.state.decide(&command).map_err(DomainError::from)?;
        sqlx::query("INSERT INTO api_keys (id, project_id, scope, digest, label) VALUES ($1, $2, $3, $4, $5)")
            .bind(key_id)
            .bind(ctx.project_id.0)
            .bind(scope)
            .bind(digest)
            .bind(label)
            .execute(self.in_tx(&mut uow).await?)
            .await?;
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await
    }

    /// Revokes an API key of the context's project; `None`: no live key of the project
    /// has that id (nothing is recorded).
    pub async fn revoke_api_key(
        &self,
        ctx: &CommandContext,
        key_id: Uuid,
    ) -> Result<Option<CommandOutcome>, CommandError> {
        let at = Utc::now();
        let mut uow = match self.begin(ctx, "project.revoke_api_key", &key_id).await? {
            Begun::Replayed(outcome) => return Ok(Some(outcome)),
            Begun::Fresh(uow) => uow,
        };
        let revoked = sqlx::query(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND project_id = $2 AND revoked_at IS NULL",
        )
        .bind(key_id)
        .bind(ctx.project_id.0)
        .execute(self.in_tx(&mut uow).await?)
        .await?;
        if revoked.rows_affected() == 0 {
            return Ok(None);
        }
        let loaded = self.load_in::<Project>(&mut uow, ctx.project_id.0).await?;
        self.decide(&mut uow, &loaded, &ProjectCommand::RevokeApiKey { key_id, at })?;
        self.commit(uow).await.map(Some)
    }

    /// Creates or replaces a destination (enabled again if it was disabled) and records
    /// `DestinationPut` with the secret's fingerprint; returns the signing secret.
    pub async fn put_destination(
        &self,
        ctx: &CommandContext,
        name: &str,
        url: &str,
        secret: Option<Secret>,
    ) -> Result<Secret, CommandError> {
        let at = Utc::now();
        let mut uow = self.begin_unkeyed(ctx, "project.put_destination").await?;
        let loaded = self.load_in::<Project>(&mut uow, ctx.project_id.0).await?;
        let conn = self.in_tx(&mut uow).await?;
        let secret = crate::destinations::put(conn, &self.credentials, ctx.project_id, name, url, secret).await?;
        let secret_fingerprint = self.credentials.key().fingerprint(&secret);
        let command = ProjectCommand::PutDestination { name: name.into(), url: url.into(), secret_fingerprint, at };
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await?;
        Ok(secret)
    }

    /// Stops deliveries to a destination (it answered 410 Gone) and records why; a
    /// destination already disabled stays as it is.
    pub async fn disable_destination(
        &self,
        ctx: &CommandContext,
        name: &str,
        reason: &str,
    ) -> Result<(), CommandError> {
        let at = Utc::now();
        let mut uow = self.begin_unkeyed(ctx, "project.disable_destination").await?;
        let loaded = self.load_in::<Project>(&mut uow, ctx.project_id.0).await?;
        let command = ProjectCommand::DisableDestination { name: name.into(), reason: reason.into(), at };
        match loaded.state.decide(&command) {
            Err(project::ProjectError::DestinationDisabled) => return Ok(()),
            Err(e) => return Err(DomainError::from(e).into()),
            Ok(_) => {}
        }
        crate::destinations::disable(self.in_tx(&mut uow).await?, ctx.project_id, name, reason).await?;
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await?;
        Ok(())
    }

    /// Stores a project's JWT public key (PEM, already parsed by the caller) and records
    /// `JwtKeyCreated` with its digest, in one transaction.
    pub async fn record_jwt_key(
        &self,
        ctx: &CommandContext,
        kid: Uuid,
        algorithm: &str,
        public_key: &str,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let fingerprint = format!("sha256:{}", hex::encode(Sha256::digest(public_key.as_bytes())));
        let mut uow = self.begin_unkeyed(ctx, "project.record_jwt_key").await?;
        let loaded = self.load_in::<Project>(&mut uow, ctx.project_id.0).await?;
        let command = ProjectCommand::RecordJwtKey { kid, algorithm: algorithm.into(), fingerprint, at };
        loaded.state.decide(&command).map_err(DomainError::from)?;
        sqlx::query("INSERT INTO jwt_keys (kid, project_id, alg, public_key) VALUES ($1, $2, $3, $4)")
            .bind(kid)
            .bind(ctx.project_id.0)
            .bind(algorithm)
            .bind(public_key)
            .execute(self.in_tx(&mut uow).await?)
            .await?;
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await
    }

    /// Revokes a JWT key of the context's project: tokens it signed are refused from then on.
    pub async fn revoke_jwt_key(&self, ctx: &CommandContext, kid: Uuid) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let mut uow = match self.begin(ctx, "project.revoke_jwt_key", &kid).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let loaded = self.load_in::<Project>(&mut uow, ctx.project_id.0).await?;
        let command = ProjectCommand::RevokeJwtKey { kid, at };
        loaded.state.decide(&command).map_err(DomainError::from)?;
        sqlx::query("UPDATE jwt_keys SET revoked_at = now() WHERE kid = $1 AND project_id = $2")
            .bind(kid)
            .bind(ctx.project_id.0)
            .execute(self.in_tx(&mut uow).await?)
            .await?;
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await
    }

    /// Subscribes the project's destination `destination` to notification topics (or
    /// patterns); returns the subscription's id.
    pub async fn subscribe_notifications(
        &self,
        ctx: &CommandContext,
        destination: &str,
        topics: &[String],
    ) -> Result<(Uuid, CommandOutcome), CommandError> {
        let at = Utc::now();
        let subscription_id = Uuid::now_v7();
        let mut uow = self.begin_unkeyed(ctx, "project.subscribe_notifications").await?;
        let destination_exists = crate::destinations::exists(uow.conn.get(), ctx.project_id, destination).await?;
        let loaded = self.load_in::<Project>(&mut uow, ctx.project_id.0).await?;
        let command = ProjectCommand::SubscribeNotifications {
            subscription_id,
            destination: destination.into(),
            destination_exists,
            topics: topics.to_vec(),
            at,
        };
        self.decide(&mut uow, &loaded, &command)?;
        Ok((subscription_id, self.commit(uow).await?))
    }

    /// Deletes a notification subscription: what it queued and had not delivered is not sent.
    pub async fn delete_notification_subscription(
        &self,
        ctx: &CommandContext,
        subscription_id: Uuid,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Project>(
            ctx,
            "project.delete_notification_subscription",
            ctx.project_id.0,
            &subscription_id,
            |_| ProjectCommand::DeleteNotificationSubscription { subscription_id, at },
        )
        .await
    }
}
