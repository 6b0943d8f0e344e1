//! Releases delayed and scheduled messages when they are due, marks expired the messages
//! whose ttl ran out, and keeps the set of active queues (`service::activity`) true.
//!
//! It sleeps until the earliest time a queue waits for (`timers`: armed by this instance's
//! publishes, by other instances' announcements and by each release, which returns the next
//! time its queue waits for), so it never polls Redis faster than messages fall due. Every
//! `SAFETY_LOOK` it looks at every active queue instead: that catches what a lost
//! announcement left behind, and drops from the set the queues found empty. Every
//! `FULL_LOOK`, every queue counts as active again for one look.
//!
//! Each turn releases at most `TURN_PARTITIONS` partitions' worth of queues, taken in
//! tenant turns (`service::turns`): a tenant with a thousand active queues makes the safety
//! look longer, not another tenant's due message later.
//!
//! Several instances may release one queue at once: a message is moved by one script, so
//! exactly once.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::broker::scheduler::Release;
use crate::service::activity::Stamp;
use crate::service::due::DueQueues;
use crate::service::partitions::QueueRef;
use crate::service::turns::{push_queues, Lanes};
use crate::state::AppState;

const SAFETY_LOOK: Duration = Duration::from_secs(30);
const FULL_LOOK: Duration = Duration::from_secs(600);
/// Messages moved per partition per script call; a larger backlog loops at once.
const RELEASE_BATCH: usize = 1000;
const ERROR_BACKOFF_MS: i64 = 500;
/// Partitions released per turn, at most (a wider queue goes alone).
const TURN_PARTITIONS: usize = 256;

#[derive(Default)]
pub struct SchedulerStatus {
    released: AtomicU64,
    expired: AtomicU64,
    last_sweep_ms: AtomicI64,
    /// When each queue next waits for something.
    pub timers: DueQueues,
    /// Look at every active queue at the next turn.
    look_at_all: AtomicBool,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulerReport {
    pub released: u64,
    pub expired: u64,
    pub last_sweep_at: Option<DateTime<Utc>>,
    pub next_sweep_at: Option<DateTime<Utc>>,
}

impl SchedulerStatus {
    /// The next turn looks at every active queue (after a lost wake-up connection).
    pub fn look_at_all(&self) {
        self.look_at_all.store(true, Ordering::Relaxed);
        self.timers.nudge();
    }

    pub fn report(&self) -> SchedulerReport {
        let time = |ms: i64| {
            (ms > 0)
                .then(|| DateTime::from_timestamp_millis(ms))
                .flatten()
        };
        SchedulerReport {
            released: self.released.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            last_sweep_at: time(self.last_sweep_ms.load(Ordering::Relaxed)),
            next_sweep_at: self.timers.next().and_then(time),
        }
    }
}

pub async fn run(state: AppState, shutdown: CancellationToken) {
    let status = &state.scheduler;
    let mut safety_look = Instant::now();
    let mut full_look = Instant::now();
    let mut turns: Lanes<QueueRef> = Lanes::default();
    // Whatever waited while no instance ran: every queue, once.
    status.look_at_all();
    while !shutdown.is_cancelled() {
        let now = Utc::now().timestamp_millis();
        let mut deleted = push_queues(&state, &mut turns.due, status.timers.take_due(now)).await;
        if full_look.elapsed() >= FULL_LOOK {
            full_look = Instant::now();
            let all = state.queue_directory.all(&state.store).await;
            state.activity.mark_all(all.keys().copied());
            status.look_at_all.store(true, Ordering::Relaxed);
        }
        if status.look_at_all.swap(false, Ordering::Relaxed) || safety_look.elapsed() >= SAFETY_LOOK
        {
            safety_look = Instant::now();
            let active = state.activity.snapshot();
            deleted.extend(push_queues(&state, &mut turns.swept, active).await);
        }
        for queue_id in deleted {
            state.activity.forget(queue_id);
        }
        let turn = turns.take(TURN_PARTITIONS, |queue| usize::from(queue.partition_count));
        if !turn.is_empty() {
            let queues: Vec<QueueRef> = turn.into_iter().map(|(_, queue)| queue).collect();
            release(&state, &queues, now).await;
        }
        if !turns.is_empty() {
            // More waits its turn: timers that fell due meanwhile join the next one.
            tokio::task::yield_now().await;
            continue;
        }
        let until_safety_look = SAFETY_LOOK.saturating_sub(safety_look.elapsed());
        tokio::select! {
            () = status.timers.wait(until_safety_look) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

async fn release(state: &AppState, found: &[QueueRef], now: i64) {
    let status = &state.scheduler;
    let work: Vec<_> = found.iter().map(|q| (q.id, q.partition_count)).collect();
    // Read before the look: a queue marked while it runs is not forgotten.
    let stamps: std::collections::HashMap<uuid::Uuid, Stamp> = work
        .iter()
        .map(|(queue_id, _)| (*queue_id, state.activity.stamp(*queue_id)))
        .collect();
    match state.broker.release_due(&work, now, RELEASE_BATCH).await {
        Ok(releases) => {
            for (release, queue) in releases.iter().zip(found) {
                if release.released + release.expired > 0 {
                    state.unrecorded.mark(queue.partitions());
                }
                let stamp = stamps.get(&release.queue_id).copied().flatten();
                settle(state, release, stamp, now);
            }
            status.last_sweep_ms.store(now, Ordering::Relaxed);
        }
        Err(error) => {
            tracing::warn!(error = %error, "releasing due messages failed; will retry");
            // A script may have run before the answer was lost.
            state
                .unrecorded
                .mark(found.iter().flat_map(QueueRef::partitions));
            for (queue_id, _) in work {
                status.timers.arm(queue_id, now + ERROR_BACKOFF_MS);
            }
        }
    }
}

fn settle(state: &AppState, release: &Release, stamp: Stamp, now: i64) {
    let status = &state.scheduler;
    if release.released > 0 {
        state.signals.notify(release.queue_id);
    }
    status
        .released
        .fetch_add(release.released, Ordering::Relaxed);
    status.expired.fetch_add(release.expired, Ordering::Relaxed);
    if release.more_due {
        status.timers.arm(release.queue_id, now);
    } else if let Some(next) = release.next_due_ms {
        status.timers.arm(release.queue_id, next);
    }
    if release.empty {
        state
            .activity
            .forget_unless_marked_since(release.queue_id, stamp);
    }
}
