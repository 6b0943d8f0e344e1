//! Reclaims deliveries whose ack deadline (`sessionTimeoutMs`) passed: each counts as a failed
//! attempt and goes through the subscription's retry policy (retried later to the same
//! group, or dead-lettered once attempts are exhausted). A consumer that crashes after
//! pulling therefore loses nothing: its messages come back to the group.
//!
//! Several instances may reclaim at once: settling checks that the delivery is still the one
//! whose deadline passed, so each overdue delivery is handled once.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::domain::message::Envelope;
use crate::service::consume::{record_failure, Failure};
use crate::service::queues;
use crate::state::AppState;

const SWEEP_EVERY: Duration = Duration::from_millis(500);

pub async fn run(state: AppState, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Err(error) = sweep(&state).await {
            tracing::warn!(error = %error, "reclaim sweep failed");
        }
        tokio::select! {
            () = tokio::time::sleep(SWEEP_EVERY) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

async fn sweep(state: &AppState) -> crate::error::ApiResult<()> {
    let subscriptions = state.subscriptions.current(&state.store).await;
    // A group is swept once, with the policy of its oldest subscription.
    let mut seen = HashSet::new();
    for subscription in subscriptions.iter() {
        if !seen.insert((subscription.queue_id, subscription.delivery_group.as_str())) {
            continue;
        }
        let queue =
            match queues::resolve(state, subscription.queue_tenant_id, &subscription.queue).await {
                Ok(resolved) => resolved.queue,
                Err(_) => continue,
            };
        let now = Utc::now().timestamp_millis();
        let overdue = state
            .broker
            .overdue(
                queue.id,
                queue.partition_count,
                &subscription.delivery_group,
                now,
                // Overdue deliveries read per group and partition per sweep.
                state.config.message_batch_size,
            )
            .await?;
        for delivery in overdue {
            let envelope = delivery
                .envelope
                .as_deref()
                .and_then(|text| serde_json::from_str::<Envelope>(text).ok());
            let message_id = envelope
                .as_ref()
                .map(|e| e.message_id.clone())
                .unwrap_or_default();
            let failure = Failure {
                partition: delivery.partition,
                entry_id: &delivery.entry_id,
                message_id: &message_id,
                attempt: delivery.attempt,
                expected_deadline: Some(&delivery.deadline),
                expected_attempt: None,
                error: "ack deadline passed",
                delay_override_ms: None,
                processing_ms: None,
            };
            record_failure(state, subscription, &queue, failure, envelope).await?;
        }
    }
    Ok(())
}
