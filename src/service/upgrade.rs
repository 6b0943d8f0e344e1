//! Moves data stored by earlier releases into what this release expects, once, at start-up.

use std::collections::{BTreeSet, HashMap};

use uuid::Uuid;

use crate::error::ApiResult;
use crate::state::AppState;

/// Renames the Redis keys of earlier releases (one hash tag per partition) to the queue-wide
/// tags of this one. Best effort: with Redis or PostgreSQL unreachable it is tried again at
/// the next start, and the data stays where it was meanwhile.
pub async fn move_earlier_redis_layout(state: &AppState) {
    match plan_and_move(state).await {
        Ok(0) => {}
        Ok(moved) => tracing::info!(
            moved,
            "moved Redis keys of an earlier release to the queue-wide layout"
        ),
        Err(error) => {
            tracing::warn!(error = %error, "Redis keys of an earlier release not moved; retried at the next start")
        }
    }
}

async fn plan_and_move(state: &AppState) -> ApiResult<u64> {
    let queues = state.store.all_queues(None).await?;
    let subscriptions = state.store.list_all_subscriptions().await?;
    let mut groups: HashMap<Uuid, BTreeSet<String>> = HashMap::new();
    for subscription in subscriptions {
        groups
            .entry(subscription.queue_id)
            .or_default()
            .insert(subscription.delivery_group);
    }
    let plan: Vec<(Uuid, u16, Vec<String>)> = queues
        .iter()
        .map(|queue| {
            let groups = groups.remove(&queue.id).unwrap_or_default();
            (
                queue.id,
                queue.partition_count,
                groups.into_iter().collect(),
            )
        })
        .collect();
    state.broker.move_earlier_layout(&plan).await
}
