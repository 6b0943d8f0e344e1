//! Releases delayed and scheduled messages when they are due.
//!
//! Each sweep runs the release script on every partition (one pipelined round trip) and
//! learns the earliest time anything still waits for. The worker then sleeps until exactly
//! that time, at most `MAX_IDLE` (so messages published by other instances, whose own
//! scheduler normally handles them, are picked up if that instance dies), and is woken early
//! when this instance accepts a message due before its planned wake-up. It never polls Redis
//! faster than messages fall due.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

const MAX_IDLE_MS: i64 = 1000;
/// Messages moved per partition per script call; a larger backlog loops at once.
const RELEASE_BATCH: usize = 1000;
const ERROR_BACKOFF: Duration = Duration::from_millis(500);

pub struct SchedulerStatus {
    released: AtomicU64,
    expired: AtomicU64,
    last_sweep_ms: AtomicI64,
    /// When the worker plans to sweep next (ms); publishers wake it when something is due
    /// sooner.
    planned_wake_ms: AtomicI64,
    wake: Notify,
}

impl Default for SchedulerStatus {
    fn default() -> Self {
        SchedulerStatus {
            released: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            last_sweep_ms: AtomicI64::new(0),
            planned_wake_ms: AtomicI64::new(0),
            wake: Notify::new(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SchedulerReport {
    pub released: u64,
    pub expired: u64,
    pub last_sweep_at: Option<DateTime<Utc>>,
    pub next_sweep_at: Option<DateTime<Utc>>,
}

impl SchedulerStatus {
    /// Called when a message due at `due_ms` was accepted.
    pub fn message_waiting(&self, due_ms: i64) {
        if due_ms < self.planned_wake_ms.load(Ordering::Relaxed) {
            self.planned_wake_ms.store(due_ms, Ordering::Relaxed);
            self.wake.notify_one();
        }
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
            next_sweep_at: time(self.planned_wake_ms.load(Ordering::Relaxed)),
        }
    }
}

pub async fn run(state: AppState, shutdown: CancellationToken) {
    let status = state.scheduler.clone();
    while !shutdown.is_cancelled() {
        let partitions = state.partitions.current(&state.store).await;
        let now = Utc::now().timestamp_millis();
        let sweep = match state
            .broker
            .release_due(&partitions, now, RELEASE_BATCH)
            .await
        {
            Ok(sweep) => sweep,
            Err(error) => {
                tracing::warn!(error = %error, "scheduler sweep failed");
                tokio::select! {
                    () = tokio::time::sleep(ERROR_BACKOFF) => {}
                    () = shutdown.cancelled() => {}
                }
                continue;
            }
        };
        for queue_id in &sweep.released_to {
            state.signals.notify(*queue_id);
        }
        status.released.fetch_add(sweep.released, Ordering::Relaxed);
        status.expired.fetch_add(sweep.expired, Ordering::Relaxed);
        status.last_sweep_ms.store(now, Ordering::Relaxed);
        if sweep.more_due {
            continue;
        }
        let wake_at = sweep
            .next_due_ms
            .map_or(now + MAX_IDLE_MS, |due| due.min(now + MAX_IDLE_MS));
        status.planned_wake_ms.store(wake_at, Ordering::Relaxed);
        let sleep_ms = (wake_at - Utc::now().timestamp_millis()).max(0) as u64;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
            () = status.wake.notified() => {}
            () = shutdown.cancelled() => {}
        }
    }
}
