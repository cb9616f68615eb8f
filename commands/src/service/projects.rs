//! The command service's projects.

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
}
