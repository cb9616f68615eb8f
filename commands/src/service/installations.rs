//! The command service's installations (create, configure, pause, delete).

use super::*;

impl CommandService {
    pub async fn create_installation(
        &self,
        ctx: &CommandContext,
        new: &NewInstallation,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let mut uow = match self.begin(ctx, "installation.create", new).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let integration = self.load_in::<Integration>(&mut uow, new.integration_id.0).await?;
        let connection = self.load_in::<Connection>(&mut uow, new.connection_id.0).await?;
        let revision = new.revision.unwrap_or(integration.state.revisions.len() as u32);
        let objects = match &new.objects {
            Some(objects) => objects.clone(),
            None => default_objects(&integration.state, revision),
        };
        let id = Uuid::now_v7();
        let loaded = self.load_in::<Installation>(&mut uow, id).await?;
        let command = InstallationCommand::Create {
            project_id: ctx.project_id,
            integration: IntegrationFacts { id: new.integration_id, state: integration.state },
            revision,
            group_ref: new.group_ref.clone(),
            consumer_ref: new.consumer_ref.clone(),
            connection: ConnectionFacts { id: new.connection_id, state: connection.state },
            objects,
            at,
        };
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await
    }

    pub async fn update_installation_config(
        &self,
        ctx: &CommandContext,
        id: InstallationId,
        revision: u32,
        objects: &BTreeMap<String, ObjectConfig>,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let mut uow = match self.begin(ctx, "installation.update_config", &(id, revision, objects)).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let loaded = self.load_in::<Installation>(&mut uow, id.0).await?;
        let integration_id = loaded.state.integration_id;
        let integration = self.load_in::<Integration>(&mut uow, integration_id.0).await?;
        let command = InstallationCommand::UpdateConfig {
            integration: IntegrationFacts { id: integration_id, state: integration.state },
            revision,
            objects: objects.clone(),
            at,
        };
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await
    }

    pub async fn pause_installation(
        &self,
        ctx: &CommandContext,
        id: InstallationId,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Installation>(ctx, "installation.pause", id.0, &id, |_| InstallationCommand::Pause { at }).await
    }

    pub async fn unpause_installation(
        &self,
        ctx: &CommandContext,
        id: InstallationId,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Installation>(ctx, "installation.unpause", id.0, &id, |_| InstallationCommand::Unpause { at })
            .await
    }

    pub async fn delete_installation(
        &self,
        ctx: &CommandContext,
        id: InstallationId,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Installation>(ctx, "installation.delete", id.0, &id, |_| InstallationCommand::Delete { at }).await
    }
}
