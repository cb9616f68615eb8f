//! The command service's operations (request, lease, record pages and deliveries, finish, retry, cancel).

use super::*;

impl CommandService {
    /// Requests an operation: one event on the installation's stream (which orders it with
    /// pauses and deletes) and the operation's first event, in one transaction.
    pub async fn request_operation(
        &self,
        ctx: &CommandContext,
        installation_id: InstallationId,
        new: &NewOperation,
    ) -> Result<CommandOutcome, CommandError> {
        self.request_operation_with(ctx, installation_id, new, None).await
    }

    /// Requests a write of `records` (objects of fields, `id` to update one) to the
    /// provider. The records are kept beside the log (customer data), in the same
    /// transaction as the request.
    pub async fn request_write(
        &self,
        ctx: &CommandContext,
        installation_id: InstallationId,
        object: &str,
        records: &[serde_json::Value],
    ) -> Result<CommandOutcome, CommandError> {
        if records.is_empty() || records.len() > 10_000 || records.iter().any(|r| !r.is_object()) {
            return Err(CommandError::Invalid("a write takes 1 to 10,000 records, each an object of fields".into()));
        }
        let new = NewOperation {
            op_type: OperationType::Write,
            object: object.into(),
            since: None,
            until: None,
            trigger: Trigger::Triggered,
        };
        self.request_operation_with(ctx, installation_id, &new, Some(records)).await
    }

    async fn request_operation_with(
        &self,
        ctx: &CommandContext,
        installation_id: InstallationId,
        new: &NewOperation,
        records: Option<&[serde_json::Value]>,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        // Without records, the digest an idempotency key was stored with before writes existed.
        let request = match records {
            None => serde_json::to_value((installation_id, new)),
            Some(records) => serde_json::to_value((installation_id, new, records)),
        }
        .map_err(|e| CommandError::Invalid(e.to_string()))?;
        let mut uow = match self.begin(ctx, "operation.request", &request).await? {
            Begun::Replayed(outcome) => return Ok(outcome),
            Begun::Fresh(uow) => uow,
        };
        let installation = self.load_in::<Installation>(&mut uow, installation_id.0).await?;
        let connection_id = installation.state.connection_id;
        let connection = self.load_in::<Connection>(&mut uow, connection_id.0).await?;
        let operation_id = OperationId(Uuid::now_v7());
        let operation = self.load_in::<Operation>(&mut uow, operation_id.0).await?;
        // The operation's own checks first: a bad window is the caller's first problem.
        let request = OperationCommand::Request {
            project_id: ctx.project_id,
            installation_id,
            connection_id,
            op_type: new.op_type,
            object: new.object.clone(),
            since: new.since,
            until: new.until,
            trigger: new.trigger,
            at,
        };
        operation.state.decide(&request).map_err(DomainError::from)?;
        self.decide(
            &mut uow,
            &installation,
            &InstallationCommand::RequestOperation {
                operation_id,
                op_type: new.op_type,
                object: new.object.clone(),
                trigger: new.trigger,
                connection: ConnectionFacts { id: connection_id, state: connection.state },
                at,
            },
        )?;
        self.decide(&mut uow, &operation, &request)?;
        if let Some(records) = records {
            sqlx::query("INSERT INTO write_batches (operation_id, project_id, records) VALUES ($1, $2, $3)")
                .bind(operation_id.0)
                .bind(ctx.project_id.0)
                .bind(sqlx::types::Json(records))
                .execute(self.in_tx(&mut uow).await?)
                .await?;
        }
        self.commit(uow).await
    }

    /// Starts (or takes over an expired lease on) an operation, holding it for `lease_for`.
    pub async fn start_operation(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
        lease_for: Duration,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.start", id.0, &(id, lease_id), |_| OperationCommand::Start {
            lease_id,
            lease_until: at + lease_for,
            at,
        })
        .await
    }

    pub async fn record_page(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
        records: u64,
        bytes: u64,
        cursor: &Cursor,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.record_page", id.0, &(id, lease_id, records, bytes, cursor), |_| {
            OperationCommand::RecordPage { lease_id, records, bytes, cursor: cursor.clone(), at }
        })
        .await
    }

    /// Records a batch of pages in one command (one event each).
    pub async fn record_pages(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
        pages: &[PageRecord],
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.record_pages", id.0, &(id, lease_id, pages), |_| {
            OperationCommand::RecordPages { lease_id, pages: pages.to_vec(), at }
        })
        .await
    }

    /// Extends the holder's lease to `lease_for` from now.
    pub async fn renew_lease(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
        lease_for: Duration,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.renew_lease", id.0, &(id, lease_id, at), |_| {
            OperationCommand::RenewLease { lease_id, lease_until: at + lease_for, at }
        })
        .await
    }

    /// Gives the holder's lease up: the operation is left running for another worker to
    /// start at once (a worker stopping cleanly).
    pub async fn release_lease(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.release_lease", id.0, &(id, lease_id), |_| {
            OperationCommand::ReleaseLease { lease_id, at }
        })
        .await
    }

    /// Records a failed delivery attempt of the operation's next page.
    pub async fn record_delivery_failure(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
        delivery: &DeliveryAttempt,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.record_delivery_failure", id.0, &(id, lease_id, delivery), |_| {
            OperationCommand::RecordDeliveryFailure { lease_id, delivery: delivery.clone(), at }
        })
        .await
    }

    /// Records a page delivered to its destination, with its new cursor, in one append.
    pub async fn record_delivered_page(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
        delivery: &DeliveryAttempt,
        page: &PageRecord,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.record_delivered_page", id.0, &(id, lease_id, delivery, page), |_| {
            OperationCommand::RecordDeliveredPage { lease_id, delivery: delivery.clone(), page: page.clone(), at }
        })
        .await
    }

    pub async fn succeed_operation(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.succeed", id.0, &(id, lease_id), |_| OperationCommand::Succeed {
            lease_id,
            at,
        })
        .await
    }

    pub async fn fail_operation(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        lease_id: LeaseId,
        error_class: ErrorClass,
        message: &str,
        retryable: bool,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.fail", id.0, &(id, lease_id, error_class, message, retryable), |_| {
            OperationCommand::Fail { lease_id, error_class, message: message.into(), retryable, at }
        })
        .await
    }

    pub async fn retry_operation(&self, ctx: &CommandContext, id: OperationId) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.retry", id.0, &id, |_| OperationCommand::Retry { at }).await
    }

    /// Replays a dead letter (an operation that failed after all its attempts): dispatched
    /// again, it resumes from its last recorded page.
    pub async fn replay_dead_letter(
        &self,
        ctx: &CommandContext,
        id: OperationId,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.replay_dead_letter", id.0, &id, |_| {
            OperationCommand::ReplayDeadLetter { at }
        })
        .await
    }

    pub async fn cancel_operation(
        &self,
        ctx: &CommandContext,
        id: OperationId,
        reason: &str,
    ) -> Result<CommandOutcome, CommandError> {
        let at = Utc::now();
        self.single::<Operation>(ctx, "operation.cancel", id.0, &(id, reason), |_| OperationCommand::Cancel {
            reason: reason.into(),
            at,
        })
        .await
    }
}
