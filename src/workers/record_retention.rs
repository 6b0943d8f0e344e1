//! Removes message records, consumption records and quarantined entries older than their
//! queue's `retentionMs`, so the record tables follow the messages they describe instead of
//! growing forever. A singleton: the instance holding the Redis lease does it, in batches of
//! `BATCH` rows per table, each batch its own short statement, until nothing is left; then
//! it sleeps `RECORD_RETENTION_INTERVAL_MS`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::AppState;

const LEASE: &str = "record-retention";
/// Rows per table and statement: small enough that no statement holds locks for long.
const BATCH: i64 = 5000;

pub async fn run(state: AppState, shutdown: CancellationToken) {
    let interval = Duration::from_millis(state.config.record_retention_interval_ms);
    let lease_ttl = state.config.record_retention_interval_ms.max(10_000) * 3;
    while !shutdown.is_cancelled() {
        match state
            .broker
            .hold_lease(LEASE, &state.instance_id, lease_ttl)
            .await
        {
            Ok(true) => sweep(&state, &shutdown).await,
            Ok(false) => {}
            Err(error) => tracing::debug!(error = %error, "record retention lease unavailable"),
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

async fn sweep(state: &AppState, shutdown: &CancellationToken) {
    let mut total = 0;
    while !shutdown.is_cancelled() {
        match state.store.delete_expired_records(BATCH).await {
            Ok(0) => break,
            Ok(removed) => total += removed,
            Err(error) => {
                tracing::warn!(error = %error, "removing expired records failed");
                break;
            }
        }
    }
    if total > 0 {
        tracing::debug!(
            removed = total,
            "removed records past their queue's retention"
        );
    }
}
