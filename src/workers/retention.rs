//! Removes stream entries past their queue's `retentionMs`, and entries every consumer group
//! has acked, every `RETENTION_INTERVAL_MS`, in the active queues. A singleton: the instance holding the Redis
//! lease does it, another takes over when that one stops renewing it.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

const LEASE: &str = "retention";

pub async fn run(state: AppState, shutdown: CancellationToken) {
    let interval = Duration::from_millis(state.config.retention_interval_ms);
    let lease_ttl = state.config.retention_interval_ms * 3;
    while !shutdown.is_cancelled() {
        match state
            .broker
            .hold_lease(LEASE, &state.instance_id, lease_ttl)
            .await
        {
            Ok(true) => {
                if let Err(error) = sweep(&state).await {
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
/// nothing to trim.
async fn sweep(state: &AppState) -> crate::error::ApiResult<()> {
    let active = state.activity.snapshot();
    if active.is_empty() {
        return Ok(());
    }
    let (queues, _) = state.queue_directory.lookup(&state.store, &active).await;
    let now = Utc::now().timestamp_millis();
    let work: Vec<_> = queues
        .iter()
        .flat_map(|queue| {
            let cutoff = now.saturating_sub(queue.retention_ms as i64).max(0);
            queue.partitions().map(move |partition| (partition, cutoff))
        })
        .collect();
    let removed = state.broker.trim(&work).await?;
    if removed > 0 {
        tracing::debug!(removed, "trimmed stream entries");
    }
    Ok(())
}
