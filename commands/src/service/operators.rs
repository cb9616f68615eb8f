//! The command service's organizations and admin keys: what a deployment's operator does
//! above projects. Organization and admin-key streams are not a project's; their events
//! carry the project they concern (the one made in an organization, the one an admin key
//! acted in), so they show in that project's configuration history.

use super::*;
use amplog_domain::admin_key::{AdminKey, AdminKeyCommand};
use amplog_domain::organization::{Organization, OrganizationCommand};

/// How often recording an admin key's use is tried when concurrent uses collide.
const USE_ATTEMPTS: usize = 5;

impl CommandService {
    /// Creates organization `id`.
    pub async fn create_organization(&self, id: Uuid, name: &str, actor: &str) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let ctx = CommandContext::new(ProjectId(id), actor);
        self.single::<Organization>(&ctx, "organization.create", id, &name, |_| OrganizationCommand::Create {
            name: name.into(),
            at,
        })
        .await
    }

    /// Creates the project `ctx.project_id` in an organization: the project's `Created`
    /// and `JoinedOrganization` and the organization's `ProjectAdded`, in one append.
    pub async fn create_project_in(
        &self,
        ctx: &CommandContext,
        name: &str,
        organization: Uuid,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let mut uow = match self.begin(ctx, "project.create_in_organization", &(name, organization)).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let org = self.load_in::<Organization>(&mut uow, organization).await?;
        let project = self.load_in::<Project>(&mut uow, ctx.project_id.0).await?;
        let commands = [
            ProjectCommand::Create { name: name.into(), at },
            ProjectCommand::JoinOrganization { organization_id: organization, at },
        ];
        uow.streams.push(self.store.decide(&project, &commands)?);
        self.decide(&mut uow, &org, &OrganizationCommand::AddProject { project_id: ctx.project_id, at })?;
        self.commit(uow).await
    }

    /// Stores a new admin key's digest and records its `Created`, in one transaction.
    pub async fn record_admin_key(
        &self,
        id: Uuid,
        digest: &[u8],
        label: Option<&str>,
        actor: &str,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        let ctx = CommandContext::new(ProjectId(id), actor);
        let mut uow = self.begin_unkeyed(&ctx, "admin_key.create").await?;
        let loaded = self.load_in::<AdminKey>(&mut uow, id).await?;
        let command = AdminKeyCommand::Create { label: label.map(Into::into), at };
        loaded.state.decide(&command).map_err(DomainError::from)?;
        sqlx::query("INSERT INTO admin_keys (id, digest, label) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(digest)
            .bind(label)
            .execute(self.in_tx(&mut uow).await?)
            .await?;
        self.decide(&mut uow, &loaded, &command)?;
        self.commit(uow).await
    }

    /// Revokes an admin key; `None`: no live admin key has that id.
    pub async fn revoke_admin_key(&self, id: Uuid, actor: &str) -> Result<Option<CommandOutcome>, CommandError> {
        let at = Utc::now();
        let ctx = CommandContext::new(ProjectId(id), actor);
        let mut uow = self.begin_unkeyed(&ctx, "admin_key.revoke").await?;
        let revoked = sqlx::query("UPDATE admin_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .execute(self.in_tx(&mut uow).await?)
            .await?;
        if revoked.rows_affected() == 0 {
            return Ok(None);
        }
        let loaded = self.load_in::<AdminKey>(&mut uow, id).await?;
        self.decide(&mut uow, &loaded, &AdminKeyCommand::Revoke { at })?;
        self.commit(uow).await.map(Some)
    }

    /// Records one use of admin key `id` in `project` (`what`: the request's kind). Uses
    /// of one key at once contend for its stream: a collision is tried again.
    pub async fn record_admin_key_use(
        &self,
        id: Uuid,
        project: ProjectId,
        what: &str,
    ) -> Result<CommandOutcome, CommandError> {
        let ctx = CommandContext::new(project, format!("admin_key:{id}"));
        let mut attempt = 0;
        loop {
            let at = Utc::now();
            let result = self
                .single::<AdminKey>(&ctx, "admin_key.use", id, &(id, what), |_| AdminKeyCommand::RecordUse {
                    project_id: project,
                    what: what.into(),
                    at,
                })
                .await;
            attempt += 1;
            match result {
                Err(CommandError::Conflict { .. }) if attempt < USE_ATTEMPTS => continue,
                other => return other,
            }
        }
    }
}
