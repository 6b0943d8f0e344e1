//! Reclaims deliveries whose ack deadline (`sessionTimeoutMs`) passed: each counts as a failed
//! attempt and goes through the subscription's retry policy (retried later to the same
//! group, or dead-lettered once attempts are exhausted). A consumer that crashes after
//! pulling therefore loses nothing: its messages come back to the group.
//!
//! It looks at a queue when a deadline of a delivery made by this instance passes
//! (`deadline_timers`, armed by the takes; each look arms the queue's next deadline), and
//! every `SAFETY_LOOK` at every active queue: deliveries made by an instance that died are
//! reclaimed by the others then. Several instances may reclaim at once: settling checks that
//! the delivery is still the one whose deadline passed, so each is handled once.
//!
//! Each turn looks at most at `TURN_PARTITIONS` partitions' worth of queues, taken in tenant
//! turns (`service::turns`), so one tenant's many queues never hold up another's deadline.

use std::time::{Duration, Instant};

use crate::domain::message::Envelope;
use crate::domain::subscription::Subscription;
use crate::service::consume::{record_failure, Failure};
use crate::service::partitions::QueueRef;
use crate::service::queues;
use crate::service::turns::{push_queues, Lanes};
use crate::state::AppState;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

const SAFETY_LOOK: Duration = Duration::from_secs(30);
const ERROR_BACKOFF_MS: i64 = 1000;
/// Partitions looked at per turn, at most (a wider queue goes alone).
const TURN_PARTITIONS: usize = 256;

pub async fn run(state: AppState, shutdown: CancellationToken) {
    // At start: whatever an earlier run of this instance left in flight.
    let mut safety_look: Option<Instant> = None;
    let mut turns: Lanes<QueueRef> = Lanes::default();
    while !shutdown.is_cancelled() {
        let now = Utc::now().timestamp_millis();
        push_queues(&state, &mut turns.due, state.deadline_timers.take_due(now)).await;
        if safety_look.is_none_or(|at| at.elapsed() >= SAFETY_LOOK) {
            safety_look = Some(Instant::now());
            push_queues(&state, &mut turns.swept, state.activity.snapshot()).await;
        }
        let turn = turns.take(TURN_PARTITIONS, |queue| usize::from(queue.partition_count));
        if !turn.is_empty() {
            let subscriptions = state.subscriptions.current(&state.store).await;
            for (_, queue) in turn {
                let queue_id = queue.id;
                let subscriptions: Vec<&Subscription> = subscriptions.of_queue(queue_id).collect();
                if subscriptions.is_empty() {
                    continue;
                }
                if let Err(error) = reclaim(&state, &subscriptions, now).await {
                    tracing::warn!(error = %error, queue = %queue_id, "reclaiming overdue deliveries failed");
                    state.deadline_timers.arm(queue_id, now + ERROR_BACKOFF_MS);
                }
            }
        }
        if !turns.is_empty() {
            // More waits its turn: deadlines that passed meanwhile join the next one.
            tokio::task::yield_now().await;
            continue;
        }
        let until_safety_look =
            SAFETY_LOOK.saturating_sub(safety_look.map_or(Duration::ZERO, |at| at.elapsed()));
        tokio::select! {
            () = state.deadline_timers.wait(until_safety_look) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

/// Reclaims the overdue deliveries of every group of one queue (`subscriptions` all consume
/// it); a group is handled with the policy of its oldest subscription.
async fn reclaim(
    state: &AppState,
    subscriptions: &[&Subscription],
    now: i64,
) -> crate::error::ApiResult<()> {
    let Some(first) = subscriptions.first() else {
        return Ok(());
    };
    let queue = match queues::resolve(state, first.queue_tenant_id, &first.queue).await {
        Ok(resolved) => resolved.queue,
        Err(_) => return Ok(()),
    };
    let mut groups: Vec<(&str, &Subscription)> = Vec::new();
    for subscription in subscriptions {
        if !groups
            .iter()
            .any(|(group, _)| *group == subscription.delivery_group)
        {
            groups.push((&subscription.delivery_group, subscription));
        }
    }
    let names: Vec<&str> = groups.iter().map(|(group, _)| *group).collect();
    // Overdue deliveries read per group and partition per look.
    let limit = state.config.message_batch_size;
    let overdue = state
        .broker
        .overdue(queue.id, queue.partition_count, &names, now, limit)
        .await?;
    if let Some(next) = overdue.next_deadline_ms {
        state.deadline_timers.arm(queue.id, next);
    }
    if overdue.deliveries.len() >= limit {
        // Possibly more: look again at once.
        state.deadline_timers.arm(queue.id, now);
    }
    for (group, delivery) in overdue.deliveries {
        let Some((_, subscription)) = groups.get(group) else {
            continue;
        };
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
    Ok(())
}
