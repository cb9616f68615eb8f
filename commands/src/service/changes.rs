//! The command service's changes: what providers push (webhooks), each change its own
//! stream, recorded in one transaction per delivery.

use super::*;
use amplog_domain::change::{Change, ChangeCommand, ChangeFacts};

/// A change's stream id: from its connection and the provider's event id, so the provider
/// sending it again finds it recorded.
pub fn change_id(facts: &ChangeFacts) -> Uuid {
    Uuid::new_v5(&facts.connection_id.0, facts.provider_event_id.as_bytes())
}

impl CommandService {
    /// Records the changes a provider pushed, those not recorded yet (by `change_id`), in
    /// one transaction (one append per project); returns how many were new. Invalid
    /// changes are refused before anything is written.
    pub async fn record_changes(&self, actor: &str, changes: &[ChangeFacts]) -> Result<usize, CommandError> {
        let at = Utc::now();
        let ids: Vec<String> = changes.iter().map(|c| change_id(c).to_string()).collect();
        let metadata = serde_json::json!({"actor": actor, "command": "change.receive"}).to_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut tx = amplog_log::tx::begin(&self.pool).await?;
            let recorded: Vec<String> = sqlx::query_scalar(
                "SELECT aggregate_id FROM events WHERE aggregate_type = 'change' AND aggregate_id = ANY($1)
                   AND sequence = 1",
            )
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
            let mut seen: std::collections::HashSet<String> = recorded.into_iter().collect();
            let mut by_project: BTreeMap<ProjectId, Vec<PendingStream>> = BTreeMap::new();
            for (facts, id) in changes.iter().zip(&ids) {
                if !seen.insert(id.clone()) {
                    continue;
                }
                let fresh = Loaded::<Change> { id: id.clone(), state: Change::default(), sequence: 0, hash: None };
                let command = ChangeCommand::Receive { facts: facts.clone(), at };
                by_project.entry(facts.project_id).or_default().push(self.store.decide(&fresh, &[command])?);
            }
            let mut appended = Vec::new();
            let mut conflict = false;
            for (project, streams) in &by_project {
                match self.store.append(&mut tx, project.0, &metadata, streams).await {
                    Ok(events) => appended.push((streams, events)),
                    // The same change recorded meanwhile (the provider sent it twice at once).
                    Err(amplog_log::LogError::Conflict { .. }) if attempt < 3 => {
                        conflict = true;
                        break;
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            if conflict {
                continue;
            }
            tx.commit().await?;
            let new = appended.iter().map(|(streams, _)| streams.len()).sum();
            for (streams, events) in &appended {
                self.store.committed(streams, events);
            }
            if new > 0 {
                self.wake.notify_one();
            }
            return Ok(new);
        }
    }
}
