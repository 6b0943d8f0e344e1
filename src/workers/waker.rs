//! Hears the other instances' announcements (`service::wake`) and acts on them here, and
//! wakes this instance's consumers of a queue when one of its retries falls due.
//!
//! The Pub/Sub connection is a long-lived Redis connection of its own. When it drops, whatever was announced meanwhile is lost, so on every (re)connection
//! the instance behaves as if everything changed: subscriptions and queues are read again,
//! every queue counts as active until the scheduler looks at it, and every waiting consumer
//! looks again.

use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::service::wake::{Announcement, HEARTBEAT, SILENCE_LIMIT};
use crate::state::AppState;

const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// Connecting and subscribing, and the catch-up after it, give up after this long (a
/// half-open network would otherwise hold them for good).
const CONNECT_LIMIT: Duration = Duration::from_secs(5);
const CATCH_UP_LIMIT: Duration = Duration::from_secs(10);
/// Retry timers are armed by announcements and takes; nothing is due without one.
const IDLE_TIMERS: Duration = Duration::from_secs(60);

pub async fn run(state: AppState, shutdown: CancellationToken) {
    // Retries fall due whatever the wake channel is doing.
    tokio::join!(
        listen(&state, &shutdown),
        fire_retry_timers(&state, &shutdown)
    );
}

async fn fire_retry_timers(state: &AppState, shutdown: &CancellationToken) {
    while !shutdown.is_cancelled() {
        tokio::select! {
            () = state.retry_timers.wait(IDLE_TIMERS) => {
                for queue_id in state.retry_timers.take_due(Utc::now().timestamp_millis()) {
                    state.signals.notify(queue_id);
                }
            }
            () = shutdown.cancelled() => {}
        }
    }
}

async fn listen(state: &AppState, shutdown: &CancellationToken) {
    // When Redis accepted each heartbeat of this instance.
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    while !shutdown.is_cancelled() {
        let connected = tokio::time::timeout(CONNECT_LIMIT, state.broker.listen_for_wakes()).await;
        let mut listener = match connected {
            Ok(Ok(listener)) => listener,
            failed => {
                let error = match failed {
                    Ok(Err(error)) => error.to_string(),
                    _ => "timed out".to_owned(),
                };
                tracing::warn!(error, "cannot listen for wake-ups; retrying");
                tokio::select! {
                    () = tokio::time::sleep(RECONNECT_AFTER) => {}
                    () = shutdown.cancelled() => {}
                }
                continue;
            }
        };
        if tokio::time::timeout(CATCH_UP_LIMIT, catch_up(state))
            .await
            .is_err()
        {
            tracing::warn!("catching up after reconnecting timed out; the safety looks finish it");
        }
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        // The first heartbeat Redis accepted after the last thing heard: nothing heard for
        // `SILENCE_LIMIT` after it means the connection is lost. A slow or stalled Redis
        // accepts no heartbeat, so it is not taken for a lost connection.
        let mut unheard_since: Option<Instant> = None;
        loop {
            tokio::select! {
                message = listener.next() => match message {
                    Some(text) => {
                        last_heard = Instant::now();
                        unheard_since = None;
                        hear(state, &text);
                    }
                    None => {
                        tracing::warn!("wake-up connection lost; reconnecting");
                        break;
                    }
                },
                Some(sent_at) = accepted.recv() => {
                    if sent_at > last_heard && unheard_since.is_none() {
                        unheard_since = Some(sent_at);
                    }
                }
                _ = heartbeat.tick() => {
                    if unheard_since.is_some_and(|at| at.elapsed() > SILENCE_LIMIT) {
                        tracing::warn!("wake-up connection silent (a heartbeat Redis accepted was not heard); reconnecting");
                        listener.abandon();
                        break;
                    }
                    // Sent on a shared connection, off this loop: a slow send never delays
                    // what is heard.
                    let (state, accepted_tx) = (state.clone(), accepted_tx.clone());
                    tokio::spawn(async move {
                        let sent_at = Instant::now();
                        if state.broker.announce(&Announcement::Heartbeat).await.is_ok() {
                            let _ = accepted_tx.send(sent_at);
                        }
                    });
                }
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// Anything may have changed while this instance was not listening.
async fn catch_up(state: &AppState) {
    state.subscriptions.expire();
    state.queue_directory.expire();
    let queues = state.queue_directory.all(&state.store).await;
    state.activity.mark_all(queues.keys().copied());
    state.scheduler.look_at_all();
    state.signals.notify_all();
}

fn hear(state: &AppState, text: &str) {
    let Some(heard) = Announcement::decode(text) else {
        tracing::debug!(text, "unknown announcement ignored");
        return;
    };
    // This instance acted on its own changes when it made them.
    let own = heard.origin == state.instance_id;
    match heard.announcement {
        Announcement::Heartbeat => {}
        Announcement::Ready { queue_id } => {
            state.activity.mark(queue_id);
            if !own {
                state.signals.notify(queue_id);
            }
        }
        Announcement::Waiting { queue_id, due_ms } => {
            state.activity.mark(queue_id);
            if !own {
                state.scheduler.timers.arm(queue_id, due_ms);
            }
        }
        Announcement::Retry { queue_id, due_ms } => {
            if !own {
                state.retry_timers.arm(queue_id, due_ms);
            }
        }
        Announcement::SubscriptionsChanged { subscription_id } => {
            if !own {
                match subscription_id {
                    Some(id) => state.subscriptions.changed(id),
                    None => state.subscriptions.expire(),
                }
            }
        }
        Announcement::SubscriptionDeleted { subscription_id } => {
            if !own {
                state.forget_subscription_here(subscription_id);
            }
        }
        Announcement::QueueChanged {
            queue_id,
            tenant_id,
            name,
        } => {
            if !own {
                state.queue_cache.invalidate(tenant_id, &name);
                state.queue_directory.touch(queue_id);
                state.signals.notify(queue_id);
            }
        }
        Announcement::QueueDeleted {
            queue_id,
            tenant_id,
            name,
        } => {
            if !own {
                state.forget_queue_here(queue_id, tenant_id, &name);
            }
        }
    }
}
