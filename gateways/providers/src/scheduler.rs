//! The scheduler: requests reads from each installation object's schedule, as the
//! `scheduler` singleton (advisory-lock leader). Every slot of a schedule is requested once
//! under the idempotency key `schedule:{installation}:{object}:{slot}`, so a second
//! scheduler (a lost lock, a restart) replays the first request instead of adding one: the
//! key is the fence. An object never read yet gets its backfill first (the manifest's
//! window, the full history, or — without backfill — the changes since the installation
//! was created). Installations paused, deleted or needing re-auth are skipped, and so is an
//! object whose last read is still pending or running.

use crate::SyncError;
use amplog_commands::service::NewOperation;
use amplog_commands::{CommandContext, CommandError, CommandService};
use amplog_domain::integration::Backfill;
use amplog_domain::operation::{OperationType, Trigger};
use amplog_domain::schedule::Schedule;
use amplog_domain::{InstallationId, ProjectId};
use amplog_log::leader::{run_as_leader, Leadership};
use amplog_projections::queries::{self, Schedulable};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;
use uuid::Uuid;

pub const SCHEDULER: &str = "scheduler";

/// What one tick requested.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tick {
    pub backfills: usize,
    pub scheduled: usize,
    /// Objects whose last read is still open.
    pub busy: usize,
}

pub struct Scheduler {
    service: CommandService,
    holder: String,
    pub tick: Duration,
    /// The slot last requested per installation × object (a cache: the key decides).
    requested: tokio::sync::Mutex<HashMap<(Uuid, String), DateTime<Utc>>>,
}

impl Scheduler {
    pub fn new(service: CommandService, holder: impl Into<String>) -> Scheduler {
        Scheduler { service, holder: holder.into(), tick: Duration::from_secs(5), requested: Default::default() }
    }

    /// Runs until `stop` resolves, leading whenever it can.
    pub async fn run(&self, stop: impl Future<Output = ()>) {
        let pool = self.service.pool().clone();
        let pause = |_: &SyncError| Duration::from_secs(1);
        run_as_leader(&pool, SCHEDULER, &self.holder, stop, pause, |l| self.lead(l)).await;
    }

    async fn lead(&self, mut leadership: Leadership) -> Result<(), SyncError> {
        loop {
            leadership.alive().await?;
            let tick = self.tick_once(Utc::now()).await?;
            if tick.backfills + tick.scheduled > 0 {
                tracing::info!(
                    backfills = tick.backfills,
                    scheduled = tick.scheduled,
                    busy = tick.busy,
                    "reads requested"
                );
            }
            tokio::time::sleep(self.tick).await;
        }
    }

    /// Requests what is due at `now` (from the read models: a lagging projection can only
    /// make a request late, the keys keep it single).
    pub async fn tick_once(&self, now: DateTime<Utc>) -> Result<Tick, SyncError> {
        let Schedulable { installations, read_states, open_reads: open } =
            queries::schedulable(self.service.pool()).await?;
        let mut tick = Tick::default();
        let mut requested = self.requested.lock().await;
        for doc in installations {
            let project = doc.project_id;
            for (object, config) in doc.objects.iter().filter(|(_, c)| c.enabled) {
                let id = doc.installation_id;
                if open.contains(&(id, object.clone())) {
                    tick.busy += 1;
                    continue;
                }
                let (trigger, since, key) = if !read_states.contains(&format!("{id}/{object}")) {
                    let (trigger, since) = match config.backfill {
                        Backfill::Full => (Trigger::Backfill, None),
                        Backfill::Days(days) => (Trigger::Backfill, Some(now - chrono::Duration::days(days.into()))),
                        Backfill::None => (Trigger::Scheduled, doc.created_at),
                    };
                    (trigger, since, format!("backfill:{id}:{object}"))
                } else {
                    let Some(slot) = Schedule::parse(&config.schedule).and_then(|s| s.last_slot(now)) else { continue };
                    if requested.get(&(id, object.clone())) == Some(&slot) {
                        continue;
                    }
                    (Trigger::Scheduled, None, format!("schedule:{id}:{object}:{}", slot.timestamp()))
                };
                let ctx = CommandContext::new(ProjectId(project), "scheduler").with_idempotency_key(key);
                let new =
                    NewOperation { op_type: OperationType::Read, object: object.clone(), since, until: None, trigger };
                match self.service.request_operation(&ctx, InstallationId(id), &new).await {
                    Ok(outcome) => {
                        if !outcome.replayed {
                            match trigger {
                                Trigger::Backfill => tick.backfills += 1,
                                _ => tick.scheduled += 1,
                            }
                        }
                        if let Some(slot) = Schedule::parse(&config.schedule).and_then(|s| s.last_slot(now)) {
                            requested.insert((id, object.clone()), slot);
                        }
                    }
                    // The read model lagged behind a pause, a delete or lost credentials:
                    // the domain refuses, nothing to do.
                    Err(CommandError::Domain(error)) => {
                        tracing::debug!(installation = %id, object, code = error.code(), "read not requested");
                    }
                    Err(CommandError::Conflict { .. }) => {}
                    Err(error) => return Err(error.into()),
                }
            }
        }
        Ok(tick)
    }
}
