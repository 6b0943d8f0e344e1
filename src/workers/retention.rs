//! Removes stream entries past their queue's `retentionMs`, and entries every consumer group
//! has acked, every `RETENTION_INTERVAL_MS`, in the active queues. A singleton: the instance
//! holding the Redis lease does it, another takes over when that one stops renewing it.
//!
//! A queue no consumer group reads (a tenant's unread `audit-logs`, say) only loses entries
//! to age, so it is left alone until its oldest entry's retention ends; a subscription
//! change (a group may have appeared) or a new `retentionMs` ends the wait.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use uuid::Uuid;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::broker::retention::{Left, Trimmed};
use crate::service::partitions::QueueRef;
use crate::service::turns::TenantTurns;
use crate::state::AppState;

const LEASE: &str = "retention";
/// Partitions trimmed per round trip, at most (a wider queue goes alone).
const TURN_PARTITIONS: usize = 256;

/// Queues whose streams nothing can leave before a time: (that time in ms, the retention it
/// was computed with).
#[derive(Default)]
struct Waits {
    until: HashMap<Uuid, (i64, u64)>,
    subscription_changes: u64,
}

pub async fn run(state: AppState, shutdown: CancellationToken) {
    let interval = Duration::from_millis(state.config.retention_interval_ms);
    let lease_ttl = state.config.retention_interval_ms * 3;
    let mut waits = Waits::default();
    while !shutdown.is_cancelled() {
        match state
            .broker
            .hold_lease(LEASE, &state.instance_id, lease_ttl)
            .await
        {
            Ok(true) => {
                if let Err(error) = sweep(&state, &mut waits, &shutdown).await {
                    tracing::warn!(error = %error, "retention sweep failed");
                }
            }
            Ok(false) => {}
            Err(error) => tracing::debug!(error = %error, "retention lease unavailable"),
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

/// Trims the streams of the active queues (`service::activity`): an idle queue holds
/// nothing to trim. Queues go in tenant turns of at most `TURN_PARTITIONS` partitions, one
/// round trip each, so no tenant's queues hold Redis for long and a shutdown stops between
/// turns.
async fn sweep(
    state: &AppState,
    waits: &mut Waits,
    shutdown: &CancellationToken,
) -> crate::error::ApiResult<()> {
    let active = state.activity.snapshot();
    if active.is_empty() {
        return Ok(());
    }
    let changes = state.subscriptions.changes();
    if changes != waits.subscription_changes {
        waits.until.clear();
        waits.subscription_changes = changes;
    }
    let (queues, _) = state.queue_directory.lookup(&state.store, &active).await;
    // A queue that left the active set is looked at afresh when it comes back.
    let active: HashSet<Uuid> = queues.iter().map(|queue| queue.id).collect();
    waits.until.retain(|id, _| active.contains(id));
    let now = Utc::now().timestamp_millis();
    let mut turns = TenantTurns::default();
    for queue in queues.iter().filter(|queue| {
        !waits
            .until
            .get(&queue.id)
            .is_some_and(|&(until, retention)| until > now && retention == queue.retention_ms)
    }) {
        turns.push(queue.tenant_id, *queue);
    }
    while !turns.is_empty() && !shutdown.is_cancelled() {
        let due: Vec<QueueRef> = turns
            .take(TURN_PARTITIONS, |queue| usize::from(queue.partition_count))
            .into_iter()
            .map(|(_, queue)| queue)
            .collect();
        let work: Vec<_> = due
            .iter()
            .flat_map(|queue| {
                let cutoff = now.saturating_sub(queue.retention_ms as i64).max(0);
                queue.partitions().map(move |partition| (partition, cutoff))
            })
            .collect();
        let trimmed = state.broker.trim(&work).await?;
        let removed: u64 = trimmed.iter().map(|t| t.removed).sum();
        if removed > 0 {
            tracing::debug!(removed, "trimmed stream entries");
        }
        let mut results = trimmed.iter();
        for queue in due {
            let partitions = results.by_ref().take(queue.partition_count as usize);
            match wait_until(partitions, now, queue.retention_ms) {
                Some(until) => waits.until.insert(queue.id, (until, queue.retention_ms)),
                None => waits.until.remove(&queue.id),
            };
        }
    }
    Ok(())
}

/// When the next trim of a queue can first remove anything, if that is known: never before
/// its oldest unread entry's retention ends, unless a group reads one of its partitions.
fn wait_until<'a>(
    partitions: impl Iterator<Item = &'a Trimmed>,
    now: i64,
    retention_ms: u64,
) -> Option<i64> {
    let retention = retention_ms as i64;
    let mut earliest = i64::MAX;
    for partition in partitions {
        let free_at = match partition.left {
            Left::ReadByGroups => return None,
            Left::Nothing => now.saturating_add(retention),
            Left::Unread { oldest_ms } => oldest_ms.saturating_add(retention),
        };
        earliest = earliest.min(free_at);
    }
    (earliest != i64::MAX).then_some(earliest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trimmed(left: Left) -> Trimmed {
        Trimmed { removed: 0, left }
    }

    #[test]
    fn a_queue_read_by_a_group_is_trimmed_every_time() {
        let partitions = [
            trimmed(Left::Nothing),
            trimmed(Left::ReadByGroups),
            trimmed(Left::Unread { oldest_ms: 5 }),
        ];
        assert_eq!(wait_until(partitions.iter(), 100, 1000), None);
    }

    #[test]
    fn an_unread_queue_waits_for_its_oldest_entry_to_age() {
        let partitions = [
            trimmed(Left::Unread { oldest_ms: 50 }),
            trimmed(Left::Nothing),
            trimmed(Left::Unread { oldest_ms: 20 }),
        ];
        assert_eq!(wait_until(partitions.iter(), 100, 1000), Some(1020));
        assert_eq!(
            wait_until([trimmed(Left::Nothing)].iter(), 100, 1000),
            Some(1100),
            "an empty stream: whatever comes is younger than now"
        );
    }
}
