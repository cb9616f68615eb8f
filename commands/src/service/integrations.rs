//! The command service's integrations (declare, deploy revisions).

use super::*;

impl CommandService {
    pub async fn declare_integration(
        &self,
        ctx: &CommandContext,
        name: &str,
        provider: &str,
    ) -> Result<CommandOutcome, CommandError> {
        self.declare_integration_with(ctx, name, provider, None).await
    }

    /// Declares an integration and, when a manifest is given, deploys it as revision 1 in
    /// the same append: both events or neither.
    pub async fn declare_integration_with(
        &self,
        ctx: &CommandContext,
        name: &str,
        provider: &str,
        manifest: Option<&Manifest>,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let mut uow = match self.begin(ctx, "integration.declare", &(name, provider, manifest)).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let loaded = self.load_in::<Integration>(&mut uow, Uuid::now_v7()).await?;
        let mut commands = vec![IntegrationCommand::Declare {
            project_id: ctx.project_id,
            name: name.into(),
            provider: provider.into(),
            at,
        }];
        if let Some(manifest) = manifest {
            commands.push(IntegrationCommand::DeployRevision {
                manifest: manifest.clone(),
                manifest_digest: manifest_digest(manifest),
                at,
            });
        }
        uow.streams.push(self.store.decide(&loaded, &commands)?);
        self.commit(uow).await
    }

    pub async fn deploy_revision(
        &self,
        ctx: &CommandContext,
        integration_id: IntegrationId,
        manifest: &Manifest,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let digest = manifest_digest(manifest);
        self.single::<Integration>(
            ctx,
            "integration.deploy_revision",
            integration_id.0,
            &(integration_id, manifest),
            |_| IntegrationCommand::DeployRevision { manifest: manifest.clone(), manifest_digest: digest.clone(), at },
        )
        .await
    }
}
